"""Metrics with their protocol attached.

* FID through torchmetrics' ``FrechetInceptionDistance`` with a custom feature network, against
  reference statistics of real renders of the same prompts (cached by content hash).
* CLIP score 100·max(cos, 0) per image, averaged.
* Compositional accuracy per attribute type and per whole prompt (shapes world: exact ground truth).
* Colour statistics: mean saturation, contrast (luminance std), brightness.
Every metric gets a percentile bootstrap CI over samples (fixed resampling seed). FID bootstrap
resamples the generated features and reuses torchmetrics' own Fréchet kernel.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from bench import io, world

BOOTSTRAP = 200
FID_BOOTSTRAP_WIDE = 30  # resamples of FID's CI when features are wider than 256 (Inception)
CI_LEVEL = 0.95
BOOTSTRAP_SEED = 1234
ATTRIBUTES = ("color", "shape", "size", "position", "count")
HIGHER_IS_BETTER = {
    "fid": False, "clip_score": True, "accuracy": True, "saturation": None, "contrast": None, "brightness": None,
    **{f"acc_{a}": True for a in ATTRIBUTES},
}


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Fréchet distance between two Gaussians (torchmetrics' kernel, float64)."""
    from torchmetrics.image.fid import _compute_fid

    f = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    return float(_compute_fid(f(mu1), f(sigma1), f(mu2), f(sigma2)))


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = features.double()
    return x.mean(0), torch.cov(x.T)


def new_fid(feature_net) -> torch.nn.Module:
    from torchmetrics.image.fid import FrechetInceptionDistance

    # samples are gathered to process 0 before metrics, so the metric itself never syncs across processes
    return FrechetInceptionDistance(feature=feature_net, normalize=True, reset_real_features=False,
                                    sync_on_compute=False)


_REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


@dataclasses.dataclass
class Reference:
    """Real-image statistics for FID: the torchmetrics state plus per-image features."""

    key: str
    states: dict[str, torch.Tensor]
    features: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.states["real_features_num_samples"])


def reference_key(prompts, evaluator_id: dict, variant: int = 0) -> str:
    ids = [(p.id, p.scene_seed) for p in prompts]
    return io.content_hash({"prompts": ids, "evaluators": evaluator_id, "variant": variant,
                            "resolution": world.RESOLUTION})


def real_images(prompts, variant: int = 0) -> torch.Tensor:
    scenes = [p.scene for p in prompts]
    if any(s is None for s in scenes):
        raise ValueError("FID reference needs prompts with ground-truth scenes (shapes world)")
    return world.render(scenes, variant=variant)


def build_reference(prompts, feature_net, evaluator_id: dict, cache_dir: Path | None, variant: int = 0,
                    batch: int = 500) -> Reference:
    """Reference statistics of real renders of these prompts; loaded from cache when the hash matches."""
    key = reference_key(prompts, evaluator_id, variant)
    chunks = (real_images(prompts[i : i + batch], variant) for i in range(0, len(prompts), batch))
    return cached_reference(key, chunks, feature_net, cache_dir)


def cached_reference(key: str, image_chunks, feature_net, cache_dir: Path | None) -> Reference:
    """FID reference state from image chunks (iterable of [n, 3, H, W] in [0, 1]), cached under `key`.

    A cache entry whose sha256 does not match is rebuilt, never used.
    """
    path = None if cache_dir is None else Path(cache_dir) / "fid-ref" / f"{key}.safetensors"
    if path is not None and path.exists():
        ref = _load_reference(path, key)
        if ref is not None:
            return ref
    fid = new_fid(feature_net)
    feats = []
    with torch.no_grad():
        for imgs in image_chunks:
            imgs = imgs.to(_device(feature_net))
            fid.update(imgs, real=True)
            feats.append(feature_net(imgs).double().cpu())
    states = {k: getattr(fid, k).detach().cpu().clone() for k in _REAL_STATES}
    ref = Reference(key, states, torch.cat(feats))
    if path is not None:
        digest = io.save_tensors(path, {**states, "features": ref.features})
        io.write_json(path.with_suffix(".json"), {"sha256": digest, "key": key, "n": ref.n})
    return ref


def _load_reference(path: Path, key: str) -> Reference | None:
    """A cached reference, or None if it is corrupt (the caller rebuilds it)."""
    from safetensors.torch import load_file

    side = path.with_suffix(".json")
    try:
        meta = json.loads(side.read_text())
        if meta.get("sha256") != io.sha256_file(path):
            return None
        t = load_file(str(path))
        return Reference(key, {k: t[k] for k in _REAL_STATES}, t["features"])
    except (OSError, ValueError, KeyError):
        return None


def _device(module) -> torch.device:
    return next(module.parameters()).device


# --- per-image quantities ----------------------------------------------------------------------


def colour_stats(images: torch.Tensor) -> dict[str, np.ndarray]:
    """Per image: mean HSV saturation, contrast (std of luminance), brightness (mean luminance)."""
    x = images.double().clamp(0, 1)
    mx, mn = x.max(1).values, x.min(1).values
    sat = torch.where(mx > 1e-6, (mx - mn) / mx.clamp(min=1e-6), torch.zeros_like(mx))
    lum = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    return {
        "saturation": sat.mean((1, 2)).cpu().numpy(),
        "contrast": lum.std((1, 2)).cpu().numpy(),
        "brightness": lum.mean((1, 2)).cpu().numpy(),
    }


def attribute_correctness(pred: dict[str, torch.Tensor], prompts) -> dict[str, np.ndarray]:
    """Per image: correct/total counts per attribute type and whole-prompt correctness.

    For each object the prompt names, at its position slot: position = something is there;
    shape/colour/size = something is there and it has that attribute. count = the number of
    occupied slots equals the number of objects named. accuracy = every check of the prompt holds.
    """
    n = len(prompts)
    out = {f"{a}_correct": np.zeros(n) for a in ATTRIBUTES}
    out.update({f"{a}_total": np.zeros(n) for a in ATTRIBUTES})
    out["whole"] = np.zeros(n)
    shape, color, size = pred["shape"].cpu(), pred["color"].cpu(), pred["size"].cpu()
    for i, p in enumerate(prompts):
        ok_all = True
        for o in p.objects:
            j = world.POSITIONS.index(o.position)
            present = bool(shape[i, j] > 0)
            checks = {
                "position": present,
                "shape": present and int(shape[i, j]) == 1 + world.SHAPES.index(o.shape),
                "color": present and int(color[i, j]) == world.COLOR_NAMES.index(o.color),
                "size": present and int(size[i, j]) == world.SIZES.index(o.size),
            }
            for a, ok in checks.items():
                out[f"{a}_correct"][i] += ok
                out[f"{a}_total"][i] += 1
                ok_all &= ok
        count_ok = int((shape[i] > 0).sum()) == len(p.objects)
        out["count_correct"][i] += count_ok
        out["count_total"][i] += 1
        out["whole"][i] = ok_all and count_ok
    return out


# --- bootstrap ---------------------------------------------------------------------------------


def _indices(n: int, b: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(b, n))


def percentile_ci(values: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(values, [100 * (1 - CI_LEVEL) / 2, 100 * (1 + CI_LEVEL) / 2])
    return float(lo), float(hi)


def bootstrap_mean(x: np.ndarray) -> tuple[float, float, float]:
    idx = _indices(len(x))
    return float(np.mean(x)), *percentile_ci(x[idx].mean(1))


def bootstrap_ratio(num: np.ndarray, den: np.ndarray) -> tuple[float, float, float]:
    idx = _indices(len(num))
    return float(num.sum() / den.sum()), *percentile_ci(num[idx].sum(1) / den[idx].sum(1))


def psd_sqrt(cov: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(cov.double())
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance_sym(mu1, cov1_sqrt, tr1: float, mu2, cov2) -> float:
    """The same Fréchet distance with cov1's square root precomputed: Tr sqrt(Σ1Σ2) = Σ sqrt(eig(Σ1½ Σ2 Σ1½)).

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
    for idx in _indices(features.shape[0], b):
        mu, cov = gaussian_stats(features[torch.from_numpy(idx)])
        vals.append(frechet_distance_sym(mu_r, root, tr_r, mu, cov))
    vals = np.asarray(vals)
    lo, hi = percentile_ci(vals - vals.mean() + fid)
    return max(lo, 0.0), hi


# --- one evaluation ----------------------------------------------------------------------------


def evaluate(images: torch.Tensor, prompts, evaluators, ref: Reference | None) -> dict:
    """Every metric of one (method, NFE, seed) cell, with CIs. images: [N, 3, H, W] in [0, 1].

    `evaluators` provides ``fid_net`` (images -> features, with ``num_features``),
    ``clip_score(images, texts)`` (per image), ``predict_attributes(images)`` (per-slot predictions, or
    None where no ground-truth evaluator exists) and ``identity()``.
    """
    dev = _device(evaluators.fid_net)
    images = images.to(dev)
    row: dict = {"n_samples": len(prompts)}

    # 1. FID: torchmetrics with the reference state loaded; the bootstrap reuses its kernel
    if ref is not None:
        fid = new_fid(evaluators.fid_net).to(dev)
        for k, v in ref.states.items():
            setattr(fid, k, v.to(dev))
        with torch.no_grad():
            fid.update(images, real=False)
            feats = evaluators.fid_net(images).double().cpu()
        row["fid"] = float(fid.compute())
        row["fid_ci_low"], row["fid_ci_high"] = bootstrap_fid(feats, ref, row["fid"])

    # 2. CLIP score
    clip = evaluators.clip_score(images, [p.text for p in prompts]).double().cpu().numpy()
    row["clip_score"], row["clip_score_ci_low"], row["clip_score_ci_high"] = bootstrap_mean(clip)

    # 3. compositional accuracy (only where every prompt has ground truth and an attribute evaluator exists)
    pred = evaluators.predict_attributes(images) if all(p.objects is not None for p in prompts) else None
    if pred is not None:
        corr = attribute_correctness(pred, prompts)
        row["accuracy"], row["accuracy_ci_low"], row["accuracy_ci_high"] = bootstrap_mean(corr["whole"])
        for a in ATTRIBUTES:
            k = f"acc_{a}"
            row[k], row[f"{k}_ci_low"], row[f"{k}_ci_high"] = bootstrap_ratio(corr[f"{a}_correct"], corr[f"{a}_total"])
        two = np.array([len(p.objects) == 2 for p in prompts])
        if two.any():
            row["accuracy_two_object"] = float(corr["whole"][two].mean())

    # 4. colour statistics
    for k, v in colour_stats(images).items():
        row[k], row[f"{k}_ci_low"], row[f"{k}_ci_high"] = bootstrap_mean(v)
    return row


def fid_floor(prompts, evaluators, ref: Reference) -> dict:
    """Real-vs-real FID: renders of the same prompts with other nuisance draws, against the reference."""
    imgs = real_images(prompts, variant=1)
    return evaluate(imgs, prompts, evaluators, ref)
