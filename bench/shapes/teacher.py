"""The embedded teachers: small pixel-space models of the shapes world, one per family.

``vp``: ε-prediction on SD's scaled-linear schedule; ``flow``: rectified-flow velocity prediction
(u = ε − x0, as SD3/FLUX) with shift 1. Same world, same UNet and text encoder sizes, same training data.

Its parts are a word-level tokenizer over the world's grammar, a small transformer text encoder
of its own (not an evaluator), and diffusers' ``UNet2DConditionModel`` with cross-attention at the
lowest resolution and the pooled text added to the time embedding. Trained weights ship with the
package (``bench/shapes/assets/teacher.safetensors`` and ``teacher-flow.safetensors``, each with config and
sha256 beside it).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bench.shapes import ASSETS, TEACHER_FILES, TEACHER_KINDS, world
from bench.shapes.text import WordTokenizer
from core.io import load_safetensors_checked
from methods.backbone import Backbone, Cond
from methods.diffusion import FlowSchedule, Schedule

MAX_TOKENS = 20
TOKENIZER = WordTokenizer(max_tokens=MAX_TOKENS)


def tokenize(texts: list[str]) -> tuple[torch.Tensor, list[bool]]:
    """Word-level ids [B, MAX_TOKENS] (pad 0, unknown 1) and whether each text was truncated."""
    return TOKENIZER(texts)


class TextEncoder(nn.Module):
    """Token + position embedding and a small pre-norm transformer: [B, L] ids -> [B, L, dim]."""

    def __init__(self, vocab_size: int = TOKENIZER.vocab_size, dim: int = 64, layers: int = 4, heads: int = 4,
                 max_tokens: int = MAX_TOKENS):
        super().__init__()
        self.config = {"vocab_size": vocab_size, "dim": dim, "layers": layers, "heads": heads, "max_tokens": max_tokens}
        self.tok = nn.Embedding(vocab_size, dim)
        # positions at the same scale as the token embeddings (N(0, 1)): binding a colour word to the
        # position words of its own phrase needs attention that can see where tokens are
        self.pos = nn.Parameter(torch.randn(max_tokens, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.tok(ids) + self.pos[: ids.shape[1]]))


UNET_CONFIG = dict(
    sample_size=world.RESOLUTION,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=8,
    addition_embed_type="text",
    addition_embed_type_num_heads=4,
    resnet_time_scale_shift="scale_shift",
)
SCHEDULE_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=0,
    timestep_spacing="trailing",
)
# FlowMatchEulerDiscreteScheduler's config for the flow teacher (shift 1: no resolution shift at 16 × 16)
FLOW_SCHEDULE_CONFIG = dict(num_train_timesteps=1000, shift=1.0)
SCHEDULE_CONFIGS = {"vp": SCHEDULE_CONFIG, "flow": FLOW_SCHEDULE_CONFIG}
PREDICTION_TYPES = {"vp": "epsilon", "flow": "flow"}


def schedule_of(kind: str, config: dict | None = None) -> Schedule | FlowSchedule:
    """The noise schedule of a teacher kind ("vp" or "flow"), from its scheduler config (default: the shipped one)."""
    config = config or SCHEDULE_CONFIGS[kind]
    if kind == "flow":
        # the teacher's Euler on the students' own grid σ = 1 − i/N (FluxPipeline's spacing), from σ = 1
        return FlowSchedule(shift=float(config.get("shift", 1.0)), T=int(config.get("num_train_timesteps", 1000)),
                            linear_sigmas=True)
    return Schedule.scaled_linear(config["beta_start"], config["beta_end"])


def build_unet(config: dict | None = None) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**(config or UNET_CONFIG))


class ShapesBackbone(Backbone):
    """A shapes-world teacher behind the Backbone interface (pixel space, images in [-1, 1]).

    ``kind`` "vp" (ε-prediction, ``Schedule``) or "flow" (velocity, ``FlowSchedule``); the card says which.
    """

    def __init__(self, unet: nn.Module, text_encoder: TextEncoder, card: dict | None = None,
                 device: str | torch.device = "cpu", kind: str = "vp"):
        if kind not in TEACHER_KINDS:
            raise ValueError(f"kind must be one of {TEACHER_KINDS}, got {kind!r}")
        self.device = torch.device(device)
        self.net = unet.to(self.device).eval().requires_grad_(False)
        self.text_encoder = text_encoder.to(self.device).eval().requires_grad_(False)
        self.card = card or {}
        self.kind = kind
        self.prediction_type = PREDICTION_TYPES[kind]
        self.scheduler_config = dict(self.card.get("schedule") or SCHEDULE_CONFIGS[kind])
        self.schedule = schedule_of(kind, self.scheduler_config)

    @classmethod
    def load(cls, device: str | torch.device = "cpu", kind: str = "vp", weights: Path | None = None,
             card: Path | None = None) -> ShapesBackbone:
        """The shipped teacher of `kind` (or the given weights and card); raises UserError on a hash mismatch."""
        if kind not in TEACHER_KINDS:
            raise ValueError(f"kind must be one of {TEACHER_KINDS}, got {kind!r}")
        weights = weights or ASSETS / TEACHER_FILES[kind][0]
        card = card or ASSETS / TEACHER_FILES[kind][1]
        state, card_d = load_safetensors_checked(weights, card)
        unet = build_unet(card_d.get("unet_config", UNET_CONFIG))
        text = TextEncoder(**card_d.get("text_config", {}))
        unet.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("unet.")})
        text.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("text.")})
        return cls(unet, text, card_d, device, card_d.get("kind", "vp"))

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (3, world.RESOLUTION, world.RESOLUTION)

    def truncated(self, texts: list[str]) -> dict[str, list[int]]:
        return {"text_encoder": [i for i, cut in enumerate(tokenize(texts)[1]) if cut]}

    @torch.no_grad()
    def encode_text(self, texts: list[str], micro=None) -> Cond:
        ids, _ = tokenize(texts)
        return Cond(self.text_encoder(ids.to(self.device)))

    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        return ((x0 + 1.0) / 2.0).clamp(0.0, 1.0)

    def from_images(self, images: torch.Tensor) -> torch.Tensor:
        return images * 2.0 - 1.0

    def training_batch(self, n: int, key: int) -> tuple[torch.Tensor, list[str], None]:
        scenes = world.scenes("train", (key * n) % (world.SPLIT_SIZE - n), n)
        return world.render(scenes).to(self.device), [s.caption for s in scenes], None

    def identity(self) -> dict:
        ident = {"backbone": "shapes", "teacher_sha256": self.card.get("sha256"), "resolution": world.RESOLUTION}
        if self.kind != "vp":  # the vp identity stays as it was, so caches made before flow teachers stay valid
            ident["kind"] = self.kind
        return ident
