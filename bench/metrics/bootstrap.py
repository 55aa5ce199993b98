"""Percentile bootstrap CIs over samples, with a fixed resampling seed (the same resamples every run)."""

from __future__ import annotations

import numpy as np

BOOTSTRAP = 200  # resamples
FID_BOOTSTRAP_WIDE = 30  # resamples of FID's CI when features are wider than 256 (Inception): each costs an eigh
CI_LEVEL = 0.95
BOOTSTRAP_SEED = 1234


def indices(n: int, b: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """[b, n] int64: b resamples of n indices with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(b, n))


def percentile_ci(values: np.ndarray) -> tuple[float, float]:
    """The CI_LEVEL percentile interval of bootstrap values."""
    lo, hi = np.percentile(values, [100 * (1 - CI_LEVEL) / 2, 100 * (1 + CI_LEVEL) / 2])
    return float(lo), float(hi)


def bootstrap_mean(x: np.ndarray) -> tuple[float, float, float]:
    """(mean, CI low, CI high) of per-sample values x [n] (float64)."""
    idx = indices(len(x))
    return float(np.mean(x)), *percentile_ci(x[idx].mean(1))


def bootstrap_ratio(num: np.ndarray, den: np.ndarray) -> tuple[float, float, float]:
    """(Σnum/Σden, CI low, CI high) of a ratio of per-sample sums (e.g. correct checks / checks)."""
    idx = indices(len(num))
    return float(num.sum() / den.sum()), *percentile_ci(num[idx].sum(1) / den[idx].sum(1))
