"""CMMD (Jayasumana et al. 2024, "Rethinking FID: Towards a Better Evaluation Metric for Image Generation"):
1000 · MMD² with a Gaussian RBF kernel of bandwidth σ = 10 between CLIP image embeddings.

As the reference code (google-research/cmmd, ``distance.py``): k(x, y) = exp(−γ‖x − y‖²), γ = 1/(2σ²), σ = 10,
and the biased estimator (the V-statistic: every pair, a row with itself included) mean k_xx + mean k_yy
− 2 mean k_xy, scaled by 1000; its embeddings are L2-normalised CLIP image embeddings (ViT-L/14@336 in the paper),
the evaluators' ``clip`` space here. Computed in float64 from the Gram matrices. The CI is the bias-centred
percentile bootstrap of ``bench.metrics.distribution`` on the same estimator.
"""

from __future__ import annotations

import dataclasses

import torch

from bench.metrics.distribution import DistributionMetric, centred_ci, mmd2, resampled_mmd2
from bench.metrics.registry import register_metric

SIGMA = 10.0  # the RBF bandwidth of the reference code
SCALE = 1000.0  # the reference code's scale


def rbf_kernel(x: torch.Tensor, y: torch.Tensor, sigma: float = SIGMA) -> torch.Tensor:
    """exp(−‖x − y‖² / (2σ²)) [n_x, n_y] in float64, ‖x − y‖² = ‖x‖² + ‖y‖² − 2xᵀy as the reference code."""
    x, y = x.double(), y.double()
    d2 = x.pow(2).sum(1)[:, None] + y.pow(2).sum(1)[None, :] - 2 * x @ y.T
    return torch.exp(-d2 / (2 * sigma**2))


def cmmd(x: torch.Tensor, y: torch.Tensor, sigma: float = SIGMA) -> float:
    """SCALE · biased MMD² (all pairs) of embeddings x [n, d], y [m, d] under the RBF kernel of bandwidth σ."""
    return SCALE * float(mmd2(rbf_kernel(x, x, sigma), rbf_kernel(y, y, sigma), rbf_kernel(x, y, sigma), False))


@register_metric("cmmd", order=51, needs=("reference",),
    source="Jayasumana et al. 2024 (Rethinking FID, CVPR); google-research/cmmd distance.py (σ = 10, ×1000)",
    weights="CLIP image embeddings (ViT-L/14@336 in the paper; the evaluators' CLIP model here, recorded)",
    license="as the CLIP weights (OpenAI CLIP: MIT)",
    columns=(
    {"key": "cmmd", "header": "CMMD ↓", "decimals": 3, "direction": "lower", "show_ci": True, "main": False,
     "title": "CMMD ↓"},))
class CMMD(DistributionMetric):
    """CMMD of a cell's samples against the reference in the CLIP image space (by default)."""

    @dataclasses.dataclass
    class Config:
        space: str = "clip"  # the evaluators' feature space (Evaluators.feature_spaces)

    def compute(self, values):
        gen, ref = self.pair(values)
        kgg, krr, kgr = rbf_kernel(gen, gen), rbf_kernel(ref, ref), rbf_kernel(gen, ref)
        value = SCALE * float(mmd2(kgg, krr, kgr, unbiased=False))
        lo, hi = centred_ci(SCALE * resampled_mmd2(kgg, krr, kgr, self.reference.paired, unbiased=False), value,
                            low=0.0)
        return {"cmmd": value, "cmmd_ci_low": lo, "cmmd_ci_high": hi}

    def protocol(self):
        return {**self.space_protocol(), "kernel": f"Gaussian RBF exp(-||x-y||^2 / (2 sigma^2)), sigma = {SIGMA}",
                "estimator": "biased MMD² (all pairs; google-research/cmmd distance.py)", "scale": SCALE}
