"""The accumulator contract every metric follows (torchmetrics style: update / compute / reset).

An accumulator keeps one row of per-sample values for each sample it has seen (float64 scalars, or
FID features), never the images. ``update()`` runs per batch on every process; the local rows are
gathered across processes in sample order (``Dist.gather``: shards are contiguous, so rank order is
sample order) and ``compute(values)`` turns them into the metric and its bootstrap CI on process 0.
Because every sum is taken over the gathered rows in sample order, a metric does not depend on the
batch size or the number of processes, bit for bit.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch

CHUNK = 64  # per-sample computations run on batches of exactly this many images (see in_fixed_chunks)


class Accumulator(abc.ABC):
    """Per-sample rows [n, width] collected by ``update``; ``compute`` maps all rows [N, width] to metrics."""

    width: int  # values per sample
    dtype: torch.dtype = torch.float64

    def __init__(self):
        self._rows: list[torch.Tensor] = []

    def reset(self) -> None:
        self._rows = []

    @abc.abstractmethod
    def per_sample(self, images: torch.Tensor, prompts: list) -> torch.Tensor:
        """Rows [n, width] for images float32 [n, 3, H, W] in [0, 1] and their prompts (CPU tensor)."""

    def update(self, images: torch.Tensor, prompts: list) -> None:
        self._rows.append(self.per_sample(images, prompts).cpu())

    def local(self) -> torch.Tensor:
        """This process's rows, in the order they were seen: [n_local, width]."""
        return torch.cat(self._rows) if self._rows else torch.zeros(0, self.width, dtype=self.dtype)

    @abc.abstractmethod
    def compute(self, values: torch.Tensor) -> dict:
        """The results-row fields (metric, ``_ci_low``, ``_ci_high``) from every sample's rows [N, width]."""


def in_fixed_chunks(fn, n: int, *batched, chunk: int) -> torch.Tensor:
    """fn over `n` rows in chunks of exactly `chunk` rows (the last padded by repeating its final row).

    Network kernels may take other code paths for other batch sizes; at one fixed size a sample's
    output depends on that sample alone, so it is the same whatever batch or process it came in.
    `batched` are tensors [n, ...] or lists of length n; fn returns a tensor [chunk, ...].
    """
    outs = []
    for i in range(0, n, chunk):
        j = min(n, i + chunk)
        pad = chunk - (j - i)
        args = []
        for b in batched:
            part = b[i:j]
            if pad:
                part = torch.cat([part, part[-1:].expand(pad, *part.shape[1:])]) if torch.is_tensor(part) \
                    else list(part) + [part[-1]] * pad
            args.append(part)
        outs.append(fn(*args)[: j - i])
    return torch.cat(outs)


def prompt_ids(prompts: list, k: int = 5) -> str:
    """The first `k` prompt ids of a list, for error messages ("a, b, c and 12 more")."""
    ids = [p.id for p in prompts]
    return ", ".join(ids[:k]) + (f" and {len(ids) - k} more" if len(ids) > k else "")


class Metric(Accumulator):
    """One metric, declared once in its own file (``@register_metric``: its name, its results-row columns, what it
    needs), measured as an accumulator: per-sample rows on every process, ``compute`` over every sample's rows.

    ``check`` says before anything is written whether the metric can be measured on a suite's prompts (a UserError
    naming why not and what would do); ``applies`` whether a metric measured always is measured in this cell;
    ``protocol`` what moves its numbers, beside them in every row (None: the shared protocol says it all).
    """

    name: ClassVar[str]
    columns: ClassVar[tuple[dict, ...]]  # bench.specs.MetricSpec fields of each results-row field it writes
    needs: ClassVar[tuple[str, ...]]
    always: ClassVar[bool]
    reward: ClassVar[str | None] = None  # the reward model it is, as model cards name it (``register_metric``)
    Config: ClassVar[type | None] = None  # its settings (a dataclass; a suite's [metrics.<name>] table), if any

    def __init__(self, evaluators, prompts: list, reference=None, config=None):
        super().__init__()
        self.evaluators, self.prompts, self.reference = evaluators, prompts, reference
        self.config = config if config is not None else self.make_config({}, self.name)
        self.setup()

    def setup(self) -> None:
        """Per-instance set-up from the evaluators and the config (e.g. ``width``); runs at the end of __init__."""

    @classmethod
    def make_config(cls, settings: dict, where: str):
        """The metric's Config from a suite's [metrics.<name>] table (UserError on unknown keys, types or values);
        None for a metric without settings (UserError when some were given)."""
        from core.errors import UserError
        from methods.base import coerce_config

        if cls.Config is None:
            if settings:
                raise UserError(f"{where}: metric {cls.name!r} takes no settings, got {sorted(settings)}")
            return None
        return coerce_config(cls.Config, dict(settings), where)

    @classmethod
    def check(cls, prompts: list, where: str, evaluators_kind: str, config=None) -> None:
        """UserError (one line) when the suite asks for this metric and these prompts, evaluators or settings
        (`config`, from ``make_config``: e.g. a weights path that is not there) cannot give it."""

    @classmethod
    def applies(cls, evaluators, prompts: list) -> bool:
        """Whether the cell measures it (a metric measured always, where it can be)."""
        return True

    def protocol(self) -> dict | None:
        return None
