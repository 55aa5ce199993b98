"""Distribution metrics (KID, CMMD, FD-DINOv2, precision/recall/density/coverage): pure kernels against closed forms
and their reference definitions, then each metric end to end on the embedded and a tiny real-scale world."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench.metrics import cmmd as cmmd_mod
from bench.metrics import kid as kid_mod
from bench.metrics import prdc as prdc_mod
from bench.metrics.cell import CellMetrics
from bench.metrics.distribution import mmd2
from bench.shapes.evaluators import load_evaluators, real_images
from core.errors import UserError
from prompts import load_prompts
from tests import tiny_sd

DISTRIBUTION = ["kid", "cmmd", "prdc"]


def gaussian(n, d, mean=0.0, std=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * std + mean


# --- CMMD: the Gaussian-kernel MMD ---------------------------------------------------------------

def test_cmmd_of_identical_sets_is_zero():
    x = gaussian(200, 16)
    assert abs(cmmd_mod.cmmd(x, x)) < 1e-9


def expected_rbf(m2: float, v: float, d: int, sigma: float) -> float:
    """E exp(−‖z‖²/(2σ²)) for z ~ N(m, v·I_d) with ‖m‖² = m2 (the Gaussian integral)."""
    g = 1 / (2 * sigma**2)
    return (1 + 2 * g * v) ** (-d / 2) * math.exp(-g * m2 / (1 + 2 * g * v))


def test_gaussian_kernel_mmd_matches_the_closed_form_for_two_gaussians():
    """x ~ N(0, s²I), y ~ N(μ, s²I): E k(x, x') and E k(x, y) in closed form; the biased (V-statistic) estimator
    adds the n diagonal ones, k(x, x) = 1. Eight independent draws: their mean within 4 standard errors."""
    n, d, s, sigma = 800, 4, 5.0, cmmd_mod.SIGMA
    mu = torch.tensor([10.0, 0, 0, 0], dtype=torch.float64)
    same, cross = expected_rbf(0, 2 * s**2, d, sigma), expected_rbf(100.0, 2 * s**2, d, sigma)
    population = 2 * same - 2 * cross  # ≈ 0.252
    biased = 2 * (same * (n - 1) / n + 1 / n) - 2 * cross
    k = cmmd_mod.rbf_kernel
    v, u = [], []
    for seed in range(8):
        x, y = gaussian(n, d, std=s, seed=2 * seed + 1), gaussian(n, d, mu, s, seed=2 * seed + 2)
        v.append(cmmd_mod.cmmd(x, y) / cmmd_mod.SCALE)
        u.append(float(mmd2(k(x, x), k(y, y), k(x, y), unbiased=True)))
    for values, want in ((v, biased), (u, population)):
        se = np.std(values, ddof=1) / math.sqrt(len(values))
        assert se < 0.01 and abs(np.mean(values) - want) < 4 * se, (np.mean(values), want, se)
    x = gaussian(n, d, std=s, seed=99)
    assert cmmd_mod.cmmd(x, gaussian(n, d, std=s, seed=100)) / cmmd_mod.SCALE == pytest.approx(2 / n, abs=0.01)


def test_cmmd_follows_the_reference_code_formula():
    """google-research/cmmd distance.py: Gram-trick squared distances, means over all pairs, ×1000."""
    x, y = gaussian(50, 8, seed=4), gaussian(60, 8, 0.3, seed=5)

    def k(a, b):
        d2 = -2 * a @ b.T + (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :]
        return torch.exp(-d2 / (2 * 10.0**2)).mean()

    assert cmmd_mod.cmmd(x, y) == pytest.approx(float(1000 * (k(x, x) + k(y, y) - 2 * k(x, y))), rel=1e-12)


# --- KID ----------------------------------------------------------------------------------------

def test_kid_equals_torchmetrics_on_raw_features():
    from torchmetrics.image.kid import KernelInceptionDistance

    x, y = gaussian(120, 16, seed=6), gaussian(100, 16, 0.5, seed=7)
    ours = kid_mod.kid_subsets(x, y, subsets=10, subset_size=50)
    tm = KernelInceptionDistance(feature=kid_mod.FeatureRows(16), subsets=10, subset_size=50)
    tm.update(y, real=True)
    tm.update(x, real=False)
    torch.manual_seed(kid_mod.KID_SEED)
    assert ours == pytest.approx(tuple(float(v) for v in tm.compute()), rel=1e-12)
    # one subset of every row: the unbiased MMD² of the whole sets
    full, std = kid_mod.kid_subsets(x[:100], y, subsets=3, subset_size=100)
    k = kid_mod.poly_kernel
    assert full == pytest.approx(float(mmd2(k(x[:100], x[:100]), k(y, y), k(x[:100], y), unbiased=True)), rel=1e-9)
    assert std < 1e-9 * abs(full)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    x, y = gaussian(500, 16, seed=8), gaussian(500, 16, seed=9)
    same, _ = kid_mod.kid_subsets(x, y, 20, 200)
    shifted, _ = kid_mod.kid_subsets(x, y + 1.0, 20, 200)
    assert abs(same) < 0.01 < shifted


# --- precision / recall / density / coverage -----------------------------------------------------

def reference_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict:
    """The prdc package's definitions (clovaai/generative-evaluation-prdc prdc/prdc.py), in numpy."""
    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    def kth(d, kk):
        idx = np.argpartition(d, kk, axis=-1)[..., :kk]
        return np.take_along_axis(d, idx, axis=-1).max(axis=-1)

    r_real, r_fake, d = kth(dist(real, real), k + 1), kth(dist(fake, fake), k + 1), dist(real, fake)
    return {"precision": (d < r_real[:, None]).any(axis=0).mean(),
            "recall": (d < r_fake[None, :]).any(axis=1).mean(),
            "density": (1.0 / k) * (d < r_real[:, None]).sum(axis=0).mean(),
            "coverage": (d.min(axis=1) < r_real).mean()}


def test_prdc_equals_the_prdc_package_definitions_on_random_data():
    real, fake = gaussian(150, 8, seed=10), gaussian(120, 8, 0.5, 0.8, seed=11)
    ours = prdc_mod.prdc(real, fake, 5)
    want = reference_prdc(real.numpy(), fake.numpy(), 5)
    assert ours == pytest.approx(want, abs=1e-12)
    assert 0 < ours["precision"] < 1 and 0 < ours["recall"] < 1 and 0 < ours["coverage"] < 1


def test_prdc_on_constructed_manifolds():
    real = gaussian(100, 8, seed=12)
    same = prdc_mod.prdc(real, real.clone(), 5)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    far = prdc_mod.prdc(real, real + 1000.0, 5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    # real: two far-apart clusters; generated: copies of the first cluster only
    a, b = gaussian(50, 8, seed=13), gaussian(50, 8, 1000.0, seed=14)
    half = prdc_mod.prdc(torch.cat([a, b]), a.clone(), 5)
    assert half["precision"] == 1.0 and half["recall"] == 0.5 and half["coverage"] == 0.5


# --- each metric through CellMetrics on the embedded evaluators ----------------------------------

@pytest.fixture(scope="module")
def shapes():
    ev = load_evaluators()
    ps = load_prompts("shapes-val")[:48]
    return ev, ps, ev.reference(ps, None)


def test_distribution_metrics_in_a_cell_on_the_embedded_evaluators(shapes):
    ev, ps, ref = shapes
    assert set(ref.spaces) == {"clip"} and ref.features_in("clip").shape == (48, 64)
    images = real_images(ps, variant=2)
    rows = []
    for batch in (48, 7):
        meter = CellMetrics(ev, ps, ref, DISTRIBUTION, {"kid": {"subsets": 20}})
        for i in range(0, 48, batch):
            meter.update(images[i : i + batch], ps[i : i + batch])
        rows.append(meter.compute())
    assert rows[0] == rows[1]  # no number depends on the batch size
    noise = CellMetrics(ev, ps, ref, DISTRIBUTION, {"kid": {"subsets": 20}})
    noise.update(torch.rand_like(images), ps)
    bad, good = noise.compute(), rows[0]
    assert good["cmmd"] < bad["cmmd"] and good["kid"] < bad["kid"]
    assert good["precision"] > bad["precision"] and good["recall"] > bad["recall"]
    assert good["coverage"] > bad["coverage"] and good["density"] > bad["density"]
    for key in ("kid", "cmmd", "precision", "recall", "density", "coverage"):
        for row in (good, bad):
            assert row[f"{key}_ci_low"] <= row[key] <= row[f"{key}_ci_high"], key
    prot = {p.name: p.protocol() for p in noise.parts if p.name in DISTRIBUTION}
    assert prot["cmmd"]["space"] == "clip" and prot["kid"]["space"] == prot["prdc"]["space"] == "fid"
    assert prot["kid"]["sha256"] and "paired" in prot["prdc"]["ci"]["reference"]


def test_settings_and_checks(shapes):
    ev, ps, ref = shapes
    from bench.metrics import registry

    meter = CellMetrics(ev, ps, ref, ["kid", "prdc"], {"kid": {"space": "clip", "subsets": 5, "subset_size": 20},
                                                      "prdc": {"space": "clip", "nearest_k": 3}})
    meter.update(real_images(ps, variant=1), ps)
    row = meter.compute()
    kid = next(p for p in meter.parts if p.name == "kid")
    assert kid.width == 64 and kid.protocol()["subset_size"] == 20 and row["kid_subset_std"] > 0
    fd = registry.get("fd_dinov2")
    with pytest.raises(UserError, match="real-scale metric"):
        fd.check(ps, "s", "shapes", fd.make_config({}, "fd_dinov2"))
    k = registry.get("kid")
    with pytest.raises(UserError, match="space 'dinov2'"):
        k.check(ps, "s", "shapes", k.make_config({"space": "dinov2"}, "kid"))
    with pytest.raises(UserError, match="subset_size"):
        k.check(ps[:10], "s", "shapes", k.make_config({"subset_size": 50}, "kid"))
    p = registry.get("prdc")
    with pytest.raises(UserError, match="nearest_k"):
        p.check(ps[:5], "s", "shapes", p.make_config({}, "prdc"))


def test_a_real_suite_without_dinov2_weights_is_refused(tmp_path):
    from bench import suite

    raw = {"evaluators": {"kind": "real", "clip_model": "x", "inception_dir": str(tmp_path), "reference": str(tmp_path)},
           "metrics": ["fid", "fd_dinov2"], "methods": [{"name": "teacher", "steps": [1]}]}
    with pytest.raises(UserError, match="dinov2 = a transformers Dinov2Model directory"):
        suite.parse(raw, "s.toml")
    raw["evaluators"]["dinov2"] = str(tmp_path)
    assert "fd_dinov2" in suite.parse(raw, "s.toml").metrics


# --- FD-DINOv2 end to end at real scale (random weights) -----------------------------------------

def tiny_dinov2(root):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=14,
                       image_size=224)
    Dinov2Model(cfg).save_pretrained(root)
    return root


def test_fd_dinov2_end_to_end_through_real_evaluators(tmp_path):
    from bench.real import load_real_evaluators

    name, weights = tiny_sd.tiny_open_clip(tmp_path / "clip")
    ref_dir = tiny_sd.image_folder(tmp_path / "ref", 16)
    ev = load_real_evaluators(None, name, weights, ref_dir, fid_net=tiny_sd.RandomFeatures(),
                              dinov2_dir=tiny_dinov2(tmp_path / "dinov2"))
    spaces = ev.feature_spaces()
    assert set(spaces) == {"fid", "clip", "dinov2"} and spaces["dinov2"]["width"] == 32 and spaces["dinov2"]["sha256"]
    ps = load_prompts("shapes-eval")[:16]
    ref = ev.reference(ps, tmp_path / "cache")
    assert set(ref.spaces) == {"clip", "dinov2"} and ref.features_in("dinov2").shape == (16, 32)
    assert ref.features_in("clip").norm(dim=1).sub(1).abs().max() < 1e-5  # L2-normalised
    from safetensors.torch import load_file

    (cached,) = (tmp_path / "cache" / "fid-ref").glob("*.safetensors")
    assert {"features", "features.clip", "features.dinov2"} <= set(load_file(str(cached)))
    metrics = ["fd_dinov2", "cmmd", "kid", "prdc"]
    same = CellMetrics(ev, ps, ref, metrics, {"prdc": {"nearest_k": 3}})
    same.update(tiny_sd.load_folder(ref_dir), ps)
    noise = CellMetrics(ev, ps, ref, metrics, {"prdc": {"nearest_k": 3}})
    noise.update(torch.rand(16, 3, 16, 16), ps)
    a, b = same.compute(), noise.compute()
    assert abs(a["fd_dinov2"]) < 1e-3 < b["fd_dinov2"] and b["fd_dinov2_ci_low"] <= b["fd_dinov2"] <= b["fd_dinov2_ci_high"]
    assert abs(a["cmmd"]) < 1e-9 < b["cmmd"] and a["precision"] == a["recall"] == 1.0
    prot = next(p for p in noise.parts if p.name == "fd_dinov2").protocol()
    assert prot["space"] == "dinov2" and "Dinov2Model" in prot["network"] and prot["sha256"]
    assert ev.reference(ps, tmp_path / "cache").key == ref.key  # cached: loaded, not rebuilt
