"""Percentile bootstrap CIs over samples, with a fixed resampling seed (the same resamples every run).

1000 resamples put 25 values beyond each end of a 95 % interval, so its ends are percentiles rather than the
sample's extremes (at 30 resamples the 2.5 % and 97.5 % percentiles are interpolations of the minimum and
maximum). FID's CI uses the same count (``bench.metrics.fid.bootstrap_fid``), each resample made cheap by the
Gram or covariance kernel that suits the feature width.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

BOOTSTRAP = 1000  # resamples of every CI: means, ratios and FID
CI_LEVEL = 0.95
BOOTSTRAP_SEED = 1234  # the generated samples' resamples; an independent reference's: BOOTSTRAP_SEED + 1
INDEX_BYTES = 2**27  # resample indices are drawn in chunks of at most this many bytes (int64)


def index_chunks(n: int, b: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED, chunk: int | None = None
                 ) -> Iterator[np.ndarray]:
    """b resamples of n indices with replacement, as int64 arrays [c, n] of c <= `chunk` resamples each.

    One ``default_rng(seed)`` stream drawn chunk after chunk: the concatenated chunks are
    ``default_rng(seed).integers(0, n, size=(b, n))`` whatever the chunk size.
    """
    chunk = chunk or max(1, INDEX_BYTES // (8 * n))
    rng = np.random.default_rng(seed)
    for start in range(0, b, chunk):
        yield rng.integers(0, n, size=(min(chunk, b - start), n))


def indices(n: int, b: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """[b, n] int64: b resamples of n indices with replacement (all at once: for small n)."""
    return np.random.default_rng(seed).integers(0, n, size=(b, n))


def percentile_ci(values: np.ndarray) -> tuple[float, float]:
    """The CI_LEVEL percentile interval of bootstrap values."""
    lo, hi = np.percentile(values, [100 * (1 - CI_LEVEL) / 2, 100 * (1 + CI_LEVEL) / 2])
    return float(lo), float(hi)


def bootstrap_mean(x: np.ndarray) -> tuple[float, float, float]:
    """(mean, CI low, CI high) of per-sample values x [n] (float64)."""
    means = np.concatenate([x[idx].mean(1) for idx in index_chunks(len(x))])
    return float(np.mean(x)), *percentile_ci(means)


def bootstrap_ratio(num: np.ndarray, den: np.ndarray) -> tuple[float, float, float]:
    """(Σnum/Σden, CI low, CI high) of a ratio of per-sample sums (e.g. correct checks / checks)."""
    ratios = np.concatenate([num[idx].sum(1) / den[idx].sum(1) for idx in index_chunks(len(num))])
    return float(num.sum() / den.sum()), *percentile_ci(ratios)
