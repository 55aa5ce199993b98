"""Each published-checkpoint recipe is its model card: the diffusers pipeline call is rebuilt from the card data alone
(methods/cards/cards.json: scheduler class by name, ``from_config(<the card's config or the base pipeline's>,
**<the card's overrides>)``, the card's steps / guidance / eta / timesteps / LoRA scale / T5 tokens) on tiny random
pipelines (SD / SDXL: tests/tiny_sd.py, SD3 / FLUX: tests/tiny_flow.py), with a checkpoint written in the format the
real one ships (UNet or pipeline directory, single-file UNet, pickled UNet converted first, LoRA), and `pretrained`
must sample the same images (max |diff| ≤ 1e-5, same starting latents ``per_sample_noise``, same per-sample
generators). Image sides are the tiny pipelines' (16 px) instead of the cards' 512 / 1024.
"""

import dataclasses
import inspect
from pathlib import Path

import diffusers
import pytest
import torch
from safetensors.torch import load_file, save_file

from methods import base
from methods.backbones import load_dir
from methods.pretrained import (CARDS, FORMATS, RECIPES, SCHEDULER_CLASSES, SCHEDULER_DEFAULTS, convert_checkpoint,
                                recipe_from_card)
from methods.sampling import per_sample_generators, per_sample_noise
from tests import tiny_flow, tiny_sd

TEXTS = ["a red apple on a table", "a blue car in the street"]
KEYS = [("p0", 0), ("p1", 0)]
TOL = 1e-5
STOCHASTIC = ("LCMScheduler", "TCDScheduler", "EulerAncestralDiscreteScheduler")  # step noise from the generators


# --- tiny pipelines of each family the cards name ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """family -> a tiny random pipeline directory (FLUX.1-dev layout for "flux"; "flux-schnell" beside it)."""
    d = tmp_path_factory.mktemp("cards")
    return {"sd": tiny_sd.build(d / "sd"), "sdxl": tiny_sd.build(d / "sdxl", sdxl=True),
            "flux": tiny_flow.build_flux(d / "flux", guidance_embeds=True),
            "flux-schnell": tiny_flow.build_flux(d / "schnell", seed=1, guidance_embeds=False),
            "sd3": tiny_flow.build_sd3(d / "sd3")}


def backbone(roots, family, **settings):
    """The family's tiny backbone; flow backbones encode 64 T5 tokens by default, so a recipe that did not pin the
    card's max_sequence_length would differ from the card's call."""
    if family in ("flux", "sd3"):
        settings = {"resolution": tiny_flow.RESOLUTION, "max_sequence_length": 64, **settings}
    return load_dir(roots[family], **settings)


@pytest.fixture(scope="module")
def backbones(roots):
    return {f: backbone(roots, f) for f in ("sd", "sdxl", "flux", "sd3")}


# --- checkpoints in the formats the real ones ship ---------------------------------------------------------------------
def perturbed(net, seed=3):
    """`net` with every floating weight moved a little (a "distilled" network that is not the teacher)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g).to(p.dtype))
    return net


def denoiser_copy(bb, card, dtype=torch.float32):
    """A perturbed copy of the backbone's diffusers network (UNet or transformer), with LCM's w-embedding when the
    card's UNet has one."""
    if bb.family in ("flux", "sd3"):
        return perturbed(bb.new_net().transformer).to(dtype)
    w_dim = 32 if card["guidance_embedding"] else None
    return perturbed(bb.new_net(time_cond_proj_dim=w_dim)).to(dtype)


def write_checkpoint(card, bb, out: Path, roots, dtype=torch.float32) -> tuple[Path, Path]:
    """(the path given to `pretrained`, the file or folder the card's snippet loads) in the card's format."""
    out.mkdir(parents=True, exist_ok=True)
    fmt = card["checkpoint"]["format"]
    if fmt == "lora":
        lora = (tiny_flow.flux_lora(bb.path, out / "lora") if bb.family == "flux"
                else tiny_sd.make_loras(bb.path, out / "loras") / "lora_peft.safetensors")
        return lora, lora
    if card["recipe"] == "flux1-schnell":  # the real repository is a FLUX.1-schnell pipeline directory
        return roots["flux-schnell"], roots["flux-schnell"]
    net = denoiser_copy(bb, card, dtype)
    if fmt in ("unet-dir", "transformer-dir"):
        net.save_pretrained(out / "ckpt", safe_serialization=True)
        return out / "ckpt", out / "ckpt"
    if fmt == "pipeline-dir":
        net.save_pretrained(out / "pipe" / bb.denoiser, safe_serialization=True)
        return out / "pipe", out / "pipe"
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    if fmt == "unet-file":
        save_file(state, str(out / "unet.safetensors"))
        return out / "unet.safetensors", out / "unet.safetensors"
    assert fmt == "unet-bin"  # DMD2: a pickled state dict, converted with `flashbench convert-checkpoint` first
    torch.save(state, out / "unet.bin")
    convert_checkpoint(out / "unet.bin", out / "unet.safetensors")
    return out / "unet.safetensors", out / "unet.bin"


# --- the card's pipeline call, from the card data alone ----------------------------------------------------------------
def card_scheduler(card, bb):
    """``<card class>.from_config(<the card's own config, or the base pipeline's>, **<the card's overrides>)``."""
    s = card["scheduler"]
    config = bb.scheduler_config if s["config"] == "base" else s["config"]
    return getattr(diffusers, s["class"]).from_config(config, **s["overrides"])


def card_network(card, bb, loaded: Path):
    """The denoiser as the card's snippet loads it (LoRA: the base network; fused into the pipeline later)."""
    fmt = card["checkpoint"]["format"]
    cls = type(bb.transformer) if bb.family in ("flux", "sd3") else diffusers.UNet2DConditionModel
    sub = bb.denoiser
    if fmt == "lora":
        return cls.from_pretrained(bb.path, subfolder=sub, local_files_only=True)
    if fmt in ("unet-dir", "transformer-dir"):
        return cls.from_pretrained(loaded, local_files_only=True)
    if fmt == "pipeline-dir":
        return cls.from_pretrained(loaded, subfolder=sub, local_files_only=True)
    net = cls.from_config(cls.load_config(bb.path, subfolder=sub))  # UNet2DConditionModel.from_config(base, "unet")
    net.load_state_dict(load_file(str(loaded)) if fmt == "unet-file" else torch.load(loaded, weights_only=True))
    return net


def card_pipeline(card, bb, loaded: Path):
    """The card's pipeline class over the backbone's encoders, tokenizers and VAE, the card's network and scheduler,
    its LoRA loaded and fused at the card's scale."""
    parts = {"vae": bb.vae, "scheduler": card_scheduler(card, bb), bb.denoiser: card_network(card, bb, loaded)}
    for name, enc, tok in zip(bb.encoder_names, bb.text_encoders, bb.tokenizers):
        parts[name], parts[name.replace("text_encoder", "tokenizer")] = enc, tok
    if card["pipeline"] == "StableDiffusionPipeline":
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = getattr(diffusers, card["pipeline"])(**parts)
    pipe.set_progress_bar_config(disable=True)
    if card["checkpoint"]["format"] == "lora":
        pipe.load_lora_weights(str(loaded))
        pipe.fuse_lora(lora_scale=card["lora_scale"])
    return pipe


def card_call(card, bb, pipe, steps):
    """``pipe(prompt, num_inference_steps, guidance_scale, eta, timesteps, max_sequence_length)`` as the card calls it,
    at the tiny pipeline's side, from the same starting latents and per-sample generators as `pretrained`."""
    latents = per_sample_noise(KEYS, bb.sample_shape)
    if bb.family == "flux":
        b, c, h, w = latents.shape
        latents = diffusers.FluxPipeline._pack_latents(latents, b, c, h, w)
    kw = {"num_inference_steps": steps, "guidance_scale": card["guidance_scale"]}
    for key in ("eta", "timesteps", "max_sequence_length"):
        if card[key] is not None:
            kw[key] = card[key]
    if card["scheduler"]["class"] in STOCHASTIC:
        kw["generator"] = per_sample_generators(KEYS, 1)
    return pipe(TEXTS, latents=latents, output_type="pt", height=bb.resolution, width=bb.resolution, **kw).images


def ours(card, bb, path, steps, tmp_path):
    cls = base.get("pretrained")
    m = cls(bb, cls.make_config({"recipe": card["recipe"], "path": str(path), "resolution": bb.resolution}),
            base.Context(tmp_path))
    images = m.sample(TEXTS, KEYS, steps)
    assert m.counted_nfe() == len(KEYS) * steps * cls.nfe_per_step(m.config)
    return images


def family_of(card):
    return card["family"]


CASES = [(name, steps) for name, card in CARDS.items()
         for steps in sorted({card["example_steps"], max(card["num_inference_steps"])})]


@pytest.mark.parametrize("recipe,steps", CASES, ids=[f"{r}-{s}" for r, s in CASES])
def test_each_recipe_samples_what_its_model_card_samples(backbones, roots, recipe, steps, tmp_path):
    card = CARDS[recipe]
    bb = backbones[family_of(card)]
    path, loaded = write_checkpoint(card, bb, tmp_path / "ckpt", roots)
    theirs = card_call(card, bb, card_pipeline(card, bb, loaded), steps)
    mine = ours(card, bb, path, steps, tmp_path)
    assert mine.shape == theirs.shape == (len(TEXTS), 3, bb.resolution, bb.resolution)
    assert (mine - theirs).abs().max() <= TOL, recipe


@pytest.mark.parametrize("recipe", list(CARDS))
def test_a_recipes_scheduler_and_call_are_its_cards(backbones, recipe, tmp_path):
    """The scheduler `pretrained` builds is the card's (same class, same configuration on the backbone), and the
    settings a recipe resolves to are the card's call: steps, guidance form and scale, eta, timesteps, LoRA scale, T5
    tokens, resolution. Fails when either drifts from the card data."""
    card = CARDS[recipe]
    bb = backbones[family_of(card)]
    cls = base.get("pretrained")
    cfg = cls.make_config({"recipe": recipe, "path": "x", "resolution": bb.resolution})
    m = cls(bb, cfg, base.Context(tmp_path))
    mine, theirs = m.scheduler(), card_scheduler(card, bb)
    assert type(mine) is type(theirs)
    params = inspect.signature(type(mine).__init__).parameters  # what the class reads from a config
    assert {k: mine.config[k] for k in params if k in mine.config} == {k: theirs.config[k] for k in params
                                                                       if k in theirs.config}
    assert cls.allowed_steps(cfg) == tuple(card["num_inference_steps"])
    embedded, scale = card["guidance_embedding"], card["guidance_scale"]
    assert cfg.guidance == ("embedded" if embedded else "cfg" if scale > 1 else "none")
    assert cls.nfe_per_step(cfg) == (2 if cfg.guidance == "cfg" else 1)
    if cfg.guidance != "none":
        assert cfg.guidance_scale == scale
    assert cfg.eta == card["eta"] and cfg.timesteps == (tuple(card["timesteps"]) if card["timesteps"] else None)
    assert cfg.lora_scale == (card["lora_scale"] if card["lora_scale"] is not None else 1.0)
    assert cfg.max_sequence_length == card["max_sequence_length"]
    default = cls.make_config({"recipe": recipe, "path": "x"})
    assert default.resolution == card["resolution"]


def test_recipes_are_derived_from_the_cards_and_the_cards_are_complete():
    assert list(RECIPES) == list(CARDS) and len(CARDS) == 23
    for name, card in CARDS.items():
        assert RECIPES[name] == recipe_from_card(card)
        assert card["source"].startswith("https://huggingface.co/"), name
        assert card["checkpoint"]["format"] in FORMATS and card["scheduler"]["class"] in SCHEDULER_CLASSES
        assert card["checked"] and isinstance(card["unverified"], list), name  # every fact says where it was checked
        assert card["example_steps"] in card["num_inference_steps"], name


def test_scheduler_defaults_are_the_diffusers_classes():
    """A repository's own scheduler config leaves keys to the class defaults: those the derivation assumes are
    diffusers' (each class's __init__), for every class a card may name."""
    assert set(SCHEDULER_DEFAULTS) == set(SCHEDULER_CLASSES)
    for name, defaults in SCHEDULER_DEFAULTS.items():
        config = getattr(diffusers, name)().config
        assert {k: config[k] for k in defaults} == defaults, name


def test_the_cards_fixed_what_the_practitioner_found():
    """The findings of issue #5, as the card data now has them."""
    turbo = RECIPES["sd-turbo"]
    assert (turbo["scheduler"], turbo["prediction_type"], turbo["timestep_spacing"]) == ("euler", "epsilon", "trailing")
    assert RECIPES["sdxl-turbo"]["resolution"] == 512
    assert RECIPES["flux1-turbo-alpha-lora"]["max_sequence_length"] == 512
    assert RECIPES["hyper-sdxl-1step-lora"]["steps"] == (1, 2, 3, 4, 5, 6, 7, 8)
    assert CARDS["dmd2-sdxl-4step"]["checkpoint"]["format"] == "unet-bin"
    cfg = base.get("pretrained").make_config({"recipe": "sd-turbo", "path": "x"})
    assert dataclasses.asdict(cfg)["resolution"] == 512


def test_the_recipes_page_lists_every_recipe_with_its_card():
    text = (Path(__file__).resolve().parent.parent / "docs" / "recipes.md").read_text()
    rows = {line.split("`")[1]: line for line in text.splitlines() if line.startswith("| `")}
    assert list(rows) == list(CARDS)
    for name, card in CARDS.items():
        row = rows[name]
        assert card["source"] in row and card["scheduler"]["class"] in row, name
        assert f"resolution = {card['resolution']}" in row, name
