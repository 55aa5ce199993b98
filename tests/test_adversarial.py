"""The adversarial term's options (head start, update ratio, generator loss, bounded GAN gradient), its held-out
discriminator accuracy, the "shown to learn" rule, and how tables and claims mark a term that did not learn."""

import math

import pandas as pd
import pytest
import torch

from core.errors import UserError
from methods.base import Context, get
from methods.student import ACTIVE_WINDOW, AdversarialConfig, AdversarialTerm, wilson_interval
from methods.training import balanced_step


# --- settings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [{"gan_loss": "wasserstein"}, {"gan_grad_ratio": 0.0}, {"gan_grad_ratio": -1.0},
                                      {"disc_steps": 0}, {"disc_warmup": -1}])
def test_bad_settings_are_user_errors(settings):
    with pytest.raises(UserError):
        get("add").make_config(settings)


@pytest.mark.parametrize("method", ["dmd2", "imagine-flash"])
def test_extra_discriminator_updates_only_where_the_trainer_draws_them(method):
    with pytest.raises(UserError, match="not available"):
        get(method).make_config({"disc_steps": 2})
    cfg = get("add").make_config({"disc_steps": 2, "disc_warmup": 5, "gan_loss": "non-saturating",
                                  "gan_grad_ratio": 0.1})
    assert (cfg.disc_steps, cfg.disc_warmup, cfg.gan_loss, cfg.gan_grad_ratio) == (2, 5, "non-saturating", 0.1)


def test_add_defaults_bound_the_gan_gradient_after_a_head_start():
    cfg = get("add").make_config({})
    assert (cfg.gan_grad_ratio, cfg.disc_warmup, cfg.disc_loss, cfg.r1_gamma) == (0.1, 50, "hinge", 1e-5)


def test_defaults_of_dmd2_and_imagine_flash_are_unchanged():
    for method in ("dmd2", "imagine-flash"):
        cfg = get(method).make_config({})
        assert (cfg.disc_warmup, cfg.disc_steps, cfg.gan_loss, cfg.gan_grad_ratio, cfg.gan_grad_stats) == \
            (0, 1, None, None, False)


# --- the bounded GAN gradient -------------------------------------------------------------------------


def _linear_problem():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    x = torch.randn(8, 4)
    y = net(x)
    main, extra = y.pow(2).mean(), 10 * y[:, 0].sum()
    grads = [torch.autograd.grad(loss, list(net.parameters()), retain_graph=True) for loss in (main, extra)]
    return net, main, extra, grads


@pytest.mark.parametrize("ratio", [None, 0.1, 1e6])
def test_balanced_step_moves_along_main_plus_the_scaled_extra_gradient(ratio):
    net, main, extra, (gm, ge) = _linear_problem()
    norm = lambda gs: math.sqrt(sum(float(g.pow(2).sum()) for g in gs))  # noqa: E731
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    out = balanced_step(opt, main, extra, net.parameters(), grad_clip=None, ratio=ratio)
    scale = 1.0 if ratio is None else min(1.0, ratio * norm(gm) / norm(ge))
    assert out["grad_main"] == pytest.approx(norm(gm), rel=1e-5)
    assert out["grad_extra"] == pytest.approx(norm(ge), rel=1e-5)
    assert out["grad_scale"] == pytest.approx(scale, rel=1e-5)
    cos = sum(float((a * b).sum()) for a, b in zip(gm, ge)) / (norm(gm) * norm(ge))
    assert out["grad_cos"] == pytest.approx(cos, rel=1e-4, abs=1e-6)
    for p, p0, a, b in zip(net.parameters(), before, gm, ge):
        torch.testing.assert_close(p.detach(), p0 - (a + scale * b))
    if ratio == 0.1:  # the extra gradient was bounded to a tenth of the main one
        assert scale * out["grad_extra"] == pytest.approx(0.1 * out["grad_main"], rel=1e-5)


# --- the "shown to learn" rule --------------------------------------------------------------------------


def test_wilson_interval_closed_form():
    lo, hi = wilson_interval(50, 100)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)


def _term(total: int) -> AdversarialTerm:
    return AdversarialTerm(None, None, AdversarialConfig(), total)


@pytest.mark.parametrize("rate,updates,gen,active", [(0.5, 100, 100, False), (0.55, 100, 100, True),
                                                       (0.52, 100, 100, False), (0.9, 100, 0, False),
                                                       (0.9, 100, 1, True)])
def test_active_only_when_the_interval_leaves_chance_and_the_generator_used_the_term(rate, updates, gen, active):
    term = _term(updates)
    for step in range(updates):  # 64 scores per update; only the last ACTIVE_WINDOW updates count
        term.tally[step] = [round(rate * 64) if step >= updates - ACTIVE_WINDOW else 64, 64]
    term.generator_updates = gen
    v = term.verdict()
    assert v["active"] is active
    assert v["seen"] == 64 * ACTIVE_WINDOW
    assert v["ci"][0] < v["disc_acc"] < v["ci"][1]


# --- ADD with every option, on the tiny backbone --------------------------------------------------------


def _train(tiny, cache, **settings):
    cls = get("add")
    m = cls(tiny, cls.make_config({"student_updates": 3, "batch_size": 2, **settings}),
            Context(cache_dir=cache, progress=False))
    return m, m.prepare(1)


def test_add_head_start_ratio_and_extra_updates_are_counted_and_logged(tiny, cache):
    _, info = _train(tiny, cache, disc_warmup=2, disc_steps=2, gan_grad_ratio=0.5, gan_loss="non-saturating")
    log, n, updates = info.losses, 2, 3
    # per update: a bounded GAN gradient, the held-out accuracy of every discriminator update, the head start
    for main, gan, scale in zip(log["g_norm_main"], log["g_norm_gan"], log["g_scale"]):
        assert scale * gan <= 0.5 * main * (1 + 1e-5)
    assert {"d_acc", "d_acc_real", "d_acc_fake", "d_acc_extra", "d_head_start"} <= set(log)
    # passes: two student backward passes per update (the gradients apart); student forwards for every
    # discriminator batch (head start 2, one extra per update); discriminator: real + fake per update, + the GAN term
    p = info.passes
    assert p["student"]["backward"] == 2 * n * updates
    assert p["student"]["forward"] == n * (updates + 2 + updates)
    d_updates = 2 + 2 * updates
    assert p["discriminator"]["forward"] == 2 * n * d_updates + n * updates
    v = info.adversarial
    assert set(v) >= {"active", "disc_acc", "ci", "seen"} and v["generator_updates"] == updates
    assert v["seen"] == 2 * n * 2 * updates  # the head start is not in the tally


def test_gradient_statistics_do_not_change_the_student(tiny, tmp_path):
    plain = {"gan_grad_ratio": None, "disc_warmup": 0}  # ADD's issue-20 defaults off: one backward pass
    a, _ = _train(tiny, tmp_path / "a", **plain)
    b, info = _train(tiny, tmp_path / "b", **plain, gan_grad_stats=True)
    assert "g_cos" in info.losses
    # summing the two gradients apart reorders float additions; Adam turns a near-zero gradient's rounding into up
    # to lr per update, so the tolerance is a small fraction of lr x updates (3e-4 at ADD's lr 1e-4), not of 1
    for (k, x), y in zip(a.nets[0].state_dict().items(), b.nets[0].state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=k)


def test_generator_loss_follows_gan_loss(tiny):
    from methods.discriminator import TeacherFeatureDiscriminator

    null = tiny.encode_text(["a red circle"])
    disc = TeacherFeatureDiscriminator(tiny.net, tiny.schedule, null, loss="hinge")
    x0 = torch.randn(2, *tiny.sample_shape)
    cond = tiny.encode_text(["a red circle", "a blue square"])
    d = disc.logits(x0, cond, torch.Generator().manual_seed(1))
    hinge = disc.g_loss(x0, cond, torch.Generator().manual_seed(1))
    ns = disc.g_loss(x0, cond, torch.Generator().manual_seed(1), loss="non-saturating")
    torch.testing.assert_close(hinge, -d.mean())
    torch.testing.assert_close(ns, torch.nn.functional.softplus(-d).mean())


# --- tables and claims -----------------------------------------------------------------------------------


def test_table_a_and_claims_mark_an_inactive_gan_term():
    from bench.results import claims, tables

    def row(label, method, seed, adversarial):
        return {"label": label, "method": method, "variant": None, "steps": 4, "nfe": 4, "n_samples": 10,
                "status": "ok", "error": None, "train_seed": seed, "fid": 5.0, "fid_ci_low": 4.0, "fid_ci_high": 6.0,
                "train": {"student_updates": 3, "adversarial": adversarial}}

    on = {"active": True, "disc_acc": 0.8, "ci": [0.7, 0.9]}
    off = {"active": False, "disc_acc": 0.5, "ci": [0.45, 0.55]}
    df = pd.DataFrame([row("add", "add", 0, off), row("add", "add", 1, off), row("dmd2", "dmd2", 0, on),
                       row("mixed", "dmd2", 0, on), row("mixed", "dmd2", 1, off), row("lcm", "lcm", 0, None)])
    agg = tables.aggregate(df)
    assert list(agg["gan"].fillna("none")) == ["inactive", "active", "active in 1/2", "none"]
    a = tables.table_a(agg)
    assert list(a["method"]) == ["add (GAN inactive)", "dmd2", "mixed (GAN active in 1/2)", "lcm"]
    notes = claims.adversarial_notes(agg)
    assert notes[0].startswith("add at 4 steps: GAN inactive (discriminator held-out accuracy 0.500")
    assert len(notes) == 3
    text, _ = claims.report(agg, "t")
    assert "## Adversarial terms" in text
