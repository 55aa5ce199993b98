"""The contract every registered method must pass (like diffusers' SchedulerCommonTest)."""

import pytest
import torch

from core.errors import UserError
from methods import base, registry

TEXTS = ["a large red circle at the top left", "a small blue square in the center",
         "a large green cross at the top right and a small yellow triangle at the bottom left"]
KEYS = [("p0", 0), ("p1", 0), ("p2", 0)]


def settings_for(name, backbone, tmp):
    cls = base.get(name)
    if name == "pretrained":  # a "published" checkpoint written here: a teacher copy saved as a UNet dir
        backbone.new_net().save_pretrained(tmp / "turbo-unet", safe_serialization=True)
        if backbone.schedule.kind == "flow":  # a flow UNet samples with the flow Euler scheduler
            return {"kind": "unet", "scheduler": "flow-euler", "path": str(tmp / "turbo-unet"), "max_steps": 4}
        return {"kind": "turbo", "path": str(tmp / "turbo-unet"), "max_steps": 4}
    return cls.smoke_settings()


@pytest.fixture(scope="module", params=[(n, k) for k in ("vp", "flow") for n in base.names()],
                ids=lambda p: f"{p[0]}-{p[1]}")
def method(request, tiny, tiny_flow, tmp_path_factory):
    name, kind = request.param
    backbone = tiny if kind == "vp" else tiny_flow
    cls = base.get(name)
    tmp = tmp_path_factory.mktemp("cache")
    ctx = base.Context(cache_dir=tmp, progress=False)
    return cls(backbone, cls.make_config(settings_for(name, backbone, tmp)), ctx)


def test_registry_lists_and_rejects():
    assert "teacher" in base.names()
    with pytest.raises(UserError, match="did you mean 'teacher'"):
        base.get("teachr")
    for name in base.names():
        cls = base.get(name)
        assert cls.name == name
        # declared in one place: the summary is the first line of the class docstring
        assert registry.summary(name) and cls.__doc__.startswith(registry.summary(name))


def test_contract(method):
    cls = type(method)
    for steps in cls.smoke_steps(method.config):
        budget = cls.budget(method.config, steps=steps)
        assert cls.budget(method.config, nfe=budget.nfe) == budget  # NFE <-> steps, resolved once, both ways
        method.prepare(steps)
        method.reset_nfe()
        a = method.sample(TEXTS, KEYS, steps)
        # counted NFE equals the budget (network calls per sample, never inferred from steps)
        assert method.counted_nfe() == budget.nfe * len(TEXTS), (method.name, budget, method.counted_nfe())
        assert a.shape == (3, *method.backbone.sample_shape) and a.dtype == torch.float32
        assert torch.isfinite(a).all() and a.min() >= 0 and a.max() <= 1
        # seed determinism
        assert torch.equal(a, method.sample(TEXTS, KEYS, steps))
        # batch-size invariance: a sample does not depend on its batch
        one = method.sample(TEXTS[1:2], KEYS[1:2], steps)
        assert torch.allclose(one[0], a[1], atol=1e-5)
        # a different seed gives a different sample
        other = method.sample(TEXTS[:1], [("p0", 1)], steps)
        assert not torch.equal(other[0], a[0])


def test_unreachable_budgets_are_user_errors(method):
    cls = type(method)
    for bad in ({"nfe": 0}, {"nfe": -2}, {"steps": 0}, {"steps": 10_000}):
        with pytest.raises(UserError):
            cls.budget(method.config, **bad)
    if cls.nfe_per_step(method.config) == 2:
        with pytest.raises(UserError, match="not reachable"):
            cls.budget(method.config, nfe=3)
