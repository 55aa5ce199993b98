"""What the distribution metrics share (KID, CMMD, FD-DINOv2, precision/recall/density/coverage): a feature space
of the evaluators, the reference's features in it, and a bootstrap that resamples prompts.

Each of these metrics keeps the per-sample features of one of ``Evaluators.feature_spaces()`` (gathered in sample
order, so no number depends on the batch size or the process count) and compares them with
``Reference.features_in(space)`` in float64. Its CI is a bias-centred percentile bootstrap, as FID's
(``bench.metrics.fid.bootstrap_fid``): BOOTSTRAP resamples of the generated rows (seed BOOTSTRAP_SEED), the
reference resampled with the same indices when it is paired with the prompts, else independently (seed
BOOTSTRAP_SEED + 1). Resampling with replacement duplicates rows, which moves every resampled value the same way
(kernel means and distances grow, neighbourhood counts shrink), so the interval's spread is kept and it is centred
on the point value (``centred_ci``).

The kernel metrics resample through the Gram matrices, made once: a resample that draws row i w_i times has
Σ_ij w_i w_j k_ij for its kernel sum (``resampled_mmd2``), so a resample costs O(n²), never a new kernel.
"""

from __future__ import annotations

import numpy as np
import torch

from bench.metrics.base import Metric
from bench.metrics.bootstrap import BOOTSTRAP, BOOTSTRAP_SEED, CI_LEVEL, index_chunks, percentile_ci
from bench.metrics.fid import bootstrap_reference
from core.errors import UserError

SPACES = {"shapes": ("fid", "clip"), "real": ("fid", "clip", "dinov2")}  # what each kind of evaluators can embed in


def counts(idx: np.ndarray, n: int) -> torch.Tensor:
    """Resamples as counts: [c, n] float64, row k counting how often each of n rows is drawn in idx[k] [n]."""
    idx = torch.from_numpy(idx)
    return torch.zeros(idx.shape[0], n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(idx.shape,
                                                                                             dtype=torch.float64))


def resampled_counts(ng: int, nr: int, paired: bool, b: int = BOOTSTRAP):
    """b resamples as (generated counts [c, ng], reference counts [c, nr]) chunk by chunk: the reference drawn with
    the generated rows' indices when `paired` (nr must equal ng: row i of both belongs to prompt i), else with its
    own (seed BOOTSTRAP_SEED + 1). The same draws as ``fid.resampled_fids``."""
    if paired and ng != nr:
        raise ValueError(f"a paired reference has one row per sample: {nr} rows for {ng} samples")
    chunk = max(1, 2**27 // (8 * max(ng, nr)))
    ir = None if paired else index_chunks(nr, b, BOOTSTRAP_SEED + 1, chunk)
    for ig in index_chunks(ng, b, BOOTSTRAP_SEED, chunk):
        wg = counts(ig, ng)
        yield wg, wg if ir is None else counts(next(ir), nr)


def kernel_sums(k: torch.Tensor, w: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_ij w_i k_ij v_j [c] of counts w [c, n], v [c, m] (v = w when None) and a kernel matrix k [n, m]."""
    return ((w @ k) * (w if v is None else v)).sum(1)


def mmd2(kgg: torch.Tensor, krr: torch.Tensor, kgr: torch.Tensor, unbiased: bool, wg: torch.Tensor | None = None,
         wr: torch.Tensor | None = None) -> torch.Tensor:
    """MMD² [c] of c weighted sets (counts wg [c, n_g], wr [c, n_r]) from the kernel matrices of all rows.

    Unbiased (Gretton et al. 2012, Eq. 3; KID's): the within-set means leave out the n pairs of a row with itself,
    Σ_{a≠b} k(x_a, x_b) = wᵀKw − Σ_i w_i k_ii over n(n−1) pairs. Biased (the V-statistic; CMMD's): all n² pairs.
    Without counts (None): the estimator on the sets themselves, [1].
    """
    wg = torch.ones(1, kgg.shape[0], dtype=kgg.dtype) if wg is None else wg
    wr = torch.ones(1, krr.shape[0], dtype=krr.dtype) if wr is None else wr
    ng, nr = wg.sum(1), wr.sum(1)
    sgg, srr = kernel_sums(kgg, wg), kernel_sums(krr, wr)
    if unbiased:
        sgg, srr = (sgg - wg @ kgg.diagonal()) / (ng * (ng - 1)), (srr - wr @ krr.diagonal()) / (nr * (nr - 1))
    else:
        sgg, srr = sgg / ng**2, srr / nr**2
    return sgg + srr - 2 * kernel_sums(kgr, wg, wr) / (ng * nr)


def resampled_mmd2(kgg, krr, kgr, paired: bool, unbiased: bool, b: int = BOOTSTRAP) -> np.ndarray:
    """b MMD² values [b] (float64) of resampled generated and reference sets (``resampled_counts``)."""
    return torch.cat([mmd2(kgg, krr, kgr, unbiased, wg, wr)
                      for wg, wr in resampled_counts(kgg.shape[0], krr.shape[0], paired, b)]).numpy()


def centred_ci(values: np.ndarray, point: float, low: float = -np.inf, high: float = np.inf) -> tuple[float, float]:
    """The CI_LEVEL percentile interval of bootstrap values moved to be centred on the point value (their mean
    shifted onto it, as ``bootstrap_fid``), clipped to [low, high] where the metric is bounded."""
    lo, hi = np.clip(percentile_ci(values - values.mean() + point), low, high)
    return float(lo), float(hi)


class DistributionMetric(Metric):
    """A metric of the cell's samples' features in one feature space against the reference's features in it.

    Subclasses have a ``Config`` with a ``space`` field; ``per_sample`` gives the features (float32 [n, width], as
    FID's), ``pair()`` the generated and reference features in float64 for ``compute``.
    """

    dtype = torch.float32
    min_samples = 2

    def setup(self):
        """The space's width (``reference`` may be None on processes that only feed features)."""
        spaces = self.evaluators.feature_spaces()
        if self.config.space not in spaces:
            raise UserError(f"metric {self.name!r}: the evaluators have no {self.config.space!r} feature space (they "
                            f"have {', '.join(sorted(spaces)) or 'none'})")
        self.width = int(spaces[self.config.space]["width"])

    @classmethod
    def check(cls, prompts, where, evaluators_kind, config=None):
        config = config if config is not None else cls.make_config({}, cls.name)
        known = SPACES.get(evaluators_kind, ())
        if config.space not in known:
            raise UserError(f"{cls.name}: space {config.space!r} is not one of the {evaluators_kind} evaluators' "
                            f"feature spaces ({', '.join(known)}); set [metrics.{cls.name}] space to one of them")
        if len(prompts) < cls.min_samples:
            raise UserError(f"{cls.name} needs at least {cls.min_samples} samples; samples = {len(prompts)}: give "
                            f"--samples {cls.min_samples} or more, or remove \"{cls.name}\" from metrics")

    def per_sample(self, images, prompts):
        return self.evaluators.features(self.config.space, images).float()

    def pair(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(generated features [N, w], reference features [n_r, w]) in float64."""
        return values.double(), self.reference.features_in(self.config.space).double()

    def space_protocol(self) -> dict:
        """The feature space (its network and weights' sha256), the reference and the CI method."""
        space = self.evaluators.feature_spaces()[self.config.space]
        paired = self.reference is not None and self.reference.paired
        return {"space": self.config.space, "network": space["network"], "sha256": space["sha256"],
                "width": space["width"], "dtype": "float64",
                "reference": None if self.reference is None else self.reference.identity(),
                "ci": {"method": "bias-centred percentile bootstrap over prompts", "resamples": BOOTSTRAP,
                       "level": CI_LEVEL, "seed": BOOTSTRAP_SEED, "reference": bootstrap_reference(paired)}}

