import math

import numpy as np
import torch

from bench.metrics import bootstrap, fid
from bench.metrics.cell import CellMetrics, measure
from bench.metrics.colour import COLOUR_STATS, colour_stats
from bench.shapes import world
from bench.shapes.evaluators import attribute_correctness, real_images
from prompts import Prompt, load_prompts


def _fd(mu1, c1, mu2, c2) -> float:
    c1 = torch.as_tensor(c1, dtype=torch.float64)
    return fid.frechet_distance(torch.as_tensor(mu1, dtype=torch.float64), fid.psd_sqrt(c1), float(c1.trace()),
                                torch.as_tensor(mu2, dtype=torch.float64), torch.as_tensor(c2, dtype=torch.float64))


def test_frechet_identical_is_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=g, dtype=torch.float64)
    mu, cov = fid.gaussian_stats(x)
    assert abs(_fd(mu, cov, mu, cov)) < 1e-6


def test_frechet_matches_closed_forms():
    # commuting (diagonal) covariances: ||mu1-mu2||^2 + sum (sqrt(a) - sqrt(b))^2
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    expected = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    assert math.isclose(_fd(mu1, torch.diag(a), mu2, torch.diag(b)), expected, rel_tol=1e-6)
    # 1-D: (m1-m2)^2 + (s1-s2)^2
    assert math.isclose(_fd([2.0], [[9.0]], [0.0], [[1.0]]), 4 + 4, rel_tol=1e-6)
    # a non-commuting pair against scipy's matrix square root
    from scipy.linalg import sqrtm

    s1 = np.array([[2.0, 0.5], [0.5, 1.0]])
    s2 = np.array([[1.0, -0.3], [-0.3, 3.0]])
    ref = np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real)
    assert math.isclose(_fd(torch.zeros(2), s1, torch.zeros(2), s2), ref, rel_tol=1e-6)


def _reference(features: torch.Tensor, chunk: int = 1000) -> fid.Reference:
    chunks = (features[i : i + chunk] for i in range(0, len(features), chunk))
    return fid.cached_reference("test", {"kind": "test"}, chunks, features.shape[1], None)


def test_torchmetrics_fid_path_against_closed_form():
    """The hot path (torchmetrics FID over per-sample features, reference merged in) on known Gaussians."""
    g = torch.Generator().manual_seed(0)
    n = 20000
    real = torch.randn(n, 3, generator=g, dtype=torch.float64)
    fake = 2.0 * torch.randn(n, 3, generator=g, dtype=torch.float64) + 1.0
    # N(0, I) vs N(1, 4I) in 3-D: 3*1 + 3*(2-1)^2 = 6
    assert abs(fid.fid_value(fake.float(), _reference(real.float())) - 6.0) < 0.15


def test_own_kernel_equals_torchmetrics_fid():
    g = torch.Generator().manual_seed(3)
    real = torch.randn(400, 6, generator=g) @ torch.randn(6, 6, generator=g)
    fake = 2 * torch.randn(300, 6, generator=g) + 1
    ref = _reference(real, chunk=128)
    mu_r, cov_r = fid.gaussian_stats(real)
    mu_f, cov_f = fid.gaussian_stats(fake)
    assert math.isclose(fid.fid_value(fake, ref), _fd(mu_r, cov_r, mu_f, cov_f), rel_tol=1e-4)


def _prompt(objs, i=0):
    return Prompt(f"p{i}", world.caption(tuple(objs)), tuple(objs), 0)


def test_attribute_correctness_on_handmade_predictions():
    o1 = world.Obj("circle", "red", "large", "top left")
    o2 = world.Obj("square", "blue", "small", "bottom right")
    p = _prompt([o1, o2])
    tl, br = world.POSITIONS.index("top left"), world.POSITIONS.index("bottom right")
    shape = torch.zeros(1, 5, dtype=torch.long)
    color = torch.zeros(1, 5, dtype=torch.long)
    size = torch.zeros(1, 5, dtype=torch.long)
    shape[0, tl], color[0, tl], size[0, tl] = 1 + world.SHAPES.index("circle"), world.COLOR_NAMES.index("red"), 1
    shape[0, br], color[0, br], size[0, br] = 1 + world.SHAPES.index("square"), world.COLOR_NAMES.index("green"), 0
    c = attribute_correctness({"shape": shape, "color": color, "size": size}, [p])
    assert c["color_correct"][0] == 1 and c["color_total"][0] == 2  # blue rendered green
    assert c["shape_correct"][0] == 2 and c["position_correct"][0] == 2 and c["count_correct"][0] == 1
    assert c["whole"][0] == 0
    color[0, br] = world.COLOR_NAMES.index("blue")
    assert attribute_correctness({"shape": shape, "color": color, "size": size}, [p])["whole"][0] == 1
    shape[0, 4] = 1  # an extra object in the centre breaks count and whole
    c = attribute_correctness({"shape": shape, "color": color, "size": size}, [p])
    assert c["count_correct"][0] == 0 and c["whole"][0] == 0


def test_colour_stats():
    grey = torch.full((1, 3, 8, 8), 0.5)
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1.0
    noisy = grey.clone()  # zero-mean per-pixel chroma noise on grey: HSV saturation sees it, the low-pass much less
    noisy[:, 0, ::2, ::2], noisy[:, 0, 1::2, 1::2] = 0.6, 0.4
    s = dict(zip(COLOUR_STATS, colour_stats(torch.cat([grey, red, noisy])).T.tolist()))
    assert s["saturation"][:2] == [0.0, 1.0]
    assert s["saturation_lowpass"][:2] == [0.0, 1.0]  # flat images: the low-pass changes nothing
    assert s["saturation_lowpass"][2] < 0.5 * s["saturation"][2]
    assert s["contrast"][:2] == [0.0, 0.0]
    assert math.isclose(s["brightness"][1], 0.299)


def test_bootstrap_ci_brackets_the_estimate():
    x = np.random.default_rng(0).normal(1.0, 1.0, 400)
    m, lo, hi = bootstrap.bootstrap_mean(x)
    assert lo < m < hi and hi - lo < 0.4
    assert bootstrap.bootstrap_mean(x) == (m, lo, hi)  # fixed resampling seed


def test_reference_cache_roundtrip_and_corruption(tmp_path, shapes_eval):
    ps = load_prompts("shapes-val")[:50]
    ref = shapes_eval.reference(ps, tmp_path)
    path = tmp_path / "fid-ref" / f"{ref.key}.safetensors"
    assert path.exists()
    again = shapes_eval.reference(ps, tmp_path)
    assert torch.equal(again.features, ref.features) and again.identity() == ref.identity()
    path.write_bytes(path.read_bytes()[:-10])  # truncate: detected by hash and rebuilt
    assert fid._load_reference(path, ref.key) is None
    rebuilt = shapes_eval.reference(ps, tmp_path)
    assert torch.equal(rebuilt.features, ref.features)


def test_metrics_do_not_depend_on_batch_size_or_process_split(shapes_eval):
    """Streaming: a cell's metrics are the same, bit for bit, however its samples were batched or split."""
    ps = load_prompts("shapes-val")[:90]
    ref = shapes_eval.reference(ps, None)
    images = real_images(ps, variant=2)
    rows = []
    for batch in (90, 16, 7):
        rows.append(measure(shapes_eval, ref, ps, (images[i : i + batch] for i in range(0, 90, batch)), batch))
    assert rows[0] == rows[1] == rows[2]
    # two "processes" with contiguous shards of 45, gathered in rank order, equal one process
    parts = [CellMetrics(shapes_eval, ps[:45], ref), CellMetrics(shapes_eval, ps[45:], ref)]
    parts[0].update(images[:45], ps[:45])
    parts[1].update(images[45:], ps[45:])
    gathered = [torch.cat(v) for v in zip(parts[0].gather(), parts[1].gather())]
    assert {"n_samples": 90, **parts[0].compute(gathered)} == rows[0]
    assert 0 <= rows[0]["fid"] < 5 and rows[0]["accuracy"] > 0.9  # real renders: near the floor


def test_fid_accumulator_equals_torchmetrics_on_images(shapes_eval):
    """The streamed FID equals torchmetrics' FrechetInceptionDistance fed the images themselves."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    ps = load_prompts("shapes-val")[:64]
    ref = shapes_eval.reference(ps, None)
    images = real_images(ps, variant=3)
    ours = measure(shapes_eval, ref, ps, [images], 64)["fid"]
    tm = FrechetInceptionDistance(feature=shapes_eval.attr, normalize=True)
    tm.update(real_images(ps), real=True)
    tm.update(images, real=False)
    assert math.isclose(ours, float(tm.compute()), rel_tol=1e-4)
