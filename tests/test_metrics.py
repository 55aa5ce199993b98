import math

import numpy as np
import pytest
import torch

from bench import metrics, world
from prompts import Prompt


def test_frechet_identical_is_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=g, dtype=torch.float64)
    mu, cov = metrics.gaussian_stats(x)
    assert abs(metrics.frechet_distance(mu, cov, mu, cov)) < 1e-6


def test_frechet_matches_closed_forms():
    # commuting (diagonal) covariances: ||mu1-mu2||^2 + sum (sqrt(a) - sqrt(b))^2
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    expected = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    assert math.isclose(metrics.frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)), expected, rel_tol=1e-6)
    # 1-D: (m1-m2)^2 + (s1-s2)^2
    assert math.isclose(metrics.frechet_distance(torch.tensor([2.0]), torch.tensor([[9.0]]),
                                                 torch.tensor([0.0]), torch.tensor([[1.0]])), 4 + 4, rel_tol=1e-6)
    # a non-commuting pair against scipy's matrix square root
    from scipy.linalg import sqrtm

    s1 = np.array([[2.0, 0.5], [0.5, 1.0]])
    s2 = np.array([[1.0, -0.3], [-0.3, 3.0]])
    ref = np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real)
    got = metrics.frechet_distance(torch.zeros(2), torch.tensor(s1), torch.zeros(2), torch.tensor(s2))
    assert math.isclose(got, ref, rel_tol=1e-6)


def test_symmetric_kernel_equals_torchmetrics_kernel():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(300, 6, generator=g, dtype=torch.float64), 2 * torch.randn(300, 6, generator=g, dtype=torch.float64)
    mu1, c1 = metrics.gaussian_stats(a @ torch.randn(6, 6, generator=g, dtype=torch.float64))
    mu2, c2 = metrics.gaussian_stats(b + 1)
    ref = metrics.frechet_distance(mu1, c1, mu2, c2)
    sym = metrics.frechet_distance_sym(mu1, metrics.psd_sqrt(c1), float(c1.trace()), mu2, c2)
    assert math.isclose(ref, sym, rel_tol=1e-6)


class _Identity(torch.nn.Module):
    num_features = 3

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x.mean((2, 3))


def test_torchmetrics_fid_path_against_closed_form():
    """The hot path (torchmetrics FID with a custom feature net) on features with known Gaussians."""
    g = torch.Generator().manual_seed(0)
    n = 20000
    real = torch.randn(n, 3, 1, 1, generator=g, dtype=torch.float64)
    fake = 2.0 * torch.randn(n, 3, 1, 1, generator=g, dtype=torch.float64) + 1.0
    fid = metrics.new_fid(_Identity())
    fid.update(real.float(), real=True)
    fid.update(fake.float(), real=False)
    # N(0, I) vs N(1, 4I) in 3-D: 3*1 + 3*(2-1)^2 = 6
    assert abs(float(fid.compute()) - 6.0) < 0.15


def _prompt(objs, i=0):
    return Prompt(f"p{i}", " and ".join(o.phrase for o in objs), tuple(objs), 0)


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
    c = metrics.attribute_correctness({"shape": shape, "color": color, "size": size}, [p])
    assert c["color_correct"][0] == 1 and c["color_total"][0] == 2  # blue rendered green
    assert c["shape_correct"][0] == 2 and c["position_correct"][0] == 2 and c["count_correct"][0] == 1
    assert c["whole"][0] == 0
    color[0, br] = world.COLOR_NAMES.index("blue")
    assert metrics.attribute_correctness({"shape": shape, "color": color, "size": size}, [p])["whole"][0] == 1
    shape[0, 4] = 1  # an extra object in the centre breaks count and whole
    c = metrics.attribute_correctness({"shape": shape, "color": color, "size": size}, [p])
    assert c["count_correct"][0] == 0 and c["whole"][0] == 0


def test_colour_stats():
    grey = torch.full((1, 3, 4, 4), 0.5)
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1.0
    s = metrics.colour_stats(torch.cat([grey, red]))
    assert s["saturation"].tolist() == [0.0, 1.0]
    assert s["contrast"][0] == 0.0
    assert math.isclose(s["brightness"][1], 0.299)


def test_bootstrap_ci_brackets_the_estimate():
    x = np.random.default_rng(0).normal(1.0, 1.0, 400)
    m, lo, hi = metrics.bootstrap_mean(x)
    assert lo < m < hi and hi - lo < 0.4
    assert metrics.bootstrap_mean(x) == (m, lo, hi)  # fixed resampling seed


@pytest.mark.parametrize("n", [50])
def test_reference_cache_roundtrip_and_corruption(tmp_path, n):
    from prompts import load_prompts

    ps = load_prompts("shapes-val")[:n]
    net = _Identity()
    ref = metrics.build_reference(ps, net, {"x": 1}, tmp_path)
    path = tmp_path / "fid-ref" / f"{ref.key}.safetensors"
    assert path.exists()
    again = metrics.build_reference(ps, net, {"x": 1}, tmp_path)
    assert torch.equal(again.features, ref.features)
    path.write_bytes(path.read_bytes()[:-10])  # truncate: detected by hash and rebuilt
    assert metrics._load_reference(path, ref.key) is None
    rebuilt = metrics.build_reference(ps, net, {"x": 1}, tmp_path)
    assert torch.equal(rebuilt.features, ref.features)
