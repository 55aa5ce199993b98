"""The real-scale code path offline: a tiny random SD / SDXL pipeline built here, every method through
it, published-checkpoint adapters, and the standard metric code with random-weight networks."""

import json
import os
import subprocess
import sys

import pytest
import torch

from methods import base
from tests import tiny_sd
from tests.conftest import ROOT

TEXTS = ["a large red circle at the top left", "a small blue square in the center"]
KEYS = [("p0", 0), ("p1", 0)]


# SDXL runs every test here in `tox -e slow` (about 2 CPU-minutes); the default suite covers SDXL through
# tests/test_scale.py and tests/test_parity.py
@pytest.fixture(scope="module", params=[False, pytest.param(True, marks=pytest.mark.slow)], ids=["sd", "sdxl"])
def latent(request, tmp_path_factory):
    from methods.backbones import load_dir

    d = tmp_path_factory.mktemp("sdxl" if request.param else "sd")
    tiny_sd.build(d / "pipe", sdxl=request.param)
    return load_dir(d / "pipe", train_data=tiny_sd.image_folder(d / "data")), d


def test_backbone_interface(latent):
    bb, _ = latent
    assert bb.sample_shape == (4, 8, 8) and bb.resolution == 16
    cond = bb.encode_text(TEXTS + [""])
    assert cond.states.shape[0] == 3
    assert (cond.added is not None) == (bb.family == "sdxl")
    img = bb.to_images(torch.randn(2, *bb.sample_shape))
    assert img.shape == (2, 3, 16, 16) and img.min() >= 0 and img.max() <= 1
    assert bb.from_images(img).shape == (2, *bb.sample_shape)
    long = "a " * 40 + "circle"
    cut = bb.truncated([long, "a red circle"])
    assert set(cut) == set(bb.encoder_names) and all(v == [0] for v in cut.values())  # per encoder, the long one
    ident = bb.identity()
    assert ident["backbone"] == "diffusers" and ident["sha256"] and "/" not in ident["name"]
    assert "unet/diffusion_pytorch_model.safetensors" in ident["files"] and "vae/config.json" in ident["files"]


@pytest.mark.parametrize("name", [n for n in base.names() if n != "pretrained"])
def test_every_method_trains_and_samples_in_latent_space(latent, name):
    bb, d = latent
    cls = base.get(name)
    m = cls(bb, cls.make_config(cls.smoke_settings()), base.Context(d / f"cache-{name}", progress=False))
    for steps in m.smoke_steps(m.config):
        m.prepare(steps)
        m.reset_nfe()
        out = m.sample(TEXTS, KEYS, steps)
        assert m.counted_nfe() == cls.budget(m.config, steps=steps).nfe * len(TEXTS)
        assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
        assert torch.equal(out, m.sample(TEXTS, KEYS, steps))


def test_lora_training_option(latent):
    bb, d = latent
    cls = base.get("lcm")
    m = cls(bb, cls.make_config({**cls.smoke_settings(), "lora_rank": 2}), base.Context(d / "lora", progress=False))
    m.prepare(2)
    unet = m.student_net(2)
    assert any("lora_A" in k for k in unet.state_dict())
    assert m.sample(TEXTS, KEYS, 2).shape == (2, 3, 16, 16)


@pytest.mark.parametrize("kind", ["lcm", "lcm-lora", "turbo", "lightning"])
def test_published_checkpoint_adapters(latent, kind):
    """Checkpoints "published" here (teacher copies in the formats the real ones ship in)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    bb, d = latent
    path = d / f"ckpt-{kind}"
    if kind == "lcm":
        bb.new_net(time_cond_proj_dim=32).save_pretrained(path, safe_serialization=True)
    elif kind == "lcm-lora":
        u = bb.new_net()
        u.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"]))
        path.mkdir(exist_ok=True)
        path = path / "pytorch_lora_weights.safetensors"
        save_file({f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(u).items()}, str(path))
    else:
        bb.new_net().save_pretrained(path, safe_serialization=True)
    cls = base.get("pretrained")
    m = cls(bb, cls.make_config({"kind": kind, "path": str(path), "max_steps": 4}),
            base.Context(d / "unused", progress=False))
    for steps in (1, 2):
        m.reset_nfe()
        out = m.sample(TEXTS, KEYS, steps)
        assert m.counted_nfe() == steps * 2 and out.shape == (2, 3, 16, 16)
        assert torch.equal(out, m.sample(TEXTS, KEYS, steps))


def test_pretrained_bad_paths(latent):
    from core.errors import UserError

    bb, d = latent
    cls = base.get("pretrained")
    with pytest.raises(UserError, match="does not exist"):
        cls(bb, cls.make_config({"kind": "turbo", "path": str(d / "nope")}), base.Context(d)).prepare(1)
    with pytest.raises(UserError, match="give path"):
        cls.make_config({"kind": "turbo"})
    with pytest.raises(UserError, match="unknown checkpoint kind"):
        cls.make_config({"kind": "turbo2", "path": "x"})


def test_standard_metric_code_with_random_weight_networks(tmp_path):
    from bench.metrics.cell import measure
    from bench.real import load_real_evaluators
    from prompts import load_prompts

    name, weights = tiny_sd.tiny_open_clip(tmp_path / "clip")
    ref_dir = tiny_sd.image_folder(tmp_path / "ref", 16)
    ev = load_real_evaluators(None, name, weights, ref_dir, fid_net=tiny_sd.RandomFeatures())
    ps = load_prompts("shapes-eval")[:16]
    ref = ev.reference(ps, tmp_path / "cache")
    assert ref.n == 16 and (tmp_path / "cache" / "fid-ref").is_dir()
    same = measure(ev, ref, ps, [tiny_sd.load_folder(ref_dir)], 16)
    noise = measure(ev, ref, ps, [torch.rand(16, 3, 16, 16)], 16)
    assert abs(same["fid"]) < 1e-3 < noise["fid"]
    assert 0 <= noise["clip_score"] <= 100 and "accuracy" not in noise
    ident = ev.identity()
    assert ident["clip_model"] == name and ident["clip_sha256"] and ident["accuracy_net_sha256"] is None
    assert ref.identity()["n"] == 16 and ref.identity()["folder_sha256"]
    assert ev.identity() == ident  # building the reference never changes the evaluators' identity


@pytest.mark.slow
def test_cli_end_to_end_on_a_latent_teacher_with_inception_fid(tmp_path):
    """The whole real-scale path through the CLI: SD directory, clean-fid Inception file, open_clip."""
    tiny_sd.build(tmp_path / "pipe")
    inc = tiny_sd.fake_inception(tmp_path / "inception")
    name, weights = tiny_sd.tiny_open_clip(tmp_path / "clip")
    ref = tiny_sd.image_folder(tmp_path / "ref", 8)
    (tmp_path / "caps.txt").write_text("\n".join(TEXTS * 4) + "\n")
    (tmp_path / "s.toml").write_text(f"""
name = "latent"
prompts = "{tmp_path / 'caps.txt'}"
samples = 8
metrics = ["fid", "clip_score"]
[backbone]
kind = "diffusers"
path = "{tmp_path / 'pipe'}"
train_data = "{tiny_sd.image_folder(tmp_path / 'data')}"
[evaluators]
kind = "real"
inception_dir = "{inc}"
clip_model = "{name}"
clip_pretrained = "{weights}"
reference = "{ref}"
[[methods]]
name = "teacher"
nfe = [2]
[[methods]]
name = "imagine-flash"
steps = [1]
settings = {{ student_updates = 2, batch_size = 2 }}
""")
    code = (f"import open_clip, sys; open_clip.add_model_config({str(tmp_path / 'clip' / (name + '.json'))!r}); "
            "from bench.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "run", str(tmp_path / "s.toml"), "--out", str(tmp_path / "run"),
                        "--cache", str(tmp_path / "cache"), "--no-progress"], capture_output=True, text=True,
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert all(x["status"] == "ok" and "fid" in x and "clip_score" in x for x in rows)
    assert rows[0]["protocol"]["evaluators"]["fid_feature"] == "inception-2015-12-05:pool3"
