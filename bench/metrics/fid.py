"""FID through torchmetrics' ``FrechetInceptionDistance`` (public API only), streamed over batches.

The evaluator's feature network runs per batch; the per-sample features [N, D] are kept (the CI
resamples them), gathered across processes in sample order, and fed to a torchmetrics FID whose
feature extractor is the identity (``FeatureRows``) and whose real-image state is the cached
reference, merged in with ``Metric.merge_state``. torchmetrics sums in float64 and computes the
Fréchet distance. The CI is a bias-centred percentile bootstrap over the generated set and the
reference together (``bootstrap_fid``): resampled pairs when the reference is paired with the prompts,
independent resamples when it is not.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.metrics.base import Metric, prompt_ids
from bench.metrics.registry import register_metric
from bench.metrics.bootstrap import BOOTSTRAP, BOOTSTRAP_SEED, index_chunks, percentile_ci
from core import io
from core.errors import UserError

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
    it goes into every result's protocol through ``identity()``. ``source["paired"]``: image i of the
    reference belongs to prompt i (renders, drawn COCO images, teacher samples), so the bootstrap
    resamples (generated, reference) pairs with one set of indices.
    """

    key: str
    source: dict
    states: dict[str, torch.Tensor]
    features: torch.Tensor  # [n, D] float64: the FID network's features
    spaces: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # the same images in other spaces

    def features_in(self, space: str) -> torch.Tensor:
        """The reference images' features [n, width] (float64) in one of the evaluators' feature spaces
        (``Evaluators.feature_spaces``); KeyError for a space the reference was not built in."""
        if space == "fid":
            return self.features
        if space not in self.spaces:
            raise KeyError(f"the reference has no {space!r} features (it has fid, {', '.join(sorted(self.spaces))})")
        return self.spaces[space]

    @property
    def n(self) -> int:
        return int(self.states["real_features_num_samples"])

    @property
    def num_features(self) -> int:
        return int(self.features.shape[1])

    @property
    def paired(self) -> bool:
        return bool(self.source.get("paired", False))

    def identity(self) -> dict:
        return {"key": self.key, "n": self.n, **self.source}


def cached_reference(key: str, source: dict, feature_chunks: Iterable[torch.Tensor | dict[str, torch.Tensor]],
                     num_features: int, cache_dir: Path | None, spaces: Iterable[str] = ()) -> Reference:
    """The reference for `key`: loaded from ``cache_dir/fid-ref`` when its sha256 checks and it holds every one of
    `spaces`, else built from `feature_chunks` (consumed only when building) and cached. A chunk is the real images'
    FID features [n, D], or {space: features [n, width]} with ``"fid"`` among them (``Evaluators.all_features``).
    A cache entry whose sha256 does not match, or that lacks a space, is rebuilt, never used. The FID statistics do
    not depend on the other spaces."""
    path = None if cache_dir is None else Path(cache_dir) / "fid-ref" / f"{key}.safetensors"
    ref = reference_cached(cache_dir, key, spaces)
    if ref is not None:
        return ref
    fid = new_fid(num_features)
    feats: dict[str, list[torch.Tensor]] = {}
    for f in feature_chunks:
        parts = f if isinstance(f, dict) else {"fid": f}
        fid.update(parts["fid"], real=True)
        for space, x in parts.items():
            feats.setdefault(space, []).append(x.double().cpu())
    states = {k: v.detach().cpu().clone() for k, v in fid.metric_state.items() if k in REAL_STATES}
    others = {s: torch.cat(x) for s, x in feats.items() if s != "fid"}
    ref = Reference(key, dict(source), states, torch.cat(feats["fid"]), others)
    if path is not None:
        digest = io.save_tensors(path, {**states, "features": ref.features,
                                        **{f"features.{s}": x for s, x in others.items()}})
        io.write_json(path.with_suffix(".json"), {"sha256": digest, "key": key, "n": ref.n, "source": source,
                                                  "spaces": ["fid", *sorted(others)]})
    return ref


def reference_cached(cache_dir: Path | None, key: str, spaces: Iterable[str] = ()) -> Reference | None:
    """The reference cached under `key` in ``cache_dir/fid-ref`` when present, its sha256 checks and it holds every
    one of `spaces`, else None."""
    path = None if cache_dir is None else Path(cache_dir) / "fid-ref" / f"{key}.safetensors"
    ref = _load_reference(path, key) if path is not None and path.exists() else None
    if ref is None or any(s != "fid" and s not in ref.spaces for s in spaces):
        return None
    return ref


def _load_reference(path: Path, key: str) -> Reference | None:
    """A cached reference, or None if it is corrupt (the caller rebuilds it)."""
    from safetensors.torch import load_file

    try:
        meta = json.loads(path.with_suffix(".json").read_text())
        if meta.get("sha256") != io.sha256_file(path):
            return None
        t = load_file(str(path))
        spaces = {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("features.")}
        return Reference(key, meta["source"], {k: t[k] for k in REAL_STATES}, t["features"], spaces)
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

KERNEL_BYTES = 2**28  # float64 working memory of one chunk of resamples


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

    The direct form, on d×d matrices (``GramKernel`` gives the same number from n×n matrices).
    """
    m = cov1_sqrt @ cov2.double() @ cov1_sqrt
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + tr1 + cov2.trace() - 2 * tr_sqrt)


def _counts(idx: np.ndarray, n: int, device) -> torch.Tensor:
    """Resamples as counts: [c, n] float64, row k counting how often each of n rows is drawn in idx[k] [n]."""
    idx = torch.from_numpy(idx).to(device)
    return torch.zeros(idx.shape[0], n, dtype=torch.float64, device=device).scatter_add_(
        1, idx, torch.ones(idx.shape, dtype=torch.float64, device=device))


def _weighted_stats(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(means [c, d], covariances [c, d, d]) of c resamples of the rows of x [n, d], row i repeated w[k, i] times
    (counts [c, n], Σ_i w[k, i] = n). Only rows some resample draws enter the O(n·d²) products (for one
    resample, about 63 % of them)."""
    s = (w > 0).any(0)
    x, w = x[s], w[:, s]
    n = w.sum(1)[:, None, None]
    mu = w @ x / n[:, :, 0]
    y = x[None] * w.sqrt()[:, :, None]
    return mu, (y.mT @ y - n * mu[:, :, None] * mu[:, None, :]) / (n - 1)


def _factor(cov: torch.Tensor) -> torch.Tensor:
    """L with L Lᵀ = Σ for PSD matrices [..., d, d]: the Cholesky factor (O(d³/3)), or Σ's symmetric root where
    Σ is singular."""
    factor, info = torch.linalg.cholesky_ex(cov)
    bad = info != 0
    if bad.any():
        w, v = torch.linalg.eigh(cov[bad])
        factor[bad] = (v * w.clamp(min=0).sqrt()[..., None, :]) @ v.mT
    return factor


class CovarianceKernel:
    """Fréchet distances of resampled feature sets from d×d covariances (the cheaper form when n >= d).

    Tr (Σr½ Σg Σr½)½ = Σ √eig(Lᵀ Σg L) for any L with L Lᵀ = Σr (both matrices have the eigenvalues of Σg Σr). Per
    resample: the weighted covariances (O(n·d²)), a Cholesky factor of Σr (unless the reference is held fixed)
    and the eigenvalues of Lᵀ Σg L (O(d³)); float64 on the features' device, resamples batched.
    """

    def __init__(self, gen: torch.Tensor, ref: torch.Tensor):
        self.gen, self.ref = gen, ref
        mu, cov = gaussian_stats(ref)
        self.fixed = (mu, cov, _factor(cov))
        self.bytes = 8 * ((gen.shape[0] + ref.shape[0]) * gen.shape[1] + 6 * gen.shape[1] ** 2)  # per resample

    def __call__(self, wg: torch.Tensor, wr: torch.Tensor | None) -> torch.Tensor:
        """FDs [c] of the generated rows drawn wg [c, n_g] times against the reference rows drawn wr [c, n_r] times
        (float64 counts), or against the whole reference when wr is None."""
        mu_g, cov_g = _weighted_stats(self.gen, wg)
        if wr is None:
            mu_r, cov_r, factor = self.fixed
            tr_r = cov_r.trace()
        else:
            mu_r, cov_r = _weighted_stats(self.ref, wr)
            factor, tr_r = _factor(cov_r), cov_r.diagonal(dim1=-2, dim2=-1).sum(-1)
        m = factor.mT @ cov_g @ factor
        tr_sqrt = torch.linalg.eigvalsh((m + m.mT) / 2).clamp(min=0).sqrt().sum(-1)
        return (mu_g - mu_r).pow(2).sum(-1) + tr_r + cov_g.diagonal(dim1=-2, dim2=-1).sum(-1) - 2 * tr_sqrt


class GramKernel:
    """Fréchet distances of resampled feature sets from Gram matrices (the cheaper form when n < d: O(n³), not O(d³)).

    With Ag, Ar the centred rows of a resample (Σ = AᵀA/(n−1)), the nonzero eigenvalues of Σr½ Σg Σr½ are the
    squared singular values of Ag Arᵀ / √((ng−1)(nr−1)), so Tr (Σr½ Σg Σr½)½ = ‖Ag Arᵀ‖_* / √((ng−1)(nr−1)).
    A resample repeats row i w_i times; Ag Arᵀ then has the nonzero singular values of Wg½ Cg Crᵀ Wr½ over the
    drawn rows (C: rows centred on the resample's mean, W: the counts), whose square is taken on the smaller
    side. Means and traces come from the same Gram matrices Xg Xgᵀ, Xr Xrᵀ, Xg Xrᵀ, made once.
    """

    def __init__(self, gen: torch.Tensor, ref: torch.Tensor):
        self.kgg, self.krr, self.kgr = gen @ gen.T, ref @ ref.T, gen @ ref.T
        self.ones = torch.ones(1, ref.shape[0], dtype=ref.dtype, device=ref.device)
        ng, nr = gen.shape[0], ref.shape[0]
        self.bytes = 8 * (3 * ng * nr + 2 * min(ng, nr) ** 2 + ng * ng + nr * nr)  # per resample

    @staticmethod
    def _moments(k: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖μ‖², Tr Σ) [c] of the resamples w [c, n] (counts), from the rows' Gram matrix k [n, n]."""
        s = (w > 0).any(0)
        w, n = w[:, s], w.sum(1)
        sq = ((w @ k[s][:, s]) * w).sum(1) / n**2
        return sq, (w @ k.diagonal()[s] - n * sq) / (n - 1)

    def __call__(self, wg: torch.Tensor, wr: torch.Tensor | None) -> torch.Tensor:
        """FDs [c] of the generated rows drawn wg [c, n_g] times against the reference rows drawn wr [c, n_r] times
        (float64 counts), or against the whole reference when wr is None."""
        wr = self.ones.expand(len(wg), -1) if wr is None else wr
        sg, sr = (wg > 0).any(0), (wr > 0).any(0)
        a, b, k = wg[:, sg], wr[:, sr], self.kgr[sg][:, sr]
        ng, nr = a.sum(1)[:, None, None], b.sum(1)[:, None, None]
        mu_gr = ((a @ k) * b).sum(1)[:, None, None] / (ng * nr)  # μgᵀμr
        c = k - (b @ k.T)[:, :, None] / nr - (a @ k)[:, None, :] / ng + mu_gr  # Cg Crᵀ over the drawn rows
        c = a.sqrt()[:, :, None] * c * b.sqrt()[:, None, :]
        p = c @ c.mT if c.shape[1] <= c.shape[2] else c.mT @ c
        nuclear = torch.linalg.eigvalsh(p).clamp(min=0).sqrt().sum(-1) / ((ng - 1) * (nr - 1)).sqrt().flatten()
        (sq_g, tr_g), (sq_r, tr_r) = self._moments(self.kgg, wg), self._moments(self.krr, wr)
        return sq_g + sq_r - 2 * mu_gr.flatten() + tr_g + tr_r - 2 * nuclear


DISTINCT = 1 - math.exp(-1)  # the share of rows a resample of n rows draws at least once (n → ∞): 63.2 %


def fid_kernel(gen: torch.Tensor, ref: torch.Tensor) -> CovarianceKernel | GramKernel:
    """The cheaper exact kernel for features gen [n_g, d], ref [n_r, d] (float64): Gram when a resample's distinct
    rows (about 63 % of n) are fewer than the features, so that its covariances are singular anyway (no Cholesky
    factor; n³ < d³), else covariances. Both give the same numbers."""
    n = max(gen.shape[0], ref.shape[0])
    return GramKernel(gen, ref) if DISTINCT * n < gen.shape[1] else CovarianceKernel(gen, ref)


def resampled_fids(gen: torch.Tensor, ref: torch.Tensor, reference: str, b: int = BOOTSTRAP,
                   device: str | torch.device = "cpu") -> np.ndarray:
    """b Fréchet distances [b] (float64) of resampled feature sets gen [n_g, d] and ref [n_r, d].

    The generated rows are resampled with replacement (``index_chunks``, seed BOOTSTRAP_SEED); `reference`:
    ``paired`` resamples the reference with the same indices (n_r must equal n_g: row i of both belongs to
    prompt i), ``independent`` with its own (seed BOOTSTRAP_SEED + 1), ``fixed`` keeps it whole. Features are
    centred on the reference mean first (FD is shift-invariant; float64 then loses less), on `device`; the
    resamples go through the kernel in chunks of KERNEL_BYTES of working memory (a function of n and d only).
    """
    if reference not in ("paired", "independent", "fixed"):
        raise ValueError(f"reference must be paired, independent or fixed, got {reference!r}")
    ng, nr = gen.shape[0], ref.shape[0]
    if reference == "paired" and ng != nr:
        raise ValueError(f"a paired reference has one row per sample: {nr} rows for {ng} samples")
    shift = ref.double().mean(0)
    gen, ref = (gen.double() - shift).to(device), (ref.double() - shift).to(device)
    kernel = fid_kernel(gen, ref)
    chunk = max(1, KERNEL_BYTES // kernel.bytes)
    ir_chunks = index_chunks(nr, b, BOOTSTRAP_SEED + 1, chunk) if reference == "independent" else None
    out = []
    for ig in index_chunks(ng, b, BOOTSTRAP_SEED, chunk):
        wg = _counts(ig, ng, device)
        wr = wg if reference == "paired" else None if ir_chunks is None else _counts(next(ir_chunks), nr, device)
        out.append(kernel(wg, wr).cpu())
    return torch.cat(out).numpy()


def bootstrap_fid(features: torch.Tensor, ref: Reference, fid: float, device: str | torch.device = "cpu"
                  ) -> tuple[float, float]:
    """CI_LEVEL interval of FID over BOOTSTRAP resamples of the generated set and the reference together.

    The reference's variance counts: a reference paired with the prompts is resampled with the generated set's
    indices, any other reference independently. Resampling with replacement duplicates samples, which inflates
    every resampled FID; the percentile interval is therefore centred on the point value (bias-centred
    percentile bootstrap) and clipped at 0.
    """
    vals = resampled_fids(features, ref.features, "paired" if ref.paired else "independent", BOOTSTRAP, device)
    lo, hi = percentile_ci(vals - vals.mean() + fid)
    return max(lo, 0.0), hi


def bootstrap_reference(paired: bool) -> str:
    """How the FID bootstrap treats the reference, in words (stored in every row's protocol)."""
    return ("resampled with the generated samples' indices (paired by prompt)" if paired
            else "resampled independently of the generated samples")


@register_metric(
    "fid", order=10, needs=("reference",),
    source="Heusel et al. 2017 (TTUR, NeurIPS); torchmetrics FrechetInceptionDistance; clean-fid's resize (Parmar et al. "
           "2022)",
    weights="real scale: clean-fid's Inception (inception-2015-12-05.pt, pool3, 2048-d); embedded: the shipped attribute "
            "network's penultimate layer (64-d)",
    license="Inception: Apache-2.0 (TensorFlow models); embedded: this repository's (Apache-2.0)",
    columns=(
    {"key": "fid", "header": "FID ↓", "decimals": 2, "direction": "lower", "show_ci": True, "gate_floor": 0.05,
     "title": "FID ↓", "plot": True},))
class FID(Metric):
    """FID of a cell's samples against a reference (Heusel et al. 2017): per-sample features of the evaluators'
    feature network, then torchmetrics' FID; a bootstrap CI (``bootstrap_fid``)."""

    dtype = torch.float32

    def setup(self):
        """``reference`` may be None on processes that only feed features (``compute`` needs it)."""
        self.width = self.evaluators.num_features

    @classmethod
    def check(cls, prompts, where, evaluators_kind, config=None):
        n = len(prompts)
        if n < 2:
            raise UserError(f"FID needs at least 2 samples (a covariance); samples = {n}: give --samples 2 or more, "
                            "or remove \"fid\" from metrics")
        lacking = [p for p in prompts if p.scene_seed is None or p.objects is None]
        if evaluators_kind == "shapes" and lacking:
            raise UserError(f"fid in the embedded world compares with real renders of each prompt's scene, and "
                            f"{len(lacking)} of {n} prompts of {where!r} have no ground-truth scene "
                            f"({prompt_ids(lacking)}); use a shapes prompt set (shapes-eval, shapes-val) or remove "
                            "\"fid\" from metrics")

    def per_sample(self, images, prompts):
        return self.evaluators.fid_features(images).float()

    def compute(self, values):
        fid = fid_value(values, self.reference)
        lo, hi = bootstrap_fid(values.double(), self.reference, fid, self.evaluators.device)
        return {"fid": fid, "fid_ci_low": lo, "fid_ci_high": hi}
