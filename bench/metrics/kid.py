"""KID (Bińkowski et al. 2018, "Demystifying MMD GANs"): the unbiased MMD² of a cubic polynomial kernel
k(x, y) = (xᵀy / d + 1)³ between generated and reference features, averaged over random subsets.

Reported ×10³ (the column "KID ×10³"), as StyleGAN2-ADA and most papers print it; torchmetrics and clean-fid return
the unscaled value. The point value is torchmetrics' ``KernelInceptionDistance`` (public API) fed precomputed
features through the identity extractor ``FeatureRows``: the mean over `subsets` subsets of `subset_size` rows of
each set, drawn from a fixed torch seed (KID_SEED), so the same features give the same KID every run. torchmetrics'
spread over subsets (``kid_subset_std``, ×10³) is stored beside it; it is not a CI (the subsets share rows). The CI
is the bias-centred percentile bootstrap of ``bench.metrics.distribution`` on the unbiased MMD² of the whole
resampled sets, the reference paired by prompt when it is paired.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from bench.metrics.distribution import DistributionMetric, centred_ci, resampled_mmd2
from bench.metrics.fid import FeatureRows
from bench.metrics.registry import register_metric
from core.errors import UserError

SCALE = 1000.0  # KID is reported ×10³
KID_SEED = 0  # torch seed of torchmetrics' subset draws
DEGREE, COEF = 3, 1.0  # k(x, y) = (γ xᵀy + coef)^degree, γ = 1/d


def poly_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """KID's kernel matrix (γ xᵀy + 1)³ with γ = 1/d, float64 [n_x, n_y]."""
    return (x @ y.T / x.shape[1] + COEF) ** DEGREE


def kid_subsets(gen: torch.Tensor, ref: torch.Tensor, subsets: int, subset_size: int) -> tuple[float, float]:
    """(mean, std) over subsets of torchmetrics' KernelInceptionDistance on features gen [n_g, d], ref [n_r, d]
    (unscaled), its subsets drawn from torch seed KID_SEED (the global generator's state is restored after)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    with warnings.catch_warnings():  # its notice that it keeps every feature: so do we, by design
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=FeatureRows(gen.shape[1]), subsets=subsets, subset_size=subset_size,
                                      degree=DEGREE, coef=COEF, sync_on_compute=False)
    kid.update(ref, real=True)
    kid.update(gen, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(KID_SEED)
        mean, std = kid.compute()
    return float(mean), float(std)


@register_metric("kid", order=50, needs=("reference",),
    source="Bińkowski et al. 2018 (Demystifying MMD GANs, ICLR); torchmetrics KernelInceptionDistance; ×10³ as StyleGAN2-ADA",
    weights="the evaluators' feature space (default fid: Inception at real scale, the attribute network embedded)",
    license="as the feature network",
    columns=(
    {"key": "kid", "header": "KID ×10³ ↓", "decimals": 2, "direction": "lower", "show_ci": True, "main": False,
     "title": "KID ×10³ ↓"},))
class KID(DistributionMetric):
    """KID ×10³ of a cell's samples against the reference in one feature space (default the FID network's)."""

    @dataclasses.dataclass
    class Config:
        space: str = "fid"  # the evaluators' feature space (Evaluators.feature_spaces)
        subset_size: int | None = None  # rows of each set per subset; None: min(1000, samples, reference images)
        subsets: int = 100

    @classmethod
    def check(cls, prompts, where, evaluators_kind, config=None):
        super().check(prompts, where, evaluators_kind, config)
        config = config if config is not None else cls.make_config({}, cls.name)
        if config.subsets < 1 or (config.subset_size is not None and not 2 <= config.subset_size <= len(prompts)):
            raise UserError(f"kid: subsets must be >= 1 and subset_size between 2 and the {len(prompts)} samples, got "
                            f"subsets = {config.subsets}, subset_size = {config.subset_size}")

    def subset_size(self, n_g: int, n_r: int) -> int:
        size = self.config.subset_size or min(1000, n_g, n_r)
        if size > min(n_g, n_r):
            raise UserError(f"kid: subset_size = {size} is more than the {n_g} samples or the {n_r} reference images")
        return size

    def subsets(self, size: int, n_g: int, n_r: int) -> int:
        """The subsets drawn: 1 when a subset holds every row of both sets (each draw is then the whole sets in another
        order, so their mean is that one value and more draws only cost time), else the setting."""
        return 1 if size == n_g == n_r else self.config.subsets

    def compute(self, values):
        gen, ref = self.pair(values)
        size = self.subset_size(len(gen), len(ref))
        mean, std = kid_subsets(gen, ref, self.subsets(size, len(gen), len(ref)), size)
        kid = SCALE * mean
        boot = SCALE * resampled_mmd2(poly_kernel(gen, gen), poly_kernel(ref, ref), poly_kernel(gen, ref),
                                      self.reference.paired, unbiased=True)
        lo, hi = centred_ci(boot, kid)
        return {"kid": kid, "kid_ci_low": lo, "kid_ci_high": hi, "kid_subset_std": SCALE * std}

    def protocol(self):
        return {**self.space_protocol(), "kernel": f"polynomial (xᵀy/d + {COEF})^{DEGREE}", "scale": SCALE,
                "estimator": "unbiased MMD² (torchmetrics KernelInceptionDistance), mean over subsets",
                "subsets": f"{self.config.subsets} (1 when a subset is the whole sets)",
                "subset_size": self.config.subset_size or "min(1000, n, n_ref)",
                "subset_seed": KID_SEED, "ci_statistic": "unbiased MMD² of the whole resampled sets"}
