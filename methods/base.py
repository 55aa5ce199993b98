"""The method contract: one small abstract base class for every adapter.

A method adapter (one file per method under ``methods/``, registered with ``@register``) trains or
loads what it needs, then samples prompts at a fixed number of sampler steps from per-sample seeds.
Its budget is resolved once, as steps and the network evaluations (NFE) they cost, by ``budget``;
the NFE counter around every network it calls proves the cost when it samples.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import ClassVar

from core.errors import UserError, unknown
from methods.registry import get, names, register

__all__ = ["Budget", "Context", "Method", "TrainInfo", "coerce_config", "get", "names", "register"]


@dataclasses.dataclass(frozen=True)
class Budget:
    """A sampling budget, resolved once: sampler steps and the NFE per sample they cost."""

    steps: int
    nfe: int


@dataclasses.dataclass
class Context:
    """How a method runs besides its settings: the cache of trained students, progress bars, budget scale,
    and this process's place among data-parallel processes (accelerate / torchrun)."""

    cache_dir: Path
    progress: bool = True
    scale: float = 1.0  # multiplies training budgets (e.g. scale = 20 on a GPU)
    rank: int = 0
    world: int = 1
    # keep each trained student's final training state in the cache, so a longer training of the same student
    # continues it (learning curves: bench/curves.py); off by default (a state holds every optimizer)
    keep_state: bool = False


@dataclasses.dataclass
class TrainInfo:
    """What it cost to make the sampler (recorded with every result)."""

    student_updates: int = 0
    teacher_nfe: int = 0  # teacher forward passes per sample (a guided call counts 2), counted in training
    network_passes: int = 0  # forward + backward passes per sample of every network used in training, counted
    passes: dict | None = None  # {role: {"forward": n, "backward": n}} (teacher, student, discriminator, ...)
    lora_rank: int = 0  # the LoRA rank the student trained at (0: the full UNet)
    wall_seconds: float = 0.0  # seconds this session spent making the student (training, or loading it)
    train_seconds: float = 0.0  # seconds inside the training's updates, summed over every session it took (counted)
    continued_from: int | None = None  # the cached training of this many updates it continued (None: from the start)
    student_timesteps: dict | None = None  # {t: samples} of the student's gradient passes (its training inputs)
    cached: bool = False
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    losses: dict | None = None
    # the adversarial term's verdict, for methods with one: {"active", "disc_acc", "ci", ...} (AdversarialTerm.verdict)
    adversarial: dict | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def coerce_config(cls: type, settings: dict, where: str):
    """Build a settings dataclass from a suite's dict; unknown keys and wrong types are UserErrors."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in settings:
        if key not in fields:
            raise unknown(f"setting for {where}", key, fields)
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in settings.items():
        typ = hints[key]
        origin = typing.get_origin(typ)
        allowed = typing.get_args(typ) if origin in (typing.Union, types.UnionType) else (typ,)
        if value is None and type(None) in allowed:
            out[key] = None
            continue
        ok = False
        for a in allowed:
            base = typing.get_origin(a) or a
            if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
                if not math.isfinite(value):
                    raise UserError(f"{where}: setting {key!r} must be a finite number, got {value!r}")
                out[key], ok = float(value), True
                break
            if base is tuple and isinstance(value, (list, tuple)):
                out[key], ok = tuple(value), True
                break
            if isinstance(base, type) and isinstance(value, base) and not (base is int and isinstance(value, bool)):
                out[key], ok = value, True
                break
        if not ok:
            raise UserError(f"{where}: setting {key!r} must be {typ}, got {value!r}")
    try:
        cfg = cls(**out)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from None
    return cfg


def _span(values: list[int]) -> str:
    """A long arithmetic run such as [2, 4, ..., 2000] as "2, 4, ..., 2000"; anything else as the list."""
    if len(values) > 8 and values == list(range(values[0], values[-1] + 1, values[1] - values[0])):
        return f"{values[0]}, {values[1]}, ..., {values[-1]}"
    return str(values)


class Method(abc.ABC):
    """Train or load; then sample prompts at a budget of sampler steps from per-sample seeds.

    Subclasses set ``Config`` (a dataclass of settings) and implement ``sample``; distilled methods
    also implement training (``methods.student.DistilledMethod``).
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    # whether the backbone's conventions (its pipeline's default guidance, ...) fill settings a suite leaves unset;
    # a published checkpoint's come from its model card instead
    takes_conventions: ClassVar[bool] = True

    def __init__(self, backbone, config, ctx: Context):
        self.backbone = backbone
        self.config = config
        self.ctx = ctx
        self._counters: list = []

    # --- budgets -----------------------------------------------------------------------------------
    @classmethod
    def make_config(cls, settings: dict | None = None, where: str | None = None):
        """The method's Config from a suite's settings dict (UserError on unknown keys, types or values)."""
        return coerce_config(cls.Config, dict(settings or {}), where or cls.name)

    @classmethod
    def nfe_per_step(cls, config) -> int:
        """Network evaluations per sample per sampler step (2 for a guided teacher)."""
        return 1

    @classmethod
    def allowed_steps(cls, config) -> tuple[int, ...] | None:
        """Step counts this method can sample at (None: any)."""
        return None

    @classmethod
    def budget(cls, config, *, steps: int | None = None, nfe: int | None = None) -> Budget:
        """The budget for `steps` sampler steps or for exactly `nfe` evaluations per sample (give one).

        Raises UserError when the count is not a positive integer or no step count spends exactly `nfe`.
        """
        per = cls.nfe_per_step(config)
        allowed = cls.allowed_steps(config)
        if (steps is None) == (nfe is None):
            raise ValueError("give exactly one of steps or nfe")
        value, what = (steps, "steps") if steps is not None else (nfe, "NFE")
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{cls.name}: {what} must be a positive integer, got {value!r}")
        if nfe is not None:
            steps = nfe // per
            if nfe % per or (allowed is not None and steps not in allowed):
                reachable = _span([k * per for k in allowed]) if allowed is not None else f"multiples of {per}"
                raise UserError(f"{cls.name}: NFE {nfe} is not reachable ({per} NFE per step); reachable: {reachable}")
        elif allowed is not None and steps not in allowed:
            raise UserError(f"{cls.name}: {steps} steps is not available; available: {_span(list(allowed))}")
        return Budget(steps, steps * per)

    # --- the NFE counter ---------------------------------------------------------------------------
    def counted(self, net):
        """Wrap a network so its evaluations count towards this method's NFE."""
        from methods.backbone import NFECounter  # here, not at the top: this module stays torch-free for `list`

        counter = NFECounter(net)
        self._counters.append(counter)
        return counter

    @contextlib.contextmanager
    def unpadded(self):
        """Run networks at the true batch size (latency measurement), not padded for bit-exactness."""
        saved = [c.min_batch for c in self._counters]
        for c in self._counters:
            c.min_batch = None
        try:
            yield
        finally:
            for c, m in zip(self._counters, saved):
                c.min_batch = m

    def reset_nfe(self) -> None:
        for c in self._counters:
            c.count = 0

    def networks(self) -> list:
        """The networks this method samples with (each NFE-counted one, unwrapped)."""
        return [c.net for c in self._counters]

    def release(self) -> None:
        """Drop every network this method loaded or trained (its rows are done): the runner calls it after the
        method's last cell, so a later row's memory holds the teacher and that row's method only. Subclasses
        drop their own references too; a released method loads or trains again if used."""
        self._counters.clear()

    def counted_nfe(self) -> int:
        """Network evaluations (per-sample calls) since the last reset."""
        return sum(c.count for c in self._counters)

    # --- train or load, then sample ------------------------------------------------------------------
    def prepare(self, steps: int) -> TrainInfo:
        """Train or load whatever sampling at `steps` steps needs (cached by a hash of what made it)."""
        return TrainInfo()

    @abc.abstractmethod
    def sample(self, texts: list[str], noise_keys: list[tuple[str, int]], steps: int):
        """Images float32 [N, 3, H, W] in [0, 1] after `steps` sampler steps.

        Sample i's noise is a function of noise_keys[i] = (prompt id, seed) only, so a sample does
        not depend on its batch or on the process that draws it.
        """

    # --- what tests and smoke suites use ------------------------------------------------------------
    @classmethod
    def smoke_settings(cls) -> dict:
        """The cheapest settings that still exercise every code path (contract tests, smoke suites)."""
        return {}

    @classmethod
    def smoke_steps(cls, config) -> list[int]:
        """Two small available step counts for contract tests."""
        allowed = cls.allowed_steps(config)
        return sorted(allowed)[:2] if allowed else [1, 2]

    def settings(self) -> dict:
        """The resolved settings recorded with every result."""
        return dataclasses.asdict(self.config)
