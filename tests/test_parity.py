"""Parity with diffusers: the `teacher` method is the diffusers pipeline a user would otherwise run (tiny random SD /
SDXL pipelines, CPU). Each `pretrained` recipe against its model card's call: tests/test_cards.py.

Same scheduler, steps, guidance and starting latents; decoded images must agree to 1e-5.
"""

import diffusers
import pytest

from methods import base
from methods.backbones import load_dir
from methods.sampling import make_scheduler, per_sample_noise
from tests import tiny_sd

TEXTS = ["a red apple on a table", "a blue car in the street"]
KEYS = [("p0", 0), ("p1", 0)]
TOL = 1e-5


@pytest.fixture(scope="module", params=[False, True], ids=["sd", "sdxl"])
def setup(request, tmp_path_factory):
    sdxl = request.param
    root = tiny_sd.build(tmp_path_factory.mktemp("parity") / "pipe", sdxl=sdxl)
    bb = load_dir(root)
    return bb, root, sdxl


def pipeline(bb, scheduler, unet=None):
    kw = dict(vae=bb.vae, unet=unet or bb.net, scheduler=scheduler, tokenizer=bb.tokenizers[0],
              text_encoder=bb.text_encoders[0])
    if bb.family == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(**kw, tokenizer_2=bb.tokenizers[1], text_encoder_2=bb.text_encoders[1])
    else:
        pipe = diffusers.StableDiffusionPipeline(**kw, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, bb, steps, guidance, **kw):
    latents = per_sample_noise(KEYS, bb.sample_shape)
    return pipe(TEXTS, num_inference_steps=steps, guidance_scale=guidance, latents=latents, output_type="pt",
                height=bb.resolution, width=bb.resolution, **kw).images


@pytest.mark.parametrize("solver", ["ddim", "dpmsolver++", "euler", "unipc"])
def test_teacher_equals_the_diffusers_pipeline(setup, solver, tmp_path):
    bb, _, _ = setup
    cls = base.get("teacher")
    ours = cls(bb, cls.make_config({"solver": solver, "guidance_scale": 3.0}), base.Context(tmp_path)).sample(TEXTS, KEYS, 4)
    theirs = call(pipeline(bb, make_scheduler(solver, bb.scheduler_config)), bb, 4, 3.0)
    assert (ours - theirs).abs().max() <= TOL
