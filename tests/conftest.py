import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parent.parent


def tiny_backbone(seed: int = 0):
    """A randomly initialised shapes backbone, small enough for contract tests (same interface as the teacher)."""
    from bench.shapes import teacher as shapes

    torch.manual_seed(seed)
    cfg = dict(shapes.UNET_CONFIG, block_out_channels=(8, 16, 16), norm_num_groups=4, attention_head_dim=4,
               cross_attention_dim=16, addition_embed_type_num_heads=2)
    unet = shapes.build_unet(cfg)
    text = shapes.TextEncoder(dim=16, layers=1, heads=2)
    return shapes.ShapesBackbone(unet, text, {"sha256": "tiny-random"})


@pytest.fixture(scope="session")
def tiny():
    return tiny_backbone()


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"
