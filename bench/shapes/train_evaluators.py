"""Training the shapes world's frozen evaluators (`flashbench train-evaluators`).

Both networks learn from ground-truth renders of the world's train split only, at scene seeds no
teacher training uses; the attribute network also sees degraded copies (blurred, noisy) so its
features separate sharp from blurry samples. ``heldout_report`` measures them on the validation split.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bench.shapes import ASSETS, world
from bench.shapes.evaluators import CLIP_CONFIG, AttributeNet, TinyCLIP
from bench.shapes.training import warmup_cosine
from core import io


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
