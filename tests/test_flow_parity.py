"""Parity with diffusers for rectified-flow teachers: the `teacher` method is the StableDiffusion3Pipeline /
FluxPipeline call a user would otherwise run (tiny random pipelines built here, CPU). The flow recipes against their
model cards' calls: tests/test_cards.py.

Same scheduler, steps, guidance and starting latents (``per_sample_noise``; FLUX's packed into 2×2 tokens as
FluxPipeline takes them); decoded images must agree to 1e-5.
"""

import diffusers
import pytest
import torch

from core.errors import UserError
from methods import base
from methods.backbones import family_of, load_dir
from methods.sampling import make_scheduler, per_sample_noise
from tests import tiny_flow

TEXTS = ["a red apple on a table", "a blue car in the street"]
KEYS = [("p0", 0), ("p1", 0)]
TOL = 1e-5
SEQ = 64  # T5 tokens (a setting; small to keep the tests fast)


@pytest.fixture(scope="module")
def flux_dev(tmp_path_factory):
    root = tiny_flow.build_flux(tmp_path_factory.mktemp("flux") / "dev", guidance_embeds=True)
    return load_dir(root, resolution=tiny_flow.RESOLUTION, max_sequence_length=SEQ)


@pytest.fixture(scope="module")
def flux_schnell(tmp_path_factory):
    root = tiny_flow.build_flux(tmp_path_factory.mktemp("flux") / "schnell", guidance_embeds=False)
    return load_dir(root, resolution=tiny_flow.RESOLUTION, max_sequence_length=SEQ)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    root = tiny_flow.build_sd3(tmp_path_factory.mktemp("sd3") / "sd3")
    return load_dir(root, max_sequence_length=SEQ)


def teacher(bb, tmp_path, steps, **settings):
    cls = base.get("teacher")
    m = cls(bb, cls.make_config(settings), base.Context(tmp_path))
    images = m.sample(TEXTS, KEYS, steps)
    assert m.counted_nfe() == len(KEYS) * steps * cls.nfe_per_step(m.config)
    return images


def pipe_call(bb, scheduler, steps, transformer=None, max_sequence_length=SEQ, **kw):
    """The pipeline a user would run, on the same modules and starting latents."""
    latents = per_sample_noise(KEYS, bb.sample_shape)
    if bb.family == "flux":
        b, c, h, w = latents.shape
        latents = diffusers.FluxPipeline._pack_latents(latents, b, c, h, w)
    pipe = bb.pipeline(transformer=transformer, scheduler=scheduler)
    return pipe(TEXTS, num_inference_steps=steps, latents=latents, output_type="pt", height=bb.resolution,
                width=bb.resolution, max_sequence_length=max_sequence_length, **kw).images


@pytest.mark.parametrize("solver", ["euler", "dpmsolver++", "unipc"])
@pytest.mark.parametrize("guidance", ["cfg", "none"])
def test_sd3_teacher_equals_the_pipeline(sd3, tmp_path, solver, guidance):
    w = 3.0 if guidance == "cfg" else 1.0  # the SD3 pipeline guides when guidance_scale > 1
    ours = teacher(sd3, tmp_path, 4, solver=solver, guidance=guidance, guidance_scale=w)
    theirs = pipe_call(sd3, make_scheduler(solver, sd3.scheduler_config), 4, guidance_scale=w)
    assert (ours - theirs).abs().max() <= TOL


@pytest.mark.parametrize("solver", ["euler", "dpmsolver++", "unipc"])
def test_flux_dev_embedded_guidance_equals_the_pipeline(flux_dev, tmp_path, solver):
    ours = teacher(flux_dev, tmp_path, 4, solver=solver, guidance="embedded", guidance_scale=3.5)
    theirs = pipe_call(flux_dev, make_scheduler(solver, flux_dev.scheduler_config), 4, guidance_scale=3.5)
    assert (ours - theirs).abs().max() <= TOL
    other = teacher(flux_dev, tmp_path, 4, solver=solver, guidance="embedded", guidance_scale=1.0)
    assert (ours - other).abs().max() > 1e-4  # the embedded scale does reach the network


@pytest.mark.parametrize("form", ["true-cfg", "cfg"])
def test_flux_true_cfg_equals_the_pipeline(flux_dev, tmp_path, form):
    """FluxPipeline's true_cfg_scale with the empty negative prompt (embedded guidance at its default 3.5)."""
    ours = teacher(flux_dev, tmp_path, 3, solver="euler", guidance=form, guidance_scale=2.5)
    theirs = pipe_call(flux_dev, make_scheduler("euler", flux_dev.scheduler_config), 3, true_cfg_scale=2.5,
                       negative_prompt=[""] * len(TEXTS), guidance_scale=flux_dev.settings.embedded_guidance)
    assert (ours - theirs).abs().max() <= TOL


@pytest.mark.parametrize("steps", [1, 4])
def test_flux_schnell_without_guidance_equals_the_pipeline(flux_schnell, tmp_path, steps):
    assert not flux_schnell.guidance_embeds and flux_schnell.schedule.mu is None
    ours = teacher(flux_schnell, tmp_path, steps, solver="euler", guidance="none")
    theirs = pipe_call(flux_schnell, make_scheduler("euler", flux_schnell.scheduler_config), steps, guidance_scale=0.0)
    assert (ours - theirs).abs().max() <= TOL


def test_embedded_guidance_is_refused_without_a_guidance_embedding(flux_schnell, sd3, tmp_path):
    cls = base.get("teacher")
    for bb in (flux_schnell, sd3):
        with pytest.raises(UserError, match="guidance embedding"):
            cls(bb, cls.make_config({"guidance": "embedded"}), base.Context(tmp_path))


def test_flux_sampling_grid_is_the_pipelines(flux_dev):
    """FluxPipeline's σ = linspace(1, 1/steps, steps) shifted by mu from the token count (calculate_shift)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = flux_dev.scheduler_config
    seq = (flux_dev.latent_size // 2) ** 2
    mu = calculate_shift(seq, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"], cfg["max_shift"])
    assert flux_dev.schedule.mu == pytest.approx(mu, abs=1e-12)
    grid = torch.tensor(flux_dev.schedule.grid(4))
    pipe = diffusers.FlowMatchEulerDiscreteScheduler.from_config(cfg)
    pipe.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=mu)
    assert torch.allclose(grid.float(), pipe.timesteps, atol=1e-3)


def test_families_are_chosen_by_model_index_and_unsupported_ones_named(tmp_path):
    sana, sd = tmp_path / "sana", tmp_path / "sd"
    (sana / "transformer").mkdir(parents=True)
    (sana / "model_index.json").write_text('{"_class_name": "SanaPipeline"}')
    with pytest.raises(UserError, match="a SanaPipeline \\(not supported yet\\); flashbench loads FluxPipeline, "):
        family_of(sana)
    (sd / "unet").mkdir(parents=True)
    assert family_of(sd) == "sd"  # no model_index.json: a UNet layout by its folders
    (sd / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    assert family_of(sd) == "sd3"  # the pipeline class decides


def test_identity_hashes_the_files_loaded(flux_dev, sd3):
    for bb in (flux_dev, sd3):
        ident = bb.identity()
        assert ident["family"] == bb.family and len(ident["sha256"]) == 64
        assert "transformer/diffusion_pytorch_model.safetensors" in ident["files"]
        assert any(k.startswith("tokenizer_2/") for k in ident["files"])
    assert flux_dev.identity()["sha256"] != sd3.identity()["sha256"]


def test_flow_recipes_are_refused_where_they_do_not_fit(flux_schnell, tmp_path, tiny):
    cls = base.get("pretrained")
    with pytest.raises(UserError, match="not an SD3/FLUX pipeline"):
        cls(tiny, cls.make_config({"recipe": "flux1-schnell", "path": "x"}), base.Context(tmp_path))
    with pytest.raises(UserError, match="flow-euler"):
        cls(flux_schnell, cls.make_config({"recipe": "sdxl-turbo", "path": "x"}), base.Context(tmp_path))
    lora = tiny_flow.flux_lora(flux_schnell.path, tmp_path / "lora")
    m = cls(flux_schnell, cls.make_config({"recipe": "hyper-flux1-dev-8step-lora", "path": str(lora)}),
            base.Context(tmp_path))
    with pytest.raises(UserError, match="no guidance embedding"):
        m.prepare(8)
