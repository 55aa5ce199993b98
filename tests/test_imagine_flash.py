"""Mechanics of Imagine Flash's components, and the ablation suite's one-switch rows."""

import ast
import dataclasses
import subprocess
import sys

import pandas as pd
import pytest
import torch

from bench import suite as suite_mod
from methods import diffusion as D
from methods.imagine_flash import ImagineFlashConfig, backward_latent, srl_input, teacher_target
from methods.sampling import Denoiser, ddim_trajectory
from tests.conftest import ROOT


class Recorder:
    """A fake ε-predictor that records the times it is called at and whether gradients were on."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t):
        self.calls.append((int(t), torch.is_grad_enabled()))
        eps = 0.1 * x
        s = D.Schedule.scaled_linear()
        return D.x0_from_eps(x, eps, s.alpha(t).float(), s.sigma(t).float()), eps


def test_backward_rollout_runs_the_students_sampler_without_gradient_to_the_grid_time():
    sched = D.Schedule.scaled_linear()
    grid = D.trailing_timesteps(3)
    x_T = torch.randn(2, 3, 4, 4)
    for i in range(3):
        rec = Recorder()
        x_t = backward_latent(rec, sched, x_T, grid, i, noise_correction=True)
        assert [c[0] for c in rec.calls] == grid[:i]  # the student's own grid, stopping before grid[i]
        assert not any(c[1] for c in rec.calls)  # no gradient
        # the latent is exactly the student's sampler state at grid[i] (i = 0: pure noise x_T)
        assert torch.allclose(x_t, ddim_trajectory(Recorder(), sched, x_T, grid, True, stop_at=i))
    assert torch.equal(backward_latent(Recorder(), sched, x_T, grid, 0, True), x_T)


def test_per_sample_rollouts_and_targets_equal_their_one_sample_versions(tiny):
    sched = D.Schedule.scaled_linear()
    grid = D.trailing_timesteps(3)
    x_T = torch.randn(4, 3, 4, 4)
    i = torch.tensor([2, 0, 1, 2])
    together = backward_latent(Recorder(), sched, x_T, grid, i, noise_correction=True)
    for b in range(4):
        alone = backward_latent(Recorder(), sched, x_T[b : b + 1], grid, int(i[b]), noise_correction=True)
        assert torch.allclose(together[b : b + 1], alone, atol=1e-6)
    teacher = Denoiser(tiny.net, tiny.schedule)
    cond = tiny.encode_text(["a large red circle at the top left"] * 2)
    uncond = tiny.encode_text(["", ""])
    chi = torch.randn(2, *tiny.sample_shape)
    t = torch.tensor([999, 333])
    both = teacher_target(teacher, chi, t, 2, cond, uncond, 3.0)
    for b in range(2):
        one = teacher_target(teacher, chi[b : b + 1], int(t[b]), 2, cond.index(slice(b, b + 1)),
                             uncond.index(slice(b, b + 1)), 3.0)
        assert torch.allclose(both[b : b + 1], one, atol=1e-4)


def test_srl_input_is_built_at_gamma_t_from_the_stop_gradient_prediction():
    sched = D.Schedule.scaled_linear()
    x0 = torch.randn(2, 3, 4, 4, requires_grad=True)
    eps = torch.randn(2, 3, 4, 4)
    chi, t_phi = srl_input(x0, 666, 0.5, sched, eps)
    assert t_phi == 333
    assert not chi.requires_grad  # sg(x̂_0)
    expected = sched.alpha(333).float() * x0.detach() + sched.sigma(333).float() * eps
    assert torch.allclose(chi, expected, atol=1e-6)


def test_teacher_target_runs_k_guided_steps_from_the_shifted_time(tiny):
    calls = []

    class Spy(torch.nn.Module):
        def forward(self, x, t, **kw):
            calls.append((int(t[0]), x.shape[0]))
            return tiny.net(x, t, **kw)

    teacher = Denoiser(Spy(), tiny.schedule)
    cond = tiny.encode_text(["a large red circle at the top left"] * 2)
    uncond = tiny.encode_text(["", ""])
    chi = torch.randn(2, *tiny.sample_shape)
    out = teacher_target(teacher, chi, 500, 2, cond, uncond, 3.0)
    assert [c[0] for c in calls] == [500, 250]  # k = 2 DDIM steps from t_Φ = γ(t)
    assert all(c[1] == 4 for c in calls)  # guided: [uncond; cond] in one call
    assert out.shape == chi.shape and not out.requires_grad


def test_sampling_noise_correction_is_inference_only_and_rollout_noise_correction_is_not(tiny, tmp_path):
    from methods import base

    cls = base.get("imagine-flash")
    ctx = base.Context(cache_dir=tmp_path, progress=False)
    settings = {"student_updates": 1, "batch_size": 2, "adversarial": False}
    on = cls(tiny, cls.make_config({**settings, "noise_correction": True}), ctx)
    off = cls(tiny, cls.make_config({**settings, "noise_correction": False}), ctx)
    rollout_off = cls(tiny, cls.make_config({**settings, "rollout_noise_correction": False}), ctx)
    assert on.cache_stem(3) == off.cache_stem(3)  # the same student serves both rows
    assert rollout_off.cache_stem(3) != on.cache_stem(3)  # the rollouts train the student: another student
    texts, keys = ["a small blue square in the center"], [("p", 0)]
    assert torch.equal(on.sample(texts, keys, 1), off.sample(texts, keys, 1))  # one step: nothing to correct
    assert not torch.equal(on.sample(texts, keys, 3), off.sample(texts, keys, 3))


def test_no_method_imports_an_evaluator():
    """Static: nothing under methods/ imports the harness (its evaluators, metrics or world) at all."""
    for path in (ROOT / "methods").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n == "bench" or n.startswith("bench.") for n in names), (path, names)


def test_training_every_method_never_loads_an_evaluator():
    """Runtime: train every registered method (smoke budgets); the evaluator module is never imported."""
    code = f"""
import sys, tempfile, torch
sys.path.insert(0, {str(ROOT)!r})
from tests.conftest import tiny_backbone
from methods import base
bb = tiny_backbone()
for name in base.names():
    if name == "pretrained":  # loads a published checkpoint from a path; trains nothing
        continue
    cls = base.get(name)
    m = cls(bb, cls.make_config(cls.smoke_settings()), base.Context(tempfile.mkdtemp(), progress=False))
    for steps in m.smoke_steps(m.config):
        m.prepare(steps)
    if name == "imagine-flash":
        from methods.discriminator import TeacherFeatureDiscriminator
        d = TeacherFeatureDiscriminator(bb.net, bb.schedule, bb.encode_text(['']))
        assert d.teacher[0] is bb.net  # its features are the teacher's
print("evaluators loaded:", "bench.shapes.evaluators" in sys.modules, "bench.metrics" in sys.modules)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "evaluators loaded: False False" in r.stdout


def test_ablation_rows_change_exactly_one_setting_from_the_defaults():
    s = suite_mod.load("ablations")
    flash = {}
    for e in s.entries:
        if e.name == "imagine-flash":
            flash.setdefault(e.variant, []).append(e)
    assert set(flash) >= {"full", "with-noise-correction", "no-backward-distillation", "no-srl"}
    assert {"no-discriminator", "with-discriminator"} & set(flash)
    assert all(sorted(e.train_seed for e in es) == [0, 1, 2] for es in flash.values())  # three training seeds each
    defaults = dataclasses.asdict(ImagineFlashConfig())
    for variant, es in flash.items():
        for e in es:
            cfg = dataclasses.asdict(e.config)
            diff = {k for k in defaults if defaults[k] != cfg[k]} - {"seed"}
            if variant == "full":
                assert not diff, diff  # full is the method's defaults
            else:
                assert len(diff) == 1, (variant, diff)
    teacher = {(e.label, b.steps) for e in s.entries if e.name == "teacher" for b in e.budgets}
    assert {("teacher-dpm++", 3), ("teacher-dpm++", 25), ("teacher-dpm++-nc", 3)} <= teacher


def test_paper_flow_ablation_rows_change_exactly_one_setting_from_its_full_row():
    s = suite_mod.load("paper-flow")
    assert s.backbone == {"kind": "shapes", "teacher": "flow"}
    flash = {e.variant: dataclasses.asdict(e.config) for e in s.entries if e.name == "imagine-flash"}
    assert set(flash) == {"full", "with-noise-correction", "with-discriminator", "no-backward-distillation", "no-srl"}
    for variant, cfg in flash.items():
        diff = {k for k in cfg if cfg[k] != flash["full"][k]}
        assert len(diff) == (variant != "full"), (variant, diff)
    # the paper suite's rows, on the other teacher
    paper = {(e.label, b.steps) for e in suite_mod.load("paper").entries for b in e.budgets}
    assert paper - {("teacher-unipc", k) for k in range(1, 5)} <= {(e.label, b.steps) for e in s.entries for b in e.budgets}


@pytest.mark.parametrize("bad", [{"rho": 0.0}, {"rho": 1.5}, {"teacher_steps": 0}, {"max_steps": 0}])
def test_bad_settings_are_rejected(bad):
    from core.errors import UserError
    from methods.imagine_flash import ImagineFlash

    with pytest.raises(UserError):
        ImagineFlash.make_config(bad)


@pytest.mark.parametrize("nc_variant", ["no-noise-correction", "with-noise-correction"])
def test_claim_c_reads_noise_correction_from_the_row_that_removes_or_adds_it(nc_variant):
    """Claim (c)'s noise-correction half compares full with the row that differs in noise correction, whichever
    way the default points (the noise-correction study turned it off): FID tied and a colour statistic moved."""
    from bench.results import claims

    def row(variant, fid, contrast):
        return {"label": variant, "method": "imagine-flash", "variant": variant, "steps": 3, "status": "ok",
                "fid": fid, "fid_ci_low": fid - 0.5, "fid_ci_high": fid + 0.5,
                "contrast": contrast, "contrast_ci_low": contrast - 0.01, "contrast_ci_high": contrast + 0.01}

    df = pd.DataFrame([row("full", 3.0, 0.10), row("no-srl", 9.0, 0.10), row("no-backward-distillation", 8.0, 0.10),
                       row("with-discriminator", 3.2, 0.10), row(nc_variant, 3.1, 0.15)])
    out = claims.claim_c(df)
    assert out["verdict"] == claims.REPRODUCED, out
    assert any(nc_variant in e for e in out["evidence"])
    assert claims.claim_c(df[df["variant"] != nc_variant])["verdict"] == claims.MISSING
