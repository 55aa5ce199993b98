"""The teacher's guidance forms: network evaluations counted per step and sample, and what each computes.

cfg (one batched call on [uncond; cond]) and true-cfg (two calls) cost 2 NFE per step; embedded (the scale fed
to the network's guidance embedding, FLUX.1-dev) and none cost 1.
"""

import copy

import pytest
import torch
from torch import nn

from core.errors import UserError
from methods import base
from methods.sampling import GUIDANCE_NFE

KEYS = [("p0", 0), ("p1", 0), ("p2", 1)]
TEXTS = ["a large red circle at the top left", "two small blue squares", "a green triangle"]


class GuidanceEmbeddedNet(nn.Module):
    """The tiny shapes UNet, told the guidance scale: its output moves by 0.1·guidance (records every call)."""

    def __init__(self, unet):
        super().__init__()
        self.net, self.guidance_seen = unet, []
        self.config = unet.config

    def forward(self, x, t, encoder_hidden_states=None, guidance=None, **kwargs):
        assert guidance is not None and guidance.shape == (x.shape[0],) and guidance.dtype == torch.float32
        self.guidance_seen.append(guidance.clone())
        out = self.net(x, t, encoder_hidden_states=encoder_hidden_states, **kwargs)
        out.sample = out.sample + 0.1 * guidance[:, None, None, None].to(out.sample.dtype)
        return out


@pytest.fixture(scope="module")
def embedded_backbone(tiny):
    bb = copy.copy(tiny)
    bb.net = GuidanceEmbeddedNet(tiny.net)
    bb.guidance_embeds = True
    return bb


def _teacher(bb, tmp_path, **settings):
    cls = base.get("teacher")
    return cls(bb, cls.make_config({"solver": "euler", **settings}), base.Context(tmp_path, progress=False))


@pytest.mark.parametrize("form", list(GUIDANCE_NFE))
def test_counted_nfe_per_step_per_sample(tiny, embedded_backbone, tmp_path, form):
    bb = embedded_backbone if form == "embedded" else tiny
    teacher = _teacher(bb, tmp_path, guidance=form)
    steps = 3
    assert teacher.budget(teacher.config, steps=steps).nfe == steps * {"cfg": 2, "true-cfg": 2}.get(form, 1)
    images = teacher.sample(TEXTS, KEYS, steps)
    assert images.shape == (len(KEYS), 3, *tiny.sample_shape[1:])
    assert teacher.counted_nfe() == len(KEYS) * steps * GUIDANCE_NFE[form]


def test_true_cfg_equals_cfg(tiny, tmp_path):
    batched = _teacher(tiny, tmp_path, guidance="cfg", guidance_scale=3.0).sample(TEXTS, KEYS, 4)
    sequential = _teacher(tiny, tmp_path, guidance="true-cfg", guidance_scale=3.0).sample(TEXTS, KEYS, 4)
    plain = _teacher(tiny, tmp_path, guidance="none").sample(TEXTS, KEYS, 4)
    assert torch.allclose(batched, sequential, atol=1e-5)
    assert (batched - plain).abs().max() > 1e-3  # guidance at 3 does change the images


def test_embedded_feeds_the_scale_to_the_network(embedded_backbone, tmp_path):
    net = embedded_backbone.net
    net.guidance_seen.clear()
    a = _teacher(embedded_backbone, tmp_path, guidance="embedded", guidance_scale=3.5).sample(TEXTS, KEYS, 2)
    assert net.guidance_seen and all(torch.all(g == 3.5) for g in net.guidance_seen)
    b = _teacher(embedded_backbone, tmp_path, guidance="embedded", guidance_scale=0.0).sample(TEXTS, KEYS, 2)
    assert (a - b).abs().max() > 1e-4


def test_embedded_is_refused_without_a_guidance_embedding(tiny, tmp_path):
    with pytest.raises(UserError, match="guidance embedding"):
        _teacher(tiny, tmp_path, guidance="embedded")


def test_unknown_guidance_form_is_a_user_error():
    with pytest.raises(UserError, match="guidance"):
        base.get("teacher").make_config({"guidance": "cgf"})
