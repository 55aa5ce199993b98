"""Every registered method on a rectified-flow transformer teacher (a tiny random FLUX.1-dev pipeline built here):
the common contract (shape, range, determinism, batch invariance, counted NFE) after a couple of updates, the
Backbone interface of the flow backbone, LoRA students, and the [backbone] settings of a suite."""

import pytest
import torch

from bench.components import load_backbone
from core.errors import UserError
from methods import base
from tests import tiny_flow, tiny_sd

TEXTS = ["a large red circle at the top left", "a small blue square in the center"]
KEYS = [("p0", 0), ("p1", 0)]
SEQ = 32


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    from methods.backbones import load_dir

    d = tmp_path_factory.mktemp("flux")
    tiny_flow.build_flux(d / "pipe")
    bb = load_dir(d / "pipe", train_data=tiny_sd.image_folder(d / "data"), train_workers=0,
                                    resolution=tiny_flow.RESOLUTION, max_sequence_length=SEQ)
    return bb, d


def test_backbone_interface(flux):
    bb, _ = flux
    assert bb.sample_shape == (tiny_flow.LATENT_CHANNELS, 8, 8) and bb.resolution == 16
    assert bb.prediction_type == "flow" and bb.schedule.kind == "flow" and bb.guidance_embeds
    cond = bb.encode_text(TEXTS + [""])
    assert cond.states.shape == (3, SEQ, tiny_flow.T5_DIM) and cond.added["pooled"].shape == (3, 16)
    img = bb.to_images(torch.randn(2, *bb.sample_shape))
    assert img.shape == (2, 3, 16, 16) and img.min() >= 0 and img.max() <= 1
    assert bb.from_images(img).shape == (2, *bb.sample_shape)
    cut = bb.truncated(["a " * 40 + "circle", "a red circle"])
    assert cut == {"text_encoder": [0], "text_encoder_2": [0]}  # CLIP's 24 tokens, T5's SEQ
    # a trainable copy starts as the teacher, with or without a (zero-initialised) w-embedding
    x, t = torch.randn(2, *bb.sample_shape), torch.tensor([700.0, 300.0])
    ref = bb.net(x, t, encoder_hidden_states=cond.states[:2], added_cond_kwargs=cond.index(slice(0, 2)).added).sample
    for w_dim in (None, 8):
        net = bb.new_net(w_dim)
        kw = {"timestep_cond": torch.randn(2, 8)} if w_dim else {}
        out = net(x, t, encoder_hidden_states=cond.states[:2], added_cond_kwargs=cond.index(slice(0, 2)).added, **kw)
        assert torch.equal(out.sample, ref)
        assert all(p.requires_grad for p in net.parameters())  # trainable (full fine-tuning)...
    assert not any(p.requires_grad for p in bb.net.parameters())  # ...and the teacher stays frozen


# every method on its defaults (progressive's student keeps the teacher's velocity output); the teacher uses
# FLUX.1-dev's guidance embedding
FLOW_SETTINGS = {"teacher": {"guidance": "embedded", "guidance_scale": 3.5}}


@pytest.mark.parametrize("name", [n for n in base.names() if n != "pretrained"])
def test_every_method_trains_and_samples_on_a_flow_teacher(flux, name):
    bb, d = flux
    cls = base.get(name)
    settings = {**cls.smoke_settings(), **FLOW_SETTINGS.get(name, {})}
    m = cls(bb, cls.make_config(settings), base.Context(d / f"cache-{name}", progress=False))
    for steps in m.smoke_steps(m.config):
        m.prepare(steps)
        m.reset_nfe()
        out = m.sample(TEXTS, KEYS, steps)
        assert m.counted_nfe() == cls.budget(m.config, steps=steps).nfe * len(TEXTS)
        assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
        assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
        assert torch.equal(out, m.sample(TEXTS, KEYS, steps))
        one = m.sample(TEXTS[1:], KEYS[1:], steps)
        assert torch.allclose(one[0], out[1], atol=1e-5)


def test_lora_students_adapt_the_transformers_attention(flux):
    bb, d = flux
    cls = base.get("lcm")
    m = cls(bb, cls.make_config({**cls.smoke_settings(), "lora_rank": 2}), base.Context(d / "lora", progress=False))
    m.prepare(2)
    keys = list(m.student_net(2).state_dict())
    assert any(k.startswith("transformer.") and "lora_A" in k for k in keys)
    assert m.sample(TEXTS, KEYS, 2).shape == (2, 3, 16, 16)


def test_suite_backbone_settings(flux):
    bb, d = flux
    spec = {"kind": "diffusers", "path": str(bb.path), "resolution": 16, "max_sequence_length": 16,
            "embedded_guidance": 2.0}
    loaded = load_backbone(spec, "cpu")
    assert loaded.family == "flux" and loaded.max_sequence_length == 16 and loaded.net.default_guidance == 2.0
    with pytest.raises(UserError, match="unknown setting for \\[backbone\\] \\(flux\\) 'channels_last'"):
        load_backbone({**spec, "channels_last": True}, "cpu")
    sd = tiny_sd.build(d / "sd")
    with pytest.raises(UserError, match="'max_sequence_length'"):
        load_backbone({"kind": "diffusers", "path": str(sd), "max_sequence_length": 16}, "cpu")
