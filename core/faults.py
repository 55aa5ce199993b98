"""Failpoints for fault-injection tests: FLASHBENCH_FAULT names points where the process misbehaves.

    FLASHBENCH_FAULT="kill:train:7"       SIGKILL itself at training update 7 (any method)
    FLASHBENCH_FAULT="kill:sample:2"      SIGKILL itself while sampling the run's third cell
    FLASHBENCH_FAULT="kill:metrics:1"     ... while computing the metrics of the second cell
    FLASHBENCH_FAULT="nan:train:3"        make the loss NaN at training update 3
    FLASHBENCH_FAULT="nan:sample:0"       put a NaN into the samples of the first cell
    FLASHBENCH_FAULT="raise:setup:0"      raise an error while the run is being set up (after its directory exists)
Several points may be given, comma-separated. Unset (always, outside tests), every check is a no-op.
"""

from __future__ import annotations

import os
import signal


def _points() -> set[str]:
    return {p.strip() for p in os.environ.get("FLASHBENCH_FAULT", "").split(",") if p.strip()}


def hit(kind: str, where: str, index: int) -> bool:
    """True if the failpoint `kind:where:index` is set (for non-fatal faults such as NaN injection)."""
    return f"{kind}:{where}:{index}" in _points()


def maybe_kill(where: str, index: int) -> None:
    if hit("kill", where, index):
        os.kill(os.getpid(), signal.SIGKILL)


class InjectedFault(RuntimeError):
    """An error raised on purpose by a failpoint."""


def maybe_raise(where: str, index: int) -> None:
    if hit("raise", where, index):
        raise InjectedFault(f"failpoint raise:{where}:{index}")
