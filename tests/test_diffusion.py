import pytest
import torch

from methods import diffusion as D


@pytest.fixture(scope="module")
def sch():
    return D.Schedule.scaled_linear()


def test_schedule_matches_diffusers_and_has_nonzero_terminal_snr(sch):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert torch.allclose(sch.alpha_bar.float(), ref.alphas_cumprod, atol=1e-6)
    assert 0.003 < float(sch.alpha_bar[-1]) < 0.006  # SD's schedule: SNR(T) > 0
    assert torch.allclose(sch.alpha(10) ** 2 + sch.sigma(10) ** 2, torch.tensor(1.0, dtype=torch.float64))


def test_parameterisation_roundtrips(sch):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 250, 600, 999])
    a, s = sch.alpha(t).float(), sch.sigma(t).float()
    x_t = sch.add_noise(x0, eps, t).float()
    assert torch.allclose(D.x0_from_eps(x_t, eps, a, s), x0, atol=1e-3)
    assert torch.allclose(D.eps_from_x0(x_t, x0, a, s), eps, atol=1e-4)
    v = D.v_from_x0_eps(x0, eps, a, s)
    assert torch.allclose(D.x0_from_v(x_t, v, a, s), x0, atol=1e-5)
    assert torch.allclose(D.eps_from_v(x_t, v, a, s), eps, atol=1e-5)


def test_ddim_step_with_exact_predictions_follows_the_forward_process(sch):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    x_next = D.ddim_step(x0, eps, sch.alpha(300).float(), sch.sigma(300).float())
    assert torch.allclose(x_next, sch.add_noise(x0, eps, 300).float(), atol=1e-6)


def test_noise_correction_is_ddim_plus_sigma_times_noise_error(sch):
    g = torch.Generator().manual_seed(2)
    x0, eps_hat, x_T = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    a, s = sch.alpha(499).float(), sch.sigma(499).float()
    nc = D.noise_corrected_step(x0, x_T, a, s)
    assert torch.allclose(nc, D.ddim_step(x0, eps_hat, a, s) + s * (x_T - eps_hat), atol=1e-6)


def test_trailing_grid_visits_pure_noise():
    assert D.trailing_timesteps(1) == [999]
    assert D.trailing_timesteps(2) == [999, 499]
    assert D.trailing_timesteps(4) == [999, 749, 499, 249]
    assert len(set(D.trailing_timesteps(25))) == 25
    with pytest.raises(ValueError):
        D.trailing_timesteps(0)


def test_progressive_target_solves_the_two_step_equation(sch):
    """One DDIM step from z_t predicting x̃ lands exactly on the two-teacher-step result z''."""
    g = torch.Generator().manual_seed(3)
    z_t = torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64)
    z_tpp = torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64)
    t, tpp = 700, 300
    a_t, s_t, a2, s2 = sch.alpha(t), sch.sigma(t), sch.alpha(tpp), sch.sigma(tpp)
    x_tilde = D.progressive_target(z_t, z_tpp, a_t, s_t, a2, s2)
    eps_tilde = D.eps_from_x0(z_t, x_tilde, a_t, s_t)
    assert torch.allclose(D.ddim_step(x_tilde, eps_tilde, a2, s2), z_tpp, atol=1e-9)


def test_lcm_boundary_condition():
    c_skip, c_out = D.lcm_boundary(0)
    assert float(c_skip) == 1.0 and float(c_out) == 0.0
    c_skip, c_out = D.lcm_boundary(torch.tensor([999]))
    assert float(c_skip) < 1e-5 and abs(float(c_out) - 1.0) < 1e-5


def test_gamma_shift():
    assert D.gamma_shift(torch.tensor([999, 500, 0]), 0.5).tolist() == [500, 250, 0]
    assert D.gamma_shift(999, 1.0).item() == 999
    with pytest.raises(ValueError):
        D.gamma_shift(10, 0.0)


def test_snr_truncation():
    assert D.snr_truncated_weight(torch.tensor([0.01, 5.0])).tolist() == [1.0, 5.0]


def test_cfg_is_linear():
    u, c = torch.zeros(2), torch.ones(2)
    assert D.cfg(u, c, 1.0).tolist() == [1.0, 1.0]
    assert D.cfg(u, c, 3.0).tolist() == [3.0, 3.0]


@pytest.mark.parametrize(("family", "prediction_type"), [("vp", "epsilon"), ("vp", "v_prediction"), ("vp", "sample"),
                                                         ("flow", "flow")])
def test_prediction_target_is_what_split_inverts(family, prediction_type):
    """A network that outputs its parameterisation's training target exactly is read back as the true (x0, ε)."""
    from methods.sampling import Denoiser

    schedule = D.Schedule.scaled_linear() if family == "vp" else D.FlowSchedule()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([10, 250, 600, 999]) if family == "vp" else torch.tensor([10.0, 250.0, 600.0, 999.0])
    alpha, sigma = schedule.alpha(t).float(), schedule.sigma(t).float()
    x_t = schedule.add_noise(x0, eps, t).float()
    out = D.prediction_target(prediction_type, x0, eps, alpha, sigma)
    x0_hat, eps_hat = Denoiser(None, schedule, prediction_type).split(x_t, t, out)
    assert torch.allclose(x0_hat, x0, atol=2e-3) and torch.allclose(eps_hat, eps, atol=2e-3)


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_dmd2_fake_score_trains_the_teachers_parameterisation(kind):
    """An oracle fake score (it outputs the exact target) has zero denoising loss on either family; one that
    outputs ε on a flow teacher does not (the defect this guards against: ε regressed from a velocity network)."""
    from methods.dmd2 import fake_score_loss
    from methods.sampling import Denoiser
    from tests.conftest import tiny_backbone

    bb = tiny_backbone(kind=kind)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, *bb.sample_shape, generator=g), torch.randn(4, *bb.sample_shape, generator=g)
    t = bb.schedule.sample_t(4, g)
    cond = bb.encode_text(["a red circle at the top left"] * 4)

    class Oracle(torch.nn.Module):
        def __init__(self, target):
            super().__init__()
            self.target = target

        def forward(self, x, t, encoder_hidden_states=None, **kw):
            return type("Out", (), {"sample": self.target})()

    alpha, sigma = bb.schedule.alpha(t).float(), bb.schedule.sigma(t).float()
    exact = D.prediction_target(bb.prediction_type, x0, eps, alpha, sigma)
    assert fake_score_loss(Denoiser(Oracle(exact), bb.schedule, bb.prediction_type), x0, eps, t, cond) < 1e-10
    if kind == "flow":
        assert fake_score_loss(Denoiser(Oracle(eps), bb.schedule, bb.prediction_type), x0, eps, t, cond) > 0.5


def test_v_prediction_is_refused_on_a_flow_and_progressive_says_what_fits(tiny_flow, tmp_path):
    """v's conversions (x̂_0 = αx − σv) hold only where α² + σ² = 1."""
    from core.errors import UserError
    from methods import base
    from methods.sampling import Denoiser

    with pytest.raises(ValueError, match="VP"):
        Denoiser(None, D.FlowSchedule(), "v_prediction")
    cls = base.get("progressive")
    for bad in ("v_prediction", "epsilon"):
        with pytest.raises(UserError, match="use 'teacher' or 'flow'"):
            cls(tiny_flow, cls.make_config({"student_prediction": bad}), base.Context(tmp_path, progress=False))
