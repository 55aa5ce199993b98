"""What every trained method owes the bench, checked over all of them (the kinds of defect issue 10 found):

* the student cache cannot miss: a setting declared inference-only never changes the trained weights;
* every sampling grid is a subset of the grid the student was trained on;
* training compute is counted from the networks' passes, and the counts follow the method's structure;
* Imagine Flash draws each training sample's grid time on its own, and its adversarial term sees
  only the samples its sampler returns.
"""

import dataclasses

import pytest
import torch

from methods import base
from methods.student import DistilledMethod

TRAINED = [n for n in base.names() if issubclass(base.get(n), DistilledMethod)]


def _flip(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, float):
        return value + 0.5
    raise TypeError(f"no flip for {value!r}")


def _weights(method, steps: int) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in method.student_net(steps).parameters()])


@pytest.mark.parametrize("name", TRAINED)
def test_inference_only_fields_never_change_the_student(tiny, tmp_path, name):
    cls = base.get(name)
    settings = cls.smoke_settings()
    steps = cls.smoke_steps(cls.make_config(settings))[-1]
    ref = cls(tiny, cls.make_config(settings), base.Context(tmp_path / "a", progress=False))
    ref.prepare(steps)
    for field in cls.INFERENCE_FIELDS:
        value = getattr(ref.config, field)
        other = cls(tiny, cls.make_config({**settings, field: _flip(value)}), base.Context(tmp_path / field, progress=False))
        assert other.cache_stem(steps) == ref.cache_stem(steps)  # the same cache entry serves both...
        other.prepare(steps)
        assert torch.equal(_weights(other, steps), _weights(ref, steps)), (name, field)  # ...and rightly so


def test_every_training_setting_is_in_the_cache_key(tiny, tmp_path):
    """Flipping any field that is not declared inference-only gives another cache entry."""
    for name in TRAINED:
        cls = base.get(name)
        cfg = cls.make_config(cls.smoke_settings())
        m = cls(tiny, cfg, base.Context(tmp_path, progress=False))
        steps = cls.smoke_steps(cfg)[-1]
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if f.name in cls.INFERENCE_FIELDS or not isinstance(value, (bool, float)):
                continue
            try:
                other = cls(tiny, cls.make_config({**cls.smoke_settings(), f.name: _flip(value)}), m.ctx)
            except Exception:  # a flipped value out of the field's range: nothing to compare
                continue
            assert other.cache_stem(steps) != m.cache_stem(steps), (name, f.name)


@pytest.mark.parametrize("name", TRAINED)
def test_sampling_grids_are_subsets_of_training_grids(tiny_any, tmp_path, name):
    cls = base.get(name)
    configs = [cls.make_config({}), cls.make_config(cls.smoke_settings())]
    if "shared_student" in {f.name for f in dataclasses.fields(cls.Config)}:
        configs += [cls.make_config({"shared_student": not configs[0].shared_student})]
    for cfg in configs:
        m = cls(tiny_any, cfg, base.Context(tmp_path, progress=False))
        for steps in cls.allowed_steps(cfg):
            trained = m.training_timesteps(m.student_steps(steps))
            sampled = m.sampling_timesteps(steps)
            assert len(sampled) == steps and set(sampled) <= trained, (name, cfg, steps, sampled, sorted(trained))


def test_imagine_flash_training_compute_is_counted(tiny, tmp_path):
    """Without the adversarial term, per update: the guided teacher runs k steps on every sample (2 NFE
    each), the student one graded forward per sample plus its no-gradient rollout."""
    cls = base.get("imagine-flash")
    k, batch, updates = 2, 4, 3
    m = cls(tiny, cls.make_config({"student_updates": updates, "batch_size": batch, "adversarial": False,
                                   "teacher_steps": k}), base.Context(tmp_path, progress=False))
    info = m.prepare(3)
    assert info.passes["teacher"] == {"forward": updates * batch * 2 * k, "backward": 0}
    assert info.teacher_nfe == updates * batch * 2 * k
    assert info.passes["student"]["backward"] == updates * batch
    assert info.passes["student"]["forward"] >= updates * batch  # + rollouts
    assert info.network_passes == sum(v["forward"] + v["backward"] for v in info.passes.values())


def test_every_network_used_in_training_is_counted(tiny, tmp_path):
    roles = {"lcm": {"teacher", "student", "ema_target"}, "dmd2": {"teacher", "student", "fake_score", "discriminator"},
             "add": {"teacher", "student", "discriminator"}, "imagine-flash": {"teacher", "student", "discriminator"},
             "progressive": {"teacher", "student", "round_teacher"}}
    assert set(roles) == set(TRAINED)
    for name, expected in roles.items():
        cls = base.get(name)
        settings = {**cls.smoke_settings(), **({"adversarial": True, "adv_warmup": 0.0} if name == "imagine-flash" else {})}
        m = cls(tiny, cls.make_config(settings), base.Context(tmp_path / name, progress=False))
        info = m.prepare(1)
        assert set(info.passes) == expected, (name, info.passes)
        assert all(v["forward"] > 0 for v in info.passes.values()), (name, info.passes)


def test_imagine_flash_draws_grid_times_per_sample_and_adversaries_only_returned_samples(tiny, tmp_path, monkeypatch):
    from methods import imagine_flash
    from methods.student import AdversarialTerm

    stops, adv_batches = [], []
    real_backward = imagine_flash.backward_latent

    def spy_backward(predict, schedule, x_T, timesteps, i, nc):
        stops.append(i.clone())
        return real_backward(predict, schedule, x_T, timesteps, i, nc)

    real_g = AdversarialTerm.generator_loss

    def spy_g(self, fake_x0, cond, gen, step):
        adv_batches.append(len(fake_x0))
        return real_g(self, fake_x0, cond, gen, step)

    monkeypatch.setattr(imagine_flash, "backward_latent", spy_backward)
    monkeypatch.setattr(AdversarialTerm, "generator_loss", spy_g)
    cls = base.get("imagine-flash")
    m = cls(tiny, cls.make_config({"student_updates": 6, "batch_size": 8, "adversarial": True, "adv_warmup": 0.0,
                                   "adv_ramp": 0.0, "max_steps": 3}), base.Context(tmp_path, progress=False))
    m.prepare(3)
    assert all(s.shape == (8,) for s in stops) and any(len(s.unique()) > 1 for s in stops)
    # the adversarial term sees the samples at the last grid time (index 2) only
    assert adv_batches == [int((s == 2).sum()) for s in stops if (s == 2).any()]


def test_adversarial_weight_warms_up_then_ramps(tiny):
    from methods.student import AdversarialConfig, AdversarialTerm

    term = AdversarialTerm(None, None, AdversarialConfig(adv_warmup=0.2, adv_ramp=0.3), total_updates=10)
    assert [term.weight(s) for s in range(10)] == [0, 0, 1 / 3, 2 / 3, 1, 1, 1, 1, 1, 1]
    with pytest.raises(ValueError):
        AdversarialConfig(adv_warmup=0.6, adv_ramp=0.5)


def test_discriminator_r1_is_taken_at_the_noised_real_input(tiny):
    from methods.discriminator import TeacherFeatureDiscriminator

    disc = TeacherFeatureDiscriminator(tiny.net, tiny.schedule, tiny.encode_text([""]), patch=True)
    x = torch.rand(2, *tiny.sample_shape) * 2 - 1
    cond = tiny.encode_text(["a large red circle at the top left"] * 2)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = disc.d_loss(x, cond, x, cond, g(), r1_gamma=0.0)
    with_r1 = disc.d_loss(x, cond, x, cond, g(), r1_gamma=10.0)
    assert with_r1 > plain  # the penalty is positive and large enough to matter
    assert disc.logits(x, cond, g()).shape[1] > len(disc.heads)  # patch logits: several per head
