"""The method contract and its registry.

A method adapter (one file per method under ``methods/``) trains or loads what it needs, then
samples prompts at an NFE budget from per-sample seeds. Registration is by decorator; the lazy
name map below lets ``flashbench list`` and error messages name every method without importing
torch or diffusers.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import importlib
import types
import typing
from pathlib import Path
from typing import ClassVar

from bench.errors import UserError, unknown

# name -> module that registers it (imported only when the method is used)
LAZY: dict[str, str] = {
    "teacher": "methods.teacher",
    "imagine-flash": "methods.imagine_flash",
    "lcm": "methods.lcm",
    "add": "methods.add",
    "progressive": "methods.progressive",
    "dmd2": "methods.dmd2",
    "pretrained": "methods.pretrained",
}
_REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    def deco(cls: type[Method]) -> type[Method]:
        if name not in LAZY:
            raise RuntimeError(f"method {name!r} is registered but missing from methods.base.LAZY")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def names() -> list[str]:
    return sorted(LAZY)


def get(name: str) -> type[Method]:
    if name not in LAZY:
        raise unknown("method", name, LAZY)
    if name not in _REGISTRY:
        importlib.import_module(LAZY[name])
    return _REGISTRY[name]


@dataclasses.dataclass
class Context:
    """Where and how a method runs: device, cache of trained students, progress bars, budget scale."""

    cache_dir: Path
    device: str = "cpu"
    progress: bool = True
    scale: float = 1.0  # multiplies training budgets (e.g. --scale 20 on a GPU)
    rank: int = 0  # this process and the number of processes (accelerate / torchrun)
    world: int = 1


@dataclasses.dataclass
class TrainInfo:
    """What it cost to make the sampler (recorded with every result)."""

    student_updates: int = 0
    teacher_nfe: int = 0  # teacher network evaluations (per-sample calls, CFG counted twice) spent training
    wall_seconds: float = 0.0
    cached: bool = False
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    losses: dict | None = None

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


class Method(abc.ABC):
    """Train or load; then sample prompts at an NFE budget from per-sample seeds."""

    name: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, backbone, config, ctx: Context):
        self.backbone = backbone
        self.config = config
        self.ctx = ctx
        self._counters: list = []

    def counted(self, net):
        """Wrap a network so its evaluations count towards this method's NFE."""
        from methods.backbone import NFECounter

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

    def counted_nfe(self) -> int:
        """Network evaluations (per-sample calls) since the last reset."""
        return sum(c.count for c in self._counters)

    @classmethod
    def make_config(cls, settings: dict | None = None, where: str | None = None):
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
    def steps_for_nfe(cls, config, nfe) -> int:
        """Sampler steps that spend exactly `nfe` evaluations per sample; UserError if none does."""
        if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe <= 0:
            raise UserError(f"{cls.name}: NFE must be a positive integer, got {nfe!r}")
        per = cls.nfe_per_step(config)
        allowed = cls.allowed_steps(config)
        if nfe % per or (allowed is not None and nfe // per not in allowed):
            reachable = [k * per for k in allowed] if allowed is not None else f"multiples of {per}"
            raise UserError(f"{cls.name}: NFE {nfe} is not reachable ({per} NFE per step); reachable: {reachable}")
        return nfe // per

    def prepare(self, nfe: int) -> TrainInfo:
        """Train or load whatever sampling at this budget needs (cached by a hash of its config)."""
        return TrainInfo()

    @abc.abstractmethod
    def sample(self, texts: list[str], noise_keys: list[tuple[str, int]], nfe: int):
        """Images [N, 3, H, W] in [0, 1]; sample i's noise is a function of noise_keys[i] = (prompt id, seed) only."""

    @classmethod
    def smoke_settings(cls) -> dict:
        """The cheapest settings that still exercise every code path (contract tests, smoke suites)."""
        return {}

    @classmethod
    def smoke_nfe(cls, config) -> list[int]:
        """Two small reachable budgets for contract tests."""
        per = cls.nfe_per_step(config)
        allowed = cls.allowed_steps(config)
        steps = sorted(allowed)[:2] if allowed else [1, 2]
        return [s * per for s in steps]

    def settings(self) -> dict:
        """The resolved settings recorded with every result."""
        return dataclasses.asdict(self.config)
