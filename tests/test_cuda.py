"""What only a CUDA device can show (skipped elsewhere; `scripts/gpu-check.sh` runs them): the method contract,
a run, and a bf16 teacher on the device."""

import pytest
import torch

from methods import base

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
TEXTS = ["a large red circle at the top left", "a small blue square in the center"]
KEYS = [("p0", 0), ("p1", 0)]


@pytest.fixture(scope="module")
def cuda_tiny():
    from tests.conftest import tiny_backbone

    bb = tiny_backbone()
    bb.device = torch.device("cuda")
    bb.net.to("cuda")
    bb.text_encoder.to("cuda")
    return bb


@pytest.mark.parametrize("name", base.names())
def test_contract_on_cuda(cuda_tiny, name, tmp_path):
    if name == "pretrained":
        pytest.skip("needs a checkpoint folder: covered on the CPU")
    cls = base.get(name)
    m = cls(cuda_tiny, cls.make_config(cls.smoke_settings()), base.Context(tmp_path, progress=False))
    for steps in cls.smoke_steps(m.config):
        m.prepare(steps)
        m.reset_nfe()
        out = m.sample(TEXTS, KEYS, steps)
        assert out.is_cuda and torch.isfinite(out).all()
        assert m.counted_nfe() == cls.budget(m.config, steps=steps).nfe * len(TEXTS)
        assert torch.allclose(out, m.sample(TEXTS, KEYS, steps), atol=1e-4)


def test_a_bf16_latent_teacher_on_cuda(tmp_path):
    from methods.backbones import load_dir
    from tests import tiny_sd

    bb = load_dir(tiny_sd.build(tmp_path / "pipe", sdxl=True), "cuda", dtype="bf16")
    cls = base.get("teacher")
    out = cls(bb, cls.make_config({}), base.Context(tmp_path)).sample(TEXTS, KEYS, 2)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.fixture(scope="module")
def families_on_cuda(tmp_path_factory):
    from tests import tiny_flow, tiny_sd

    d = tmp_path_factory.mktemp("families-cuda")
    return {"sd": tiny_sd.build(d / "sd"), "sdxl": tiny_sd.build(d / "sdxl", sdxl=True),
            "sd3": tiny_flow.build_sd3(d / "sd3"), "flux": tiny_flow.build_flux(d / "flux"),
            "data": tiny_sd.image_folder(d / "data")}


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_every_family_samples_and_trains_in_bf16_on_cuda(families_on_cuda, family, tmp_path):
    """What a real-scale run does on a GPU, tiny: the teacher at its family's conventions and an LCM student trained
    in bf16 (fp32 masters under autocast), every sampling network in bf16 on the device, peak memory recorded."""
    from bench.suite import conventional
    from methods.backbones import load_dir

    bb = load_dir(families_on_cuda[family], "cuda", dtype="bf16", train_data=families_on_cuda["data"], train_workers=0)
    for name in ("teacher", "lcm"):
        cls = base.get(name)
        settings = conventional(name, cls.smoke_settings(), bb.conventions(bb.settings))
        m = cls(bb, cls.make_config(settings), base.Context(tmp_path / name, progress=False))
        steps = m.smoke_steps(m.config)[0]
        torch.cuda.reset_peak_memory_stats()
        out = m.sample(TEXTS, KEYS, steps)
        assert out.is_cuda and out.dtype == torch.float32 and torch.isfinite(out).all()
        assert all(p.dtype == torch.bfloat16 and p.is_cuda for n in m.networks() for p in n.parameters()
                   if p.is_floating_point())
        assert torch.cuda.max_memory_allocated() > 0


def test_compiled_sampling_on_cuda_equals_eager(families_on_cuda, tmp_path):
    """compile = "default": the network runs compiled (inductor) and its samples match eager's."""
    from bench import latency
    from methods.backbones import load_dir
    from prompts import Prompt

    eager = load_dir(families_on_cuda["sdxl"], "cuda", dtype="bf16")
    compiled = load_dir(families_on_cuda["sdxl"], "cuda", dtype="bf16", compile="default")
    cls = base.get("teacher")
    cfg = cls.make_config({"guidance_scale": 5.0})
    a = cls(eager, cfg, base.Context(tmp_path)).sample(TEXTS, KEYS, 2)
    m = cls(compiled, cfg, base.Context(tmp_path))
    b = m.sample(TEXTS, KEYS, 2)
    assert torch.allclose(a, b, atol=2e-2)
    row = latency.measure(m, [Prompt("p", TEXTS[0])], 2, 2, "cuda", warmup=1, repeats=2)
    assert row["latency_protocol"]["compiled"] == ["default"] and row["latency_eager_ms"] > 0
