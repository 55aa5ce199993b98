"""The latency gate: a run's latencies against the rolling median of main-branch runs of its key.

`flashbench latency-gate RUN --history DIR [--main]` reads ``DIR/<key>.jsonl`` (one JSON line per
main-branch run: its key, git hash and ``latency_ms`` per cell), compares each cell of RUN with the
median of that cell over the last ``window`` lines, and only then, with ``--main``, appends RUN.
Pull-request runs compare but never append, so the history follows merged code only.

A cell regresses only when it is slower than that median by more than both limits: ``max_slower_pct``
(relative, %) and ``max_slower_ms`` (absolute, ms) — a 20 % slowdown of a 1 ms call is noise, a 3 ms
slowdown of a 200 ms call too. A cell without history yet is reported as new and passes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import numpy as np

from bench.results import reference
from bench.rundir import load_rows, read_config
from core import io
from core.errors import UserError


@dataclasses.dataclass(frozen=True)
class Limits:
    """The latency gate's settings; UserError when out of range."""

    window: int = 10  # the median is over the last `window` main-branch runs (>= 1)
    max_slower_pct: float = 15.0  # relative limit, % of the median (>= 0)
    max_slower_ms: float = 2.0  # absolute limit, ms (>= 0)

    def __post_init__(self):
        if self.window < 1:
            raise UserError(f"--window must be a positive number of main-branch runs, got {self.window}")
        if not self.max_slower_pct >= 0:
            raise UserError(f"--max-slower-pct must be a percentage >= 0, got {self.max_slower_pct}")
        if not self.max_slower_ms >= 0:
            raise UserError(f"--max-slower-ms must be milliseconds >= 0, got {self.max_slower_ms}")

    def regressed(self, new_ms: float, median_ms: float) -> bool:
        """Slower than `median_ms` by more than both limits."""
        slower = new_ms - median_ms
        return slower > self.max_slower_ms and slower > median_ms * self.max_slower_pct / 100


def run_latencies(run: Path) -> dict[str, float]:
    """Per cell ("label|nfe=N"), the median over finished seeds of ``latency_ms`` (one sample call at batch 1,
    ms). UserError when no row has one (a suite without "latency" in its metrics)."""
    cells: dict[str, list[float]] = {}
    for r in load_rows(run):
        if r.get("status") == "ok" and isinstance(r.get("latency_ms"), int | float):
            cells.setdefault(f"{r['label']}|nfe={r['nfe']}", []).append(float(r["latency_ms"]))
    if not cells:
        raise UserError(f"{run} has no finished row with latency_ms; run a suite with \"latency\" in its metrics")
    return {c: float(np.median(v)) for c, v in cells.items()}


def benchmark_latencies(path: Path) -> dict[str, float]:
    """Per benchmark of a pytest-benchmark ``--benchmark-json`` file, its median in ms, as cell "bench:<name>"."""
    try:
        data = json.loads(Path(path).read_text())
        return {f"bench:{b['name']}": 1000.0 * float(b["stats"]["median"]) for b in data["benchmarks"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a pytest-benchmark --benchmark-json file ({e})") from None


def history_file(history: Path, key: reference.Key) -> Path:
    return Path(history) / f"{key.name}.jsonl"


def read(path: Path, key: reference.Key) -> list[dict]:
    """The entries of a history file, oldest first ([] when there is none); UserError naming a corrupt line
    or an entry of another key."""
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            ok = entry["key"] == key.name and all(isinstance(v, int | float) for v in entry["latency_ms"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            raise UserError(f"{path}:{n}: not a latency history entry of {key.name}; remove the line or the file")
        out.append(entry)
    return out


def compare(current: dict[str, float], entries: list[dict], limits: Limits) -> tuple[list[str], bool]:
    """(Markdown table lines, regressed?): each cell of `current` (ms) against the median of its last
    ``limits.window`` values in `entries`."""
    lines = ["| cell | main runs | median ms | new ms | change | verdict |", "|---|---|---|---|---|---|"]
    regressed = False
    for cell, ms in current.items():
        past = [e["latency_ms"][cell] for e in entries if cell in e["latency_ms"]][-limits.window :]
        if not past:
            lines.append(f"| {cell} | 0 | — | {ms:.2f} | — | new |")
            continue
        med = float(np.median(past))
        bad = limits.regressed(ms, med)
        regressed |= bad
        change = f"{ms - med:+.2f} ms ({100 * (ms - med) / med:+.0f} %)" if med > 0 else f"{ms - med:+.2f} ms"
        verdict = "**slower**" if bad else ("faster" if ms < med else "ok")
        lines.append(f"| {cell} | {len(past)} | {med:.2f} | {ms:.2f} | {change} | {verdict} |")
    return lines, regressed


def gate(run: Path, history: Path, limits: Limits, main: bool = False, device: str | None = None,
         benchmark_json: Path | None = None) -> tuple[str, bool]:
    """(Markdown report, regressed?) of RUN's latencies (and a pytest-benchmark file's) against its key's
    history in HISTORY; with `main`, RUN is then appended. The report is also written to RUN/latency-gate.md.
    UserError (nothing written) for a run without latencies, a bad benchmark file or history line."""
    key = reference.run_key(run, device)
    current = run_latencies(run)
    if benchmark_json is not None:
        current.update(benchmark_latencies(benchmark_json))
    path = history_file(history, key)
    entries = read(path, key)
    lines, regressed = compare(current, entries, limits)
    # only now, after every check: the history grows by main-branch runs alone
    if main:
        config = read_config(run)
        entry = {"key": key.name, "recorded": dt.datetime.now().isoformat(timespec="seconds"),
                 "git": config.get("git"), "run": Path(run).name, "latency_ms": current}
        io.write_text(path, "".join(json.dumps(e, sort_keys=True) + "\n" for e in [*entries, entry]))
    recorded = f"appended to {path} (main)" if main else f"not appended to {path} (not main)"
    report = "\n".join([
        f"# Latency gate: {Path(run).name} vs the median of the last {limits.window} main-branch runs of {key.name}", "",
        f"A cell regresses when slower by more than {limits.max_slower_pct:g} % and by more than "
        f"{limits.max_slower_ms:g} ms. History: {len(entries)} run(s); this run {recorded}.", "",
        *lines, "", "**FAIL: slower**" if regressed else "**PASS**", ""])
    io.write_text(Path(run) / "latency-gate.md", report)
    return report, regressed
