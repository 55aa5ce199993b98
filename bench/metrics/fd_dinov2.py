"""FD-DINOv2 (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics and their unfair treatment
of diffusion models"; layer6ai-labs/dgm-eval): the Fréchet distance of FID computed on DINOv2 ViT-L/14 features.

The features are the evaluators' ``dinov2`` space (``bench.real.Dinov2Features``: the CLS token after the final
layer norm at 224×224, bicubic resize and ImageNet normalisation, as dgm-eval); the distance is torchmetrics'
Fréchet distance (``fid.new_fid`` over precomputed features, float64 sums) and the CI FID's bias-centred bootstrap
over the generated set and the reference together (``fid.resampled_fids``: paired by prompt when the reference is
paired). A real-scale metric: the embedded world has no DINOv2.
"""

from __future__ import annotations

import dataclasses

from bench.metrics.distribution import DistributionMetric, centred_ci
from bench.metrics.fid import new_fid, resampled_fids
from bench.metrics.registry import register_metric
from core.errors import UserError


def frechet(gen, ref) -> float:
    """The Fréchet distance of features gen [N, d] and ref [n, d] by torchmetrics' FID (identity extractor)."""
    fd = new_fid(gen.shape[1])
    fd.update(ref, real=True)
    fd.update(gen, real=False)
    return float(fd.compute())


@register_metric("fd_dinov2", order=52, needs=("reference",),
    source="Stein et al. 2023 (Exposing flaws of generative model evaluation metrics, NeurIPS; dgm-eval)",
    weights="a local transformers Dinov2Model ([evaluators] dinov2), CLS token after the final layer norm, 224 px",
    license="DINOv2 weights: Apache-2.0",
    columns=(
    {"key": "fd_dinov2", "header": "FD-DINOv2 ↓", "decimals": 1, "direction": "lower", "show_ci": True,
     "main": False, "title": "FD-DINOv2 ↓"},))
class FDDinov2(DistributionMetric):
    """The Fréchet distance of a cell's samples and the reference in the DINOv2 feature space."""

    @dataclasses.dataclass
    class Config:
        space: str = "dinov2"  # the evaluators' feature space (Evaluators.feature_spaces)

    @classmethod
    def check(cls, prompts, where, evaluators_kind, config=None):
        if evaluators_kind == "shapes":
            raise UserError("fd_dinov2 is a real-scale metric (DINOv2 ViT-L/14 features); the embedded evaluators have "
                            "no DINOv2: use [evaluators] kind = \"real\" with dinov2 = a Dinov2Model directory, or "
                            "remove \"fd_dinov2\" from metrics")
        super().check(prompts, where, evaluators_kind, config)

    def compute(self, values):
        gen, ref = self.pair(values)
        fd = frechet(gen, ref)
        vals = resampled_fids(gen, ref, "paired" if self.reference.paired else "independent",
                              device=self.evaluators.device)
        lo, hi = centred_ci(vals, fd, low=0.0)
        return {"fd_dinov2": fd, "fd_dinov2_ci_low": lo, "fd_dinov2_ci_high": hi}

    def protocol(self):
        return {**self.space_protocol(), "distance": "Fréchet distance (torchmetrics FrechetInceptionDistance on "
                                                     "precomputed features)",
                "ci_kernel": "exact Fréchet distance per resample (fid.resampled_fids)"}
