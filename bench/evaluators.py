"""Frozen evaluator networks of the shapes world. No method may ever train against these.

* ``AttributeNet``: per position slot, predicts the shape (or empty), colour and size of the object
  there, plus the image's degradation (clean / blurred / noisy). Gives compositional accuracy; its
  penultimate features are the FID feature space.
* ``TinyCLIP``: open_clip's CLIP model code with a custom tiny config, trained contrastively on
  (render, caption) pairs. Gives CLIP score = 100·max(cos, 0).

Both are trained on ground-truth renders of the world's train split only (`flashbench
train-evaluators`); weights ship as safetensors with their sha256, which goes into every result.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from bench import io, world
from bench.text import WordTokenizer

ASSETS = Path(__file__).parent / "assets"
FEATURE_DIM = 64
N_SLOTS = len(world.POSITIONS)
DEGRADATIONS = ("clean", "blurred", "noisy")


class AttributeNet(nn.Module):
    """Small CNN: images [N, 3, 16, 16] in [0, 1] -> per-slot attribute logits and 64-d features."""

    num_features = FEATURE_DIM  # torchmetrics' FID reads this instead of probing with a dummy input

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GELU(),  # 8x8
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GELU(),  # 4x4
            nn.Flatten(),
            nn.Linear(4 * w * 16, 256), nn.GELU(),
            nn.Linear(256, FEATURE_DIM), nn.GELU(),
        )
        self.shape_head = nn.Linear(FEATURE_DIM, N_SLOTS * (1 + len(world.SHAPES)))
        self.color_head = nn.Linear(FEATURE_DIM, N_SLOTS * len(world.COLORS))
        self.size_head = nn.Linear(FEATURE_DIM, N_SLOTS * len(world.SIZES))
        self.degradation_head = nn.Linear(FEATURE_DIM, len(DEGRADATIONS))
        # FID features are divided by this (the RMS per-dimension std of real-render features), so
        # FID is in units of the real data's own spread rather than of arbitrary activations
        self.register_buffer("feature_scale", torch.ones(()))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The FID feature extractor: images in [0, 1] -> [N, FEATURE_DIM] (scaled penultimate features)."""
        return self.features(images) / self.feature_scale

    @torch.no_grad()
    def calibrate(self, n: int = 4000) -> float:
        """Set feature_scale from renders of the train split (scenes no evaluation prompt uses)."""
        images = world.render(world.scenes("train", 900_000_000, n))
        f = self.features(images).double()
        self.feature_scale.fill_(float(f.var(0).mean().sqrt()))
        return float(self.feature_scale)

    def heads(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        n = feats.shape[0]
        return {
            "shape": self.shape_head(feats).view(n, N_SLOTS, -1),
            "color": self.color_head(feats).view(n, N_SLOTS, -1),
            "size": self.size_head(feats).view(n, N_SLOTS, -1),
            "degradation": self.degradation_head(feats),
        }

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per slot: shape index (0 = empty, else 1 + SHAPES index), colour and size indices."""
        h = self.heads(self.features(images))
        return {k: v.argmax(-1) for k, v in h.items()}


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    k = torch.arange(-2, 3, dtype=x.dtype)
    g = torch.exp(-(k[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    g = g / g.sum(1, keepdim=True)  # [N, 5]
    n, c, h, w = x.shape
    xp = F.pad(x, (2, 2, 2, 2), mode="replicate")
    # separable blur with a per-image kernel
    cols = torch.stack([xp[..., :, i : i + w] for i in range(5)], -1)  # [N,C,H+4,W,5]
    x1 = (cols * g[:, None, None, None, :]).sum(-1)
    rows = torch.stack([x1[..., i : i + h, :] for i in range(5)], -1)  # [N,C,H,W,5]
    return (rows * g[:, None, None, None, :]).sum(-1)


def degrade(images: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment real renders: half clean, a quarter blurred, a quarter with added noise; returns labels."""
    n = images.shape[0]
    kind = torch.multinomial(torch.tensor([0.5, 0.25, 0.25]), n, replacement=True, generator=gen)
    sigma = 0.5 + 0.8 * torch.rand(n, generator=gen)
    blurred = _blur(images, sigma)
    noisy = images + (0.03 + 0.07 * torch.rand(n, 1, 1, 1, generator=gen)) * torch.randn(images.shape, generator=gen)
    out = torch.where((kind == 1)[:, None, None, None], blurred, images)
    out = torch.where((kind == 2)[:, None, None, None], noisy, out)
    return out.clamp(0, 1), kind


# --- tiny CLIP ---------------------------------------------------------------------------------

CLIP_TOKENIZER = WordTokenizer(max_tokens=20, eot=True)
CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": world.RESOLUTION, "patch_size": 4, "width": 96, "layers": 3, "head_width": 32,
                   "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 20, "vocab_size": CLIP_TOKENIZER.vocab_size, "width": 64, "heads": 2,
                 "layers": 2, "mlp_ratio": 2.0},
}


def build_clip() -> nn.Module:
    """open_clip's CLIP model with the custom tiny config above (word-level vocabulary)."""
    import open_clip

    return open_clip.CLIP(**CLIP_CONFIG)


class TinyCLIP(nn.Module):
    def __init__(self, model: nn.Module | None = None):
        super().__init__()
        self.model = model if model is not None else build_clip()
        # CLIP's usual per-channel normalisation, computed on renders of the train split
        self.register_buffer("mean", torch.tensor([0.33, 0.30, 0.30]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.22, 0.20, 0.22]).view(1, 3, 1, 1))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image((images - self.mean) / self.std), dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        ids, _ = CLIP_TOKENIZER(texts)
        return F.normalize(self.model.encode_text(ids.to(self.mean.device)), dim=-1)

    @torch.no_grad()
    def score(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Per-image CLIP score 100·max(cos, 0)."""
        cos = (self.encode_image(images) * self.encode_text(texts)).sum(-1)
        return 100.0 * cos.clamp(min=0)


# --- loading -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Evaluators:
    attr: AttributeNet
    clip: TinyCLIP
    cards: dict

    def identity(self) -> dict:
        return {
            "attribute_net_sha256": self.cards["attribute_net"]["sha256"],
            "clip_sha256": self.cards["clip"]["sha256"],
            "feature": f"attribute_net.penultimate[{FEATURE_DIM}]",
            "clip_model": "open_clip.CLIP(tiny shapes config)",
        }

    def to(self, device) -> Evaluators:
        self.attr.to(device)
        self.clip.to(device)
        return self

    @property
    def fid_net(self) -> nn.Module:
        return self.attr

    def clip_score(self, images, texts) -> torch.Tensor:
        return self.clip.score(images, texts)

    def predict_attributes(self, images) -> dict:
        return self.attr.predict(images)

    def reference(self, prompts, cache_dir):
        """FID reference: real renders of the same prompts (the world's exact ground truth)."""
        from bench.metrics import build_reference

        return build_reference(prompts, self.attr, self.identity(), cache_dir)

    def floor(self, prompts, ref) -> dict:
        """Real-vs-real: renders of the same prompts with other nuisance draws, against the reference."""
        from bench.metrics import fid_floor

        return fid_floor(prompts, self, ref)


def load_evaluators(device: str | torch.device = "cpu", assets: Path = ASSETS) -> Evaluators:
    from methods.shapes import load_safetensors_checked

    attr_state, attr_card = load_safetensors_checked(assets / "attribute_net.safetensors", assets / "attribute_net.json")
    clip_state, clip_card = load_safetensors_checked(assets / "clip.safetensors", assets / "clip.json")
    attr = AttributeNet()
    attr.load_state_dict(attr_state)
    clip = TinyCLIP()
    clip.load_state_dict(clip_state)
    for m in (attr, clip):
        m.eval().requires_grad_(False)
    return Evaluators(attr, clip, {"attribute_net": attr_card, "clip": clip_card}).to(device)


# --- training (`flashbench train-evaluators`) ---------------------------------------------------


@dataclasses.dataclass
class EvaluatorTrainConfig:
    attr_steps: int = 3000
    attr_batch: int = 128
    attr_lr: float = 2e-3
    clip_steps: int = 4000
    clip_batch: int = 256
    clip_lr: float = 1e-3
    seed: int = 0
    # disjoint from the teacher's training scenes, so evaluators and teacher never share an image
    scene_offset: int = 500_000_000


def _scenes(cfg: EvaluatorTrainConfig, step: int, batch: int, stream: int) -> list[world.Scene]:
    start = cfg.scene_offset + stream * 200_000_000 + step * batch
    return world.scenes("train", start, batch)


def train_attribute_net(cfg: EvaluatorTrainConfig, progress: bool = True) -> AttributeNet:
    from methods.training import warmup_cosine

    torch.manual_seed(cfg.seed)
    net = AttributeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.attr_lr, weight_decay=1e-4)
    lr_at = warmup_cosine(200, cfg.attr_steps, floor=0.02)
    gen = torch.Generator().manual_seed(cfg.seed)
    for step in tqdm(range(cfg.attr_steps), desc="attribute-net", disable=not progress):
        scenes = _scenes(cfg, step, cfg.attr_batch, stream=0)
        images, kind = degrade(world.render(scenes, variant=step % 7), gen)
        labels = world.slot_labels(scenes)
        h = net.heads(net.features(images))
        loss = (
            F.cross_entropy(h["shape"].flatten(0, 1), labels["shape"].flatten())
            + F.cross_entropy(h["color"].flatten(0, 1), labels["color"].flatten(), ignore_index=-100)
            + F.cross_entropy(h["size"].flatten(0, 1), labels["size"].flatten(), ignore_index=-100)
            + 0.5 * F.cross_entropy(h["degradation"], kind)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = cfg.attr_lr * lr_at(step)
        opt.step()
    net.eval()
    net.calibrate()
    return net


def train_clip(cfg: EvaluatorTrainConfig, progress: bool = True) -> TinyCLIP:
    from methods.training import warmup_cosine

    torch.manual_seed(cfg.seed + 1)
    clip = TinyCLIP()
    opt = torch.optim.AdamW(clip.parameters(), lr=cfg.clip_lr, weight_decay=0.05)
    lr_at = warmup_cosine(200, cfg.clip_steps, floor=0.02)
    for step in tqdm(range(cfg.clip_steps), desc="tiny-clip", disable=not progress):
        scenes = _scenes(cfg, step, cfg.clip_batch, stream=1)
        images = world.render(scenes, variant=step % 7)
        img = clip.encode_image(images)
        txt = clip.encode_text([s.caption for s in scenes])
        logits = clip.model.logit_scale.exp() * img @ txt.T
        # identical captions in a batch are positives of each other
        caps = [s.caption for s in scenes]
        same = torch.tensor([[a == b for b in caps] for a in caps], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = cfg.clip_lr * lr_at(step)
        opt.step()
        with torch.no_grad():
            clip.model.logit_scale.clamp_(0, 4.6052)
    return clip.eval()


@torch.no_grad()
def heldout_report(attr: AttributeNet, clip: TinyCLIP, n: int = 2000) -> dict:
    """Accuracy of the evaluators on held-out real renders (validation split, clean)."""
    scenes = world.scenes("val", 0, n)
    images = world.render(scenes)
    labels = world.slot_labels(scenes)
    pred = attr.predict(images)
    occupied = labels["shape"] > 0
    rep = {
        "n": n,
        "slot_shape_or_empty": (pred["shape"] == labels["shape"]).float().mean().item(),
        "shape": (pred["shape"] == labels["shape"])[occupied].float().mean().item(),
        "color": (pred["color"] == labels["color"])[occupied].float().mean().item(),
        "size": (pred["size"] == labels["size"])[occupied].float().mean().item(),
        "whole_image": ((pred["shape"] == labels["shape"]).all(1)
                        & ((pred["color"] == labels["color"]) | ~occupied).all(1)
                        & ((pred["size"] == labels["size"]) | ~occupied).all(1)).float().mean().item(),
    }
    captions = [s.caption for s in scenes]
    img = clip.encode_image(images)
    txt = clip.encode_text(captions)
    sims = img @ txt.T
    rep["clip_retrieval_top1"] = (sims.argmax(1) == torch.arange(n)).float().mean().item()
    rep["clip_score_matched"] = (100 * sims.diag().clamp(min=0)).mean().item()
    rep["clip_score_shuffled"] = (100 * sims.roll(1, dims=1).diag().clamp(min=0)).mean().item()
    return rep


def train_evaluators(cfg: EvaluatorTrainConfig, out_dir: Path = ASSETS, progress: bool = True) -> dict:
    t0 = time.time()
    attr = train_attribute_net(cfg, progress)
    clip = train_clip(cfg, progress)
    report = heldout_report(attr, clip)
    cmd = "flashbench train-evaluators"
    for name, model in (("attribute_net", attr), ("clip", clip)):
        digest = io.save_tensors(out_dir / f"{name}.safetensors", model.state_dict())
        card = {
            "sha256": digest,
            "train_config": dataclasses.asdict(cfg),
            "heldout": report,
            "params": sum(p.numel() for p in model.state_dict().values()),
            "command": cmd,
        }
        if name == "clip":
            card["clip_config"] = CLIP_CONFIG
        io.write_text(out_dir / f"{name}.json", json.dumps(card, indent=2) + "\n")
    report["train_seconds"] = round(time.time() - t0, 1)
    return report
