import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parent.parent


def tiny_backbone(seed: int = 0, kind: str = "vp"):
    """A randomly initialised shapes backbone, small enough for contract tests (same interface as the teacher);
    `kind` "vp" (ε-prediction, SD's schedule) or "flow" (rectified-flow velocity)."""
    from bench.shapes import teacher as shapes

    torch.manual_seed(seed)
    cfg = dict(shapes.UNET_CONFIG, block_out_channels=(8, 16, 16), norm_num_groups=4, attention_head_dim=4,
               cross_attention_dim=16, addition_embed_type_num_heads=2)
    unet = shapes.build_unet(cfg)
    text = shapes.TextEncoder(dim=16, layers=1, heads=2)
    return shapes.ShapesBackbone(unet, text, {"sha256": f"tiny-random-{kind}"}, kind=kind)


@pytest.fixture(scope="session")
def tiny():
    return tiny_backbone()


@pytest.fixture(scope="session")
def tiny_flow():
    return tiny_backbone(kind="flow")


@pytest.fixture(scope="session", params=["vp", "flow"])
def tiny_any(request, tiny, tiny_flow):
    """Each family's tiny backbone in turn: method code is written once and must run on both."""
    return tiny if request.param == "vp" else tiny_flow


@pytest.fixture(scope="session")
def shapes_eval():
    """The shipped embedded evaluators (attribute network, tiny CLIP) on the CPU."""
    from bench.shapes.evaluators import load_evaluators

    return load_evaluators()


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"
