"""FID through torchmetrics' ``FrechetInceptionDistance`` (public API only), streamed over batches.

The evaluator's feature network runs per batch; the per-sample features [N, D] are kept (the CI
resamples them), gathered across processes in sample order, and fed to a torchmetrics FID whose
feature extractor is the identity (``FeatureRows``) and whose real-image state is the cached
reference, merged in with ``Metric.merge_state``. torchmetrics sums in float64 and computes the
Fréchet distance. The CI is a bias-centred percentile bootstrap over the generated set with the
reference held fixed (``bootstrap_fid``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.metrics.base import Accumulator
from bench.metrics.bootstrap import BOOTSTRAP, FID_BOOTSTRAP_WIDE, indices, percentile_ci
from core import io

REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


class FeatureRows(nn.Module):
    """The identity as torchmetrics' FID feature extractor: its inputs are already features [n, D]."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features  # read by FrechetInceptionDistance instead of probing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def new_fid(num_features: int):
    """A torchmetrics FrechetInceptionDistance over precomputed features of width `num_features`."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=FeatureRows(num_features), reset_real_features=False,
                                    sync_on_compute=False)


@dataclasses.dataclass
class Reference:
    """Real-image statistics for FID: torchmetrics' real-feature state plus the per-image features.

    ``source`` says what the real images are (renders of the prompts, or a folder and its hash);
    it goes into every result's protocol through ``identity()``.
    """

    key: str
    source: dict
    states: dict[str, torch.Tensor]
    features: torch.Tensor  # [n, D] float64

    @property
    def n(self) -> int:
        return int(self.states["real_features_num_samples"])

    @property
    def num_features(self) -> int:
        return int(self.features.shape[1])

    def identity(self) -> dict:
        return {"key": self.key, "n": self.n, **self.source}


def cached_reference(key: str, source: dict, feature_chunks: Iterable[torch.Tensor], num_features: int,
                     cache_dir: Path | None) -> Reference:
    """The reference for `key`: loaded from ``cache_dir/fid-ref`` when its sha256 checks, else built from
    `feature_chunks` (an iterable of real-image features [n, D], consumed only when building) and cached.
    A cache entry whose sha256 does not match is rebuilt, never used."""
    path = None if cache_dir is None else Path(cache_dir) / "fid-ref" / f"{key}.safetensors"
    if path is not None and path.exists():
        ref = _load_reference(path, key)
        if ref is not None:
            return ref
    fid = new_fid(num_features)
    feats = []
    for f in feature_chunks:
        fid.update(f, real=True)
        feats.append(f.double().cpu())
    states = {k: v.detach().cpu().clone() for k, v in fid.metric_state.items() if k in REAL_STATES}
    ref = Reference(key, dict(source), states, torch.cat(feats))
    if path is not None:
        digest = io.save_tensors(path, {**states, "features": ref.features})
        io.write_json(path.with_suffix(".json"), {"sha256": digest, "key": key, "n": ref.n, "source": source})
    return ref


def _load_reference(path: Path, key: str) -> Reference | None:
    """A cached reference, or None if it is corrupt (the caller rebuilds it)."""
    from safetensors.torch import load_file

    try:
        meta = json.loads(path.with_suffix(".json").read_text())
        if meta.get("sha256") != io.sha256_file(path):
            return None
        t = load_file(str(path))
        return Reference(key, meta["source"], {k: t[k] for k in REAL_STATES}, t["features"])
    except (OSError, ValueError, KeyError):
        return None


def fid_value(features: torch.Tensor, ref: Reference) -> float:
    """FID of generated features [N, D] (sample order) against the reference, by torchmetrics."""
    fid = new_fid(ref.num_features)
    d = ref.num_features
    fid.merge_state({**ref.states, "fake_features_sum": torch.zeros(d, dtype=torch.float64),
                     "fake_features_cov_sum": torch.zeros(d, d, dtype=torch.float64),
                     "fake_features_num_samples": torch.tensor(0)})
    fid.update(features, real=False)
    return float(fid.compute())


# --- the bootstrap CI ---------------------------------------------------------------------------


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], covariance [D, D]) in float64 of features [n, D]."""
    x = features.double()
    return x.mean(0), torch.cov(x.T)


def psd_sqrt(cov: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a PSD matrix (negative eigenvalues clamped to 0), float64."""
    w, v = torch.linalg.eigh(cov.double())
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1, cov1_sqrt, tr1: float, mu2, cov2) -> float:
    """The Fréchet distance ‖μ1−μ2‖² + Tr Σ1 + Tr Σ2 − 2 Tr (Σ1½ Σ2 Σ1½)½ (Dowson & Landau), with Σ1½ given.

    Symmetric eigenvalues only, so a bootstrap over 2048-d Inception features stays affordable.
    """
    m = cov1_sqrt @ cov2.double() @ cov1_sqrt
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + tr1 + cov2.trace() - 2 * tr_sqrt)


def bootstrap_fid(features: torch.Tensor, ref: Reference, fid: float) -> tuple[float, float]:
    """CI of FID over resamplings of the generated set (the reference statistics held fixed).

    Resampling with replacement duplicates samples, which inflates every resampled FID; the
    percentile interval is therefore centred on the point value (bias-centred percentile bootstrap).
    Wide features (Inception, 2048-d) get fewer resamples (FID_BOOTSTRAP_WIDE): each costs an eigh.
    """
    s = ref.states
    n = s["real_features_num_samples"].double()
    mu_r = s["real_features_sum"] / n
    cov_r = (s["real_features_cov_sum"] - n * torch.outer(mu_r, mu_r)) / (n - 1)
    root, tr_r = psd_sqrt(cov_r), float(cov_r.trace())
    b = BOOTSTRAP if features.shape[1] <= 256 else FID_BOOTSTRAP_WIDE
    vals = []
    for idx in indices(features.shape[0], b):
        mu, cov = gaussian_stats(features[torch.from_numpy(idx)])
        vals.append(frechet_distance(mu_r, root, tr_r, mu, cov))
    vals = np.asarray(vals)
    lo, hi = percentile_ci(vals - vals.mean() + fid)
    return max(lo, 0.0), hi


def bootstrap_resamples(num_features: int) -> int:
    return BOOTSTRAP if num_features <= 256 else FID_BOOTSTRAP_WIDE


class FID(Accumulator):
    """FID of a cell's samples against a reference: per-sample features, then torchmetrics' FID."""

    dtype = torch.float32

    def __init__(self, evaluators, reference: Reference | None):
        """`reference` may be None on processes that only feed features (``compute`` needs it)."""
        super().__init__()
        self.evaluators, self.reference = evaluators, reference
        self.width = evaluators.num_features

    def per_sample(self, images, prompts):
        return self.evaluators.fid_features(images).float()

    def compute(self, values):
        fid = fid_value(values, self.reference)
        lo, hi = bootstrap_fid(values.double(), self.reference, fid)
        return {"fid": fid, "fid_ci_low": lo, "fid_ci_high": hi}
