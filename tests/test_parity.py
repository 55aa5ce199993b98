"""Parity with diffusers: the `teacher` method is the diffusers pipeline a user would otherwise run, and each
`pretrained` recipe is the pipeline call its model card gives (tiny random SD / SDXL pipelines, CPU).

Same scheduler, steps, guidance and starting latents; decoded images must agree to 1e-5.
"""

import diffusers
import pytest

from methods import base
from methods.backbones import load_dir
from methods.sampling import make_scheduler, per_sample_generators, per_sample_noise
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


def _checkpoint(bb, tmp_path, kind: str):
    """A "published" checkpoint written here in the format the real one ships in (weights: a teacher copy)."""
    if kind == "lora":
        return str(tiny_sd.make_loras(bb.path, tmp_path / "loras") / "lora_peft.safetensors")
    unet = bb.new_net(time_cond_proj_dim=32) if kind == "w-unet" else bb.new_net()
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    return str(tmp_path / "unet")


# recipe -> (checkpoint format, the model card's scheduler and its kwargs, steps, guidance, extra pipeline kwargs)
CARDS = {
    "lcm-lora-sdxl": ("lora", diffusers.LCMScheduler, {}, 4, 0.0, {}),
    "lcm-sdxl": ("w-unet", diffusers.LCMScheduler, {}, 4, 8.0, {}),
    "sdxl-turbo": ("unet", diffusers.EulerAncestralDiscreteScheduler, {"timestep_spacing": "trailing"}, 2, 0.0, {}),
    "sdxl-lightning-4step": ("unet", diffusers.EulerDiscreteScheduler, {"timestep_spacing": "trailing"}, 4, 0.0, {}),
    "sdxl-lightning-1step": ("unet", diffusers.EulerDiscreteScheduler,
                             {"timestep_spacing": "trailing", "prediction_type": "sample"}, 1, 0.0, {}),
    "hyper-sdxl-8step-cfg-lora": ("lora", diffusers.DDIMScheduler, {"timestep_spacing": "trailing"}, 8, 5.0, {}),
    "tcd-sdxl-lora": ("lora", diffusers.TCDScheduler, {}, 4, 0.0, {"eta": 0.3}),
    "dmd2-sdxl-4step": ("unet", diffusers.LCMScheduler, {}, 4, 0.0, {"timesteps": [999, 749, 499, 249]}),
}


@pytest.mark.parametrize("recipe", sorted(CARDS))
def test_each_recipe_equals_its_model_cards_pipeline_call(setup, recipe, tmp_path):
    bb, _, sdxl = setup
    if not sdxl:
        pytest.skip("the recipes' model cards are SDXL pipelines")
    fmt, sched_cls, sched_kw, steps, guidance, extra = CARDS[recipe]
    path = _checkpoint(bb, tmp_path, fmt)
    cls = base.get("pretrained")
    m = cls(bb, cls.make_config({"recipe": recipe, "path": path}), base.Context(tmp_path))
    ours = m.sample(TEXTS, KEYS, steps)
    m.prepare(steps)
    unet = m.denoiser.net.net  # the checkpoint's UNet, LoRA fused, as the pipeline would hold it
    scheduler = sched_cls.from_config(bb.scheduler_config, **sched_kw)
    kw = dict(extra)
    if isinstance(scheduler, (diffusers.LCMScheduler, diffusers.TCDScheduler, diffusers.EulerAncestralDiscreteScheduler)):
        kw["generator"] = per_sample_generators(KEYS, 1)
    if "timesteps" in kw:
        steps = None
    theirs = call(pipeline(bb, scheduler, unet), bb, steps, guidance, **kw)
    assert (ours - theirs).abs().max() <= TOL, recipe
