"""All the metrics of one cell, fed batch by batch: what the runner and the real-vs-real floor use."""

from __future__ import annotations

from collections.abc import Callable, Iterable

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
        self.parts = [cls(evaluators, prompts, reference, cls.make_config(settings.get(cls.name, {}), cls.name))
                      for cls in registry.measured(metrics) if cls.applies(evaluators, prompts)]
        self.device = evaluators.device

    def update(self, images: torch.Tensor, prompts: list) -> None:
        images = images.to(self.device)
        with torch.no_grad():
            for part in self.parts:
                part.update(images, prompts)

    def gather(self, fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[torch.Tensor]:
        return [part.local() if fn is None else fn(part.local()) for part in self.parts]

    def compute(self, values: list[torch.Tensor] | None = None) -> dict:
        """Every metric and its CI (results-row fields) from the gathered values (default: this process's)."""
        values = self.gather() if values is None else values
        row = {}
        for part, v in zip(self.parts, values):
            row.update(part.compute(v))
            if (proto := part.protocol()) is not None:  # what moves this metric's numbers (weights' sha256, ...)
                row.setdefault("metric_protocols", {})[part.name] = proto
        return row


def measure(evaluators, reference: Reference | None, prompts: list, image_chunks: Iterable[torch.Tensor],
            batch: int) -> dict:
    """Every metric of images given in chunks of `batch` (in prompt order), on one process."""
    meter = CellMetrics(evaluators, prompts, reference)
    for i, images in zip(range(0, len(prompts), batch), image_chunks):
        meter.update(images, prompts[i : i + batch])
    return {"n_samples": len(prompts), **meter.compute()}
