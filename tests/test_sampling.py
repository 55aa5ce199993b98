import pytest
import torch

from methods import diffusion as D
from methods.sampling import (Denoiser, ddim_trajectory, make_scheduler, per_sample_noise, renoise_trajectory,
                              solver_sample)


def test_noise_depends_on_key_only():
    a = per_sample_noise([("x", 0), ("y", 0)], (3, 4, 4))
    b = per_sample_noise([("y", 0)], (3, 4, 4))
    assert torch.equal(a[1], b[0])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(per_sample_noise([("x", 1)], (3, 4, 4))[0], a[0])
    assert not torch.equal(per_sample_noise([("x", 0)], (3, 4, 4), stream=1)[0], a[0])


@pytest.fixture(scope="module")
def setup(tiny):
    d = Denoiser(tiny.net, tiny.schedule)
    cond = tiny.encode_text(["a large red circle at the top left"] * 2)
    x_T = per_sample_noise([("a", 0), ("b", 0)], tiny.sample_shape)
    return tiny, d, cond, x_T


@pytest.mark.parametrize("steps", [1, 2, 4, 5, 8])
def test_own_ddim_equals_diffusers_ddim(setup, steps):
    # (diffusers' DDIM steps to t - T//steps, which is off the trailing grid when T % steps != 0)
    bb, d, cond, x_T = setup
    with torch.no_grad():
        ours = ddim_trajectory(lambda x, t: d.predict(x, t, cond), bb.schedule, x_T, D.trailing_timesteps(steps))
        theirs = solver_sample(lambda x, t: d.raw(x, t, cond), make_scheduler("ddim", bb.scheduler_config),
                               bb.schedule, x_T, steps)
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_noise_correction_changes_only_the_first_step(setup):
    bb, d, cond, x_T = setup
    grid = D.trailing_timesteps(3)
    pred = lambda x, t: d.predict(x, t, cond)  # noqa: E731
    with torch.no_grad():
        x1_nc = ddim_trajectory(pred, bb.schedule, x_T, grid, noise_correction=True, stop_at=1)
        x1 = ddim_trajectory(pred, bb.schedule, x_T, grid, stop_at=1)
        x0_hat, eps_hat = pred(x_T, grid[0])
        s = bb.schedule.sigma(grid[1]).float()
        # first step: plain DDIM plus σ_{T'}(x_T − ε̂)
        assert torch.allclose(x1_nc, x1 + s * (x_T - eps_hat), atol=1e-5)
        # later steps: plain DDIM from wherever the first step landed
        full_nc = ddim_trajectory(pred, bb.schedule, x_T, grid, noise_correction=True)
        rest = ddim_trajectory(pred, bb.schedule, x1_nc, grid[1:])
        assert torch.allclose(full_nc, rest, atol=1e-5)


def test_solver_noise_correction_matches_own_ddim(setup):
    bb, d, cond, x_T = setup
    with torch.no_grad():
        ours = ddim_trajectory(lambda x, t: d.predict(x, t, cond), bb.schedule, x_T, D.trailing_timesteps(4), True)
        theirs = solver_sample(lambda x, t: d.raw(x, t, cond), make_scheduler("ddim", bb.scheduler_config),
                               bb.schedule, x_T, 4, noise_correction=True)
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_renoise_trajectory_uses_fresh_noise_per_step(setup):
    bb, d, cond, x_T = setup
    calls = []

    def fresh(k):
        calls.append(k)
        return per_sample_noise([("a", 0), ("b", 0)], bb.sample_shape, stream=k)

    with torch.no_grad():
        renoise_trajectory(lambda x, t: d.predict(x, t, cond), bb.schedule, x_T, D.trailing_timesteps(3), fresh)
    assert calls == [1, 2]


def test_guided_prediction_is_one_batched_call(setup):
    from methods.backbone import NFECounter

    bb, _, cond, x_T = setup
    counter = NFECounter(bb.net)
    d = Denoiser(counter, bb.schedule)
    calls = []
    counter.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        d.predict_guided(x_T, 999, cond, bb.encode_text(["", ""]), 3.0)
    assert counter.count == 4 and len(calls) == 1


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_own_euler_equals_diffusers_flow_euler(tiny_flow, steps):
    """On a rectified flow DDIM is the flow's Euler step: our trajectory equals FlowMatchEulerDiscreteScheduler's."""
    d = Denoiser(tiny_flow.net, tiny_flow.schedule, "flow")
    cond = tiny_flow.encode_text(["a large red circle at the top left"] * 2)
    x_T = per_sample_noise([("a", 0), ("b", 0)], tiny_flow.sample_shape)
    with torch.no_grad():
        ours = ddim_trajectory(lambda x, t: d.predict(x, t, cond), tiny_flow.schedule, x_T, tiny_flow.schedule.grid(steps))
        theirs = solver_sample(lambda x, t: d.raw(x, t, cond), make_scheduler("euler", tiny_flow.scheduler_config),
                               tiny_flow.schedule, x_T, steps, "flow")
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_noise_correction_is_the_identity_on_a_zero_terminal_snr_flow(tiny_flow, shift):
    """At σ = 1 the flow's state is the noise itself, so ε̂ = x_T + (1 − σ)û = x_T exactly: noise correction
    (which replaces ε̂ by x_T in the first step) changes nothing, bit for bit, whatever the shift; on the VP
    schedule (ᾱ_999 ≈ 0.0047 > 0) it does (test_noise_correction_changes_only_the_first_step)."""
    schedule = D.FlowSchedule(shift=shift, linear_sigmas=True)
    d = Denoiser(tiny_flow.net, schedule, "flow")
    cond = tiny_flow.encode_text(["a small blue square in the center"] * 2)
    x_T = per_sample_noise([("a", 0), ("b", 0)], tiny_flow.sample_shape)
    pred = lambda x, t: d.predict(x, t, cond)  # noqa: E731
    grid = schedule.grid(3)
    assert grid[0] == schedule.T  # every flow grid starts at σ = 1
    with torch.no_grad():
        _, eps_hat = pred(x_T, grid[0])
        assert torch.equal(eps_hat, x_T)
        for stop in (1, None):
            assert torch.equal(ddim_trajectory(pred, schedule, x_T, grid, noise_correction=True, stop_at=stop),
                               ddim_trajectory(pred, schedule, x_T, grid, stop_at=stop))
        # the teacher's flow Euler (diffusers' FlowMatchEulerDiscreteScheduler) on the same grid: its own step
        # x + (σ' − σ)û and our α'x̂_0 + σ'x_T are one number by two roundings
        run = lambda nc: solver_sample(lambda x, t: d.raw(x, t, cond), make_scheduler("euler", {"shift": shift}),  # noqa: E731
                                       schedule, x_T, 3, "flow", noise_correction=nc)
        assert torch.allclose(run(True), run(False), atol=1e-6)
