"""How `pretrained` loads published checkpoints: single-file state dicts (strict), pickles (refused, converted by
`flashbench convert-checkpoint`), the backbone's dtype for every recipe, the sampling network prepared by the backbone
before it is counted, and the recipe's resolution through ``backbone.at_resolution`` (tiny random pipelines, CPU)."""

import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from bench import cli
from core.errors import UserError
from methods import base
from methods.backbones import load_dir
from methods.pretrained import CARDS, convert_checkpoint
from tests import tiny_flow, tiny_sd
from tests.test_cards import (KEYS, TEXTS, TOL, card_call, card_pipeline, denoiser_copy, perturbed,
                              write_checkpoint)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return load_dir(tiny_sd.build(tmp_path_factory.mktemp("sdxl") / "pipe", sdxl=True))


def pretrained(bb, tmp_path, **settings):
    cls = base.get("pretrained")
    return cls(bb, cls.make_config(settings), base.Context(tmp_path))


def unet_file(bb, path, **edit):
    """A perturbed copy of the backbone's UNet saved as a single-file state dict (SDXL-Lightning's format); `edit`
    drop=key / reshape=key / prefix=str makes it not fit."""
    state = {k: v.contiguous() for k, v in perturbed(bb.new_net()).state_dict().items()}
    if "drop" in edit:
        state.pop(edit["drop"])
    if "reshape" in edit:
        state[edit["reshape"]] = torch.zeros(3, 3)
    if "prefix" in edit:
        state = {edit["prefix"] + k: v for k, v in state.items()}
    save_file(state, str(path))
    return path


# --- single-file UNet state dicts ------------------------------------------------------------------------------------
def test_a_single_file_unet_loads_strictly_and_samples(sdxl, tmp_path):
    path = unet_file(sdxl, tmp_path / "sdxl_lightning_4step_unet.safetensors")
    m = pretrained(sdxl, tmp_path, recipe="sdxl-lightning-4step", path=str(path), resolution=sdxl.resolution)
    images = m.sample(TEXTS, KEYS, 4)
    assert images.shape == (2, 3, sdxl.resolution, sdxl.resolution) and torch.isfinite(images).all()
    net, state = m.denoiser.net.net, load_file(str(path))
    assert set(net.state_dict()) == set(state)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())  # the file's weights, not the teacher's
    from core.io import sha256_file

    assert m.info.checkpoint_sha256 == sha256_file(path)


@pytest.mark.parametrize("edit,message", [({"drop": "conv_in.weight"}, "1 keys missing"),
                                          ({"reshape": "conv_out.bias"}, "1 of another shape"),
                                          ({"prefix": "model.diffusion_model."}, "original \\(LDM/ComfyUI\\)")])
def test_a_single_file_that_does_not_fit_is_refused_in_one_line(sdxl, tmp_path, edit, message):
    path = unet_file(sdxl, tmp_path / "unet.safetensors", **edit)
    m = pretrained(sdxl, tmp_path, recipe="sdxl-lightning-4step", path=str(path), resolution=sdxl.resolution)
    with pytest.raises(UserError, match=message) as e:
        m.prepare(4)
    assert "\n" not in str(e.value) and "pretrained sdxl-lightning-4step" in str(e.value)
    assert m.denoiser is None


def test_a_unet_that_does_not_fit_the_backbone_is_refused(sdxl, tmp_path):
    sd = load_dir(tiny_sd.build(tmp_path / "sd"))  # cross_attention_dim 16, no text_time embedding
    sd.net.save_pretrained(tmp_path / "sd-unet", safe_serialization=True)
    m = pretrained(sdxl, tmp_path, kind="unet", path=str(tmp_path / "sd-unet"), max_steps=2)
    with pytest.raises(UserError, match="does not fit this backbone \\(cross_attention_dim 16"):
        m.prepare(1)


# --- pickles and their conversion ------------------------------------------------------------------------------------
def test_a_pickle_is_refused_naming_the_conversion_command(sdxl, tmp_path):
    torch.save({"w": torch.ones(1)}, tmp_path / "dmd2_sdxl_4step_unet_fp16.bin")
    (tmp_path / "dir").mkdir()
    torch.save({"w": torch.ones(1)}, tmp_path / "dir" / "diffusion_pytorch_model.bin")
    for path in (tmp_path / "dmd2_sdxl_4step_unet_fp16.bin", tmp_path / "dir"):
        m = pretrained(sdxl, tmp_path, recipe="dmd2-sdxl-4step", path=str(path), resolution=sdxl.resolution)
        with pytest.raises(UserError, match="flashbench convert-checkpoint IN.bin OUT.safetensors") as e:
            m.prepare(4)
        assert "\n" not in str(e.value)


def test_convert_checkpoint_round_trips_a_state_dict(tmp_path):
    shared = torch.randn(4, 4, dtype=torch.float16)
    state = {"a.weight": shared, "b.weight": shared, "c.bias": torch.randn(3), "d.index": torch.arange(5)}
    torch.save(state, tmp_path / "in.bin")
    out = convert_checkpoint(tmp_path / "in.bin", tmp_path / "out.safetensors")
    back = load_file(str(tmp_path / "out.safetensors"))
    assert out["tensors"] == 4 and set(back) == set(state)
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in state.items())
    assert cli.main(["convert-checkpoint", tmp_path / "in.bin", tmp_path / "cli.safetensors"]) == 0
    assert set(load_file(str(tmp_path / "cli.safetensors"))) == set(state)


class Arbitrary:  # a pickled object torch.load(weights_only=True) must not rebuild
    pass


@pytest.mark.parametrize("content,message", [({"state_dict": {"w": torch.ones(1)}}, "key 'state_dict' holds a dict"),
                                             ({"w": torch.ones(1), "step": 3}, "key 'step' holds a int"),
                                             ([torch.ones(1)], "holds a list"),
                                             ("arbitrary", "not a plain tensor state dict")])
def test_convert_checkpoint_refuses_anything_but_a_flat_tensor_state_dict(tmp_path, content, message, capsys):
    src, dst = tmp_path / "in.bin", tmp_path / "out.safetensors"
    if content == "arbitrary":
        src.write_bytes(pickle.dumps({"w": Arbitrary()}))
    else:
        torch.save(content, src)
    with pytest.raises(UserError, match=message):
        convert_checkpoint(src, dst)
    assert not dst.exists()  # nothing written
    assert cli.main(["convert-checkpoint", src, dst]) == 2 and not dst.exists()
    assert capsys.readouterr().err.count("\n") == 1


def test_convert_checkpoint_refuses_bad_paths_before_reading(tmp_path):
    torch.save({"w": torch.ones(1)}, tmp_path / "in.bin")
    (tmp_path / "taken.safetensors").write_bytes(b"x")
    for src, dst, message in [(tmp_path / "none.bin", tmp_path / "o.safetensors", "does not exist"),
                              (tmp_path / "in.bin", tmp_path / "o.bin", "must be a .safetensors path"),
                              (tmp_path / "in.bin", tmp_path / "taken.safetensors", "already exists"),
                              (tmp_path / "taken.safetensors", tmp_path / "o.safetensors", "already safetensors")]:
        with pytest.raises(UserError, match=message):
            convert_checkpoint(src, dst)
    assert (tmp_path / "taken.safetensors").read_bytes() == b"x"


# --- the backbone's dtype, for every recipe --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    """family -> a tiny pipeline loaded with dtype = "bf16" (and its root, for checkpoints that are pipelines)."""
    d = tmp_path_factory.mktemp("bf16")
    roots = {"sd": tiny_sd.build(d / "sd"), "sdxl": tiny_sd.build(d / "sdxl", sdxl=True),
             "flux": tiny_flow.build_flux(d / "flux", guidance_embeds=True),
             "flux-schnell": tiny_flow.build_flux(d / "schnell", guidance_embeds=False), "sd3": tiny_flow.build_sd3(d / "sd3")}
    res = {"flux": tiny_flow.RESOLUTION, "sd3": tiny_flow.RESOLUTION}
    return roots, {f: load_dir(roots[f], dtype="bf16", **({"resolution": res[f]} if f in res else {}))
                   for f in ("sd", "sdxl", "flux", "sd3")}


@pytest.mark.parametrize("recipe", list(CARDS))
def test_every_recipe_loads_its_checkpoint_in_the_backbones_dtype(bf16, recipe, tmp_path):
    """Published UNets ship in fp16 or fp32; a bf16 backbone's row must sample them in bf16 (LoRA adapters fused and
    removed, nothing left in fp32)."""
    roots, bbs = bf16
    card = CARDS[recipe]
    bb = bbs[card["family"]]
    path, _ = write_checkpoint(card, bb, tmp_path / "ckpt", roots, dtype=torch.float16)
    m = pretrained(bb, tmp_path, recipe=recipe, path=str(path), resolution=bb.resolution)
    m.prepare(card["example_steps"])
    net = m.denoiser.net.net
    dtypes = {p.dtype for p in [*net.parameters(), *net.buffers()] if p.is_floating_point()}
    assert dtypes == {torch.bfloat16}, (recipe, dtypes)
    assert not any("lora" in n for n, _ in net.named_parameters())


# --- prepared by the backbone, then counted --------------------------------------------------------------------------
def test_the_sampling_network_is_prepared_by_the_backbone_before_it_is_counted(sdxl, tmp_path, monkeypatch):
    prepared = []

    def prepare_net(net):
        prepared.append(net)
        net._flashbench_compile = "marker"
        return net

    monkeypatch.setattr(sdxl, "prepare_net", prepare_net)
    path = unet_file(sdxl, tmp_path / "unet.safetensors")
    m = pretrained(sdxl, tmp_path, recipe="sdxl-lightning-2step", path=str(path), resolution=sdxl.resolution)
    m.prepare(2)
    counted = m.denoiser.net
    assert prepared == [counted.net] and counted.net._flashbench_compile == "marker"
    assert counted in m._counters


# --- the recipe's resolution -----------------------------------------------------------------------------------------
def test_sdxl_turbo_samples_at_its_own_resolution_on_a_backbone_configured_otherwise(tmp_path):
    """SDXL-Turbo is trained at 512² on SDXL (1024²): the recipe samples through the backbone's view at its side. On
    the tiny pipeline the backbone is at 32 px and the recipe asked at 16 px (the 512 default is checked on the view
    without sampling)."""
    root = tiny_sd.build(tmp_path / "sdxl", sdxl=True)
    bb = load_dir(root, resolution=32)
    card = CARDS["sdxl-turbo"]
    path, loaded = write_checkpoint(card, bb, tmp_path / "ckpt", {})
    m = pretrained(bb, tmp_path, recipe="sdxl-turbo", path=str(path), resolution=16)
    mine = m.sample(TEXTS, KEYS, 2)
    assert mine.shape == (2, 3, 16, 16) and bb.resolution == 32 and m.backbone is not bb
    assert m.settings()["resolution"] == 16
    view = bb.at_resolution(16)
    theirs = card_call(card, view, card_pipeline(card, view, loaded), 2)
    assert (mine - theirs).abs().max() <= TOL
    default = pretrained(bb, tmp_path, recipe="sdxl-turbo", path=str(path))  # the card's 512, not the backbone's 32
    assert default.settings()["resolution"] == 512 and default.backbone.sample_shape == (4, 256, 256)
    assert default.backbone.encode_text(["x"]).added["time_ids"][0].tolist() == [512, 512, 0, 0, 512, 512]


def test_a_resolution_the_backbone_cannot_take_is_refused(tiny, sdxl, tmp_path):
    with pytest.raises(UserError, match="one fixed side"):
        pretrained(tiny, tmp_path, kind="turbo", path="x", resolution=64)
    with pytest.raises(UserError, match="multiple of"):
        pretrained(sdxl, tmp_path, recipe="sdxl-turbo", path="x", resolution=17)
    assert pretrained(tiny, tmp_path, kind="turbo", path="x").backbone is tiny  # no resolution: the backbone's


def test_a_flow_transformer_state_dict_loads_as_a_single_file(tmp_path):
    """The single-file path serves transformers too (a diffusers-format FLUX transformer state dict)."""
    bb = load_dir(tiny_flow.build_flux(tmp_path / "flux"), resolution=tiny_flow.RESOLUTION)
    tf = denoiser_copy(bb, CARDS["flux1-schnell"])
    save_file({k: v.contiguous() for k, v in tf.state_dict().items()}, str(tmp_path / "tf.safetensors"))
    m = pretrained(bb, tmp_path, kind="transformer", path=str(tmp_path / "tf.safetensors"), steps=[2],
                   resolution=bb.resolution)
    out = m.sample(TEXTS, KEYS, 2)
    assert out.shape == (2, 3, 16, 16)
    assert all(torch.equal(m.denoiser.net.net.transformer.state_dict()[k], v) for k, v in tf.state_dict().items())


def test_a_checkpoint_folder_holding_only_its_fp16_variant_loads(sdxl, tmp_path):
    """A published UNet folder with only ``diffusion_pytorch_model.fp16.safetensors`` (no plain weights) loads as that
    variant, in the backbone's dtype, and its file's sha256 is recorded."""
    unet = perturbed(sdxl.new_net())
    unet.to(torch.float16).save_pretrained(tmp_path / "lcm-like", variant="fp16", safe_serialization=True)
    files = sorted(p.name for p in (tmp_path / "lcm-like").iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
    m = pretrained(sdxl, tmp_path, kind="unet", scheduler="euler", path=str(tmp_path / "lcm-like"),
                   resolution=sdxl.resolution)
    images = m.sample(TEXTS, KEYS, 2)
    assert torch.isfinite(images).all() and m.info.checkpoint_sha256
    assert all(p.dtype == sdxl.dtype for p in m.denoiser.net.net.parameters())
