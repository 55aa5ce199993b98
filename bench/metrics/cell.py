"""All the metrics of one cell, fed batch by batch: what the runner and the real-vs-real floor use."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import time

import torch

from bench.metrics import registry
from bench.metrics.fid import Reference


def to_8bit(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What is measured: samples as they would be saved, 8-bit levels as float32 [n, 3, H, W] in [0, 1]
    (NaN/Inf replaced by 0), and which samples were finite ([n] bool)."""
    finite = torch.isfinite(images).flatten(1).all(1)
    return (images.nan_to_num(0).clamp(0, 1) * 255).round() / 255.0, finite


class CellMetrics:
    """The metrics of one cell, as accumulators: those the suite's `metrics` list and those measured always (CLIP
    score, colour statistics; compositional accuracy wherever every prompt has ground truth and the evaluators can
    check it), from the metric registry (``bench.metrics.registry``).

    ``update(images, prompts)`` per batch (float32 [n, 3, H, W] in [0, 1]) on every process;
    ``gather(fn)`` on every process (a collective: `fn` maps this process's rows to every sample's rows
    in sample order); ``compute(values)`` on the process that holds the reference. `metrics` default: FID when
    a `reference` is given; the reference itself is needed only where ``compute`` runs.
    """

    def __init__(self, evaluators, prompts: list, reference: Reference | None = None, metrics: list[str] | None = None,
                 settings: dict[str, dict] | None = None):
        """`settings`: a suite's [metrics] tables (metric name -> its settings)."""
        metrics = (["fid"] if reference is not None else []) if metrics is None else metrics
        settings = settings or {}
        made = [cls(evaluators, prompts, reference, cls.make_config(settings.get(cls.name, {}), cls.name))
                for cls in registry.measured(metrics) if cls.applies(evaluators, prompts)]
        self.parts = [m for m in made if "groups" not in m.needs]  # one row per evaluation sample
        self.groups = [m for m in made if "groups" in m.needs]  # several samples of some prompts (diversity)
        self.device = evaluators.device
        self.seconds = {m.name: 0.0 for m in made}  # wall time each metric took in this process (s)

    def _timed(self, name: str, t0: float) -> None:
        self.seconds[name] += time.perf_counter() - t0

    def update(self, images: torch.Tensor, prompts: list) -> None:
        images = images.to(self.device)
        with torch.no_grad():
            for part in self.parts:
                t0 = time.perf_counter()
                part.update(images, prompts)
                self._timed(part.name, t0)

    def sample_groups(self, sample: Callable[[list[str], list[tuple[str, int]]], torch.Tensor], cell_seed: int) -> int:
        """Feed the metrics that need several samples per prompt (``needs=("groups",)``): `sample(texts, noise_keys)`
        returns float32 images [k, 3, H, W] in [0, 1] (8-bit levels). Run by one process. Returns the samples made."""
        n = 0
        for part in self.groups:
            t0 = time.perf_counter()
            seeds = part.noise_seeds(cell_seed)
            for p in part.group_prompts():
                images = sample([p.text] * len(seeds), [(p.id, s) for s in seeds])
                with torch.no_grad():
                    part.update_group(p, images)
                n += len(seeds)
            self._timed(part.name, t0)  # its sampling included: what the metric costs the cell
        return n

    def gather(self, fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[torch.Tensor]:
        return [part.local() if fn is None else fn(part.local()) for part in self.parts]

    def compute(self, values: list[torch.Tensor] | None = None) -> dict:
        """Every metric and its CI (results-row fields) from the gathered values (default: this process's), and
        the grouped metrics from their own groups (on the process that sampled them)."""
        values = self.gather() if values is None else values
        row = {}
        for part, v in zip(self.parts, values):
            t0 = time.perf_counter()
            row.update(part.compute(v))
            self._timed(part.name, t0)
        for part in self.groups:
            t0 = time.perf_counter()
            row.update(part.compute())
            self._timed(part.name, t0)
        return row

    def row(self, values: list[torch.Tensor] | None, protocol: dict) -> dict:
        """A results row's metric fields: ``compute(values)``, each metric's wall time (``metric_seconds``, s, this
        process's) and `protocol` with every metric's own block under ``"metrics"`` (unchanged where none has one)."""
        row = self.compute(values)
        row["metric_seconds"] = {k: round(v, 2) for k, v in self.seconds.items()}
        blocks = self.protocols()
        row["protocol"] = {**protocol, "metrics": blocks} if blocks else protocol
        return row

    def protocols(self) -> dict[str, dict]:
        """name -> the protocol block of each measured metric that has one (its settings, feature space, weights)."""
        return {p.name: proto for p in (*self.parts, *self.groups) if (proto := p.protocol()) is not None}


def measure(evaluators, reference: Reference | None, prompts: list, image_chunks: Iterable[torch.Tensor],
            batch: int, metrics: list[str] | None = None, settings: dict | None = None) -> dict:
    """Every metric of images given in chunks of `batch` (in prompt order), on one process: `metrics` as a suite
    lists them (default: FID) less those that sample several seeds per prompt."""
    if metrics is not None:
        metrics = [m for m in metrics if m not in registry.declared() or "groups" not in registry.declared()[m]["needs"]]
    meter = CellMetrics(evaluators, prompts, reference, metrics, settings)
    for i, images in zip(range(0, len(prompts), batch), image_chunks):
        meter.update(images, prompts[i : i + batch])
    return {"n_samples": len(prompts), **meter.compute()}
