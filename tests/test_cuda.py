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
