"""Training the embedded shapes teachers from scratch (`flashbench train-teacher --kind vp|flow`).

Both kinds: renders of the world's train split, the same UNet and text encoder, caption dropout for
classifier-free guidance, an EMA of the weights (what ships).
  vp:   ε-prediction on SD's scaled-linear schedule (discrete t), min-SNR-γ loss weighting (Hang et al.)
  flow: rectified flow, x_t = (1 − σ) x0 + σ ε, velocity target u = ε − x0 (SD3, Esser et al. 2024, Eq. 1-3),
        σ drawn logit-normal(0, 1) ("rf/lognorm(0.00, 1.00)", SD3's best in its Table 1; diffusers'
        ``compute_density_for_timestep_sampling``), network timestep σ·1000, unweighted MSE; shift 1 (a
        16 × 16 image needs no resolution shift)
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from bench.shapes import TEACHER_FILES, TEACHER_KINDS, world
from bench.shapes import teacher as shapes
from bench.shapes.training import warmup_cosine
from core import faults, io
from methods import diffusion as D
from methods.training import EMA, check_finite, load_checkpoint, save_checkpoint


@dataclasses.dataclass
class TeacherTrainConfig:
    kind: str = "vp"  # "vp": ε-prediction on SD's schedule; "flow": rectified-flow velocity
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 500
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    # "x0-truncated": x̂_0 loss weighted by clamp(SNR, 1, γ) — full weight on the high-noise steps where
    # layout and attribute binding are decided; "min-snr": ε loss weighted by min(SNR, γ)/SNR
    loss_weighting: str = "min-snr"
    # the text encoder's caption-parsing objective (see CaptionParser), weight in the total loss
    text_parse_weight: float = 0.1
    # flow only: σ ~ logit-normal(logit_mean, logit_std)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    grad_clip: float = 1.0
    seed: int = 0
    ckpt_every: int = 500


class CaptionParser(nn.Module):
    """Text-encoder pre-training head (training only, never shipped): per position slot, a learned query
    attends over the caption's token states and predicts what the caption puts there (shape or
    nothing, colour, size). Real teachers get phrase structure from a language model pretrained on
    text; this tiny encoder learns it from the caption grammar's parse. No image, no evaluator.
    """

    def __init__(self, dim: int = 64, heads: int = 4):
        super().__init__()
        self.slots = nn.Parameter(torch.randn(len(world.POSITIONS), dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.shape = nn.Linear(dim, 1 + len(world.SHAPES))
        self.color = nn.Linear(dim, len(world.COLORS))
        self.size = nn.Linear(dim, len(world.SIZES))

    def loss(self, states: torch.Tensor, scenes: list, keep: torch.Tensor) -> torch.Tensor:
        q = self.slots.unsqueeze(0).expand(states.shape[0], -1, -1)
        h, _ = self.attn(q, states, states)  # [B, slots, dim]
        labels = world.slot_labels(scenes)
        shape, color, size = labels["shape"], labels["color"], labels["size"]
        k = keep.to(states.device)  # dropped (empty) captions name nothing: no target
        ce = nn.functional.cross_entropy
        return (ce(self.shape(h[k]).flatten(0, 1), shape[k].flatten().to(h.device))
                + ce(self.color(h[k]).flatten(0, 1), color[k].flatten().to(h.device), ignore_index=-100)
                + ce(self.size(h[k]).flatten(0, 1), size[k].flatten().to(h.device), ignore_index=-100))


def train_teacher(cfg: TeacherTrainConfig, out_dir: Path, device: str = "cpu", progress: bool = True) -> Path:
    """Train (or resume) the teacher; writes teacher.safetensors + teacher.json into out_dir."""
    out_dir = Path(out_dir)
    ckpt = out_dir / (TEACHER_FILES[cfg.kind][0].removesuffix(".safetensors") + "-train.ckpt.safetensors")
    torch.manual_seed(cfg.seed)
    model = nn.ModuleDict({"unet": shapes.build_unet(), "text": shapes.TextEncoder()}).to(device)
    ema = EMA(model, cfg.ema_decay)
    parser = CaptionParser().to(device)
    params = list(model.parameters()) + list(parser.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_at = warmup_cosine(cfg.warmup, cfg.steps)
    if cfg.kind not in TEACHER_KINDS:
        raise ValueError(f"kind must be one of {TEACHER_KINDS}, got {cfg.kind!r}")
    schedule = shapes.schedule_of(cfg.kind)
    model.train()
    step = 0
    if ckpt.exists():
        step, _ = load_checkpoint(ckpt, {"model": model, "ema": ema.module, "parser": parser}, {"opt": opt})
    gen = torch.Generator().manual_seed(cfg.seed)
    log = []
    t_start = time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc="train-teacher", disable=not progress)
    while step < cfg.steps:
        faults.maybe_kill("teacher", step)
        gen.manual_seed(cfg.seed * 1_000_003 + step)  # the batch is a function of the step: resumable
        # 1. a batch of real renders and captions, some dropped for CFG
        scenes = world.scenes("train", step * cfg.batch_size, cfg.batch_size)
        x0 = world.render(scenes).to(device) * 2 - 1
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
        captions = ["" if d else s.caption for s, d in zip(scenes, drop.tolist())]
        ids, _ = shapes.tokenize(captions)
        # 2. noise to a training time, predict ε (vp) or the velocity u = ε − x0 (flow)
        t = _training_times(cfg, schedule, gen)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        x_t = schedule.add_noise(x0, eps, t).float()
        states = model["text"](ids.to(device))
        pred = model["unet"](x_t, t.float().to(device) if cfg.kind == "flow" else t.to(device), states).sample
        # 3. the loss to the parameterisation's target: min-SNR-γ weighted (vp, ε), plain MSE (flow, u = ε − x0)
        alpha, sigma = schedule.alpha(t).float().to(device), schedule.sigma(t).float().to(device)
        target = D.prediction_target(shapes.PREDICTION_TYPES[cfg.kind], x0, eps, alpha, sigma)
        if cfg.kind == "flow":
            loss = (pred - target).pow(2).mean()
        else:
            snr = schedule.snr(t).float().to(device)
            weight = D.eps_loss_weight(snr, cfg.loss_weighting, cfg.min_snr_gamma)
            loss = (weight * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()
        if cfg.text_parse_weight > 0 and (~drop).any():
            loss = loss + cfg.text_parse_weight * parser.loss(states, scenes, ~drop)
        check_finite(loss, "teacher loss", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_at(step)
        opt.step()
        ema.update(model, step)
        step += 1
        log.append(loss.item())
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(log[-50:]) / 50:.4f}")
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save_checkpoint(ckpt, step, {"model": model, "ema": ema.module, "parser": parser}, {"opt": opt})
    bar.close()
    return export_teacher(ema.module, cfg, out_dir, train_seconds=time.time() - t_start)


def _training_times(cfg: TeacherTrainConfig, schedule, gen: torch.Generator) -> torch.Tensor:
    """Training timesteps [batch]: uniform integers in [0, T) (vp, long) or σ·T with σ logit-normal (flow, float64)."""
    if cfg.kind == "vp":
        return torch.randint(0, schedule.T, (cfg.batch_size,), generator=gen)
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling("logit_normal", cfg.batch_size, cfg.logit_mean, cfg.logit_std,
                                              generator=gen)
    return schedule.warp(u.double()) * schedule.T


def export_teacher(model: nn.ModuleDict, cfg: TeacherTrainConfig, out_dir: Path, train_seconds: float) -> Path:
    tensors = {f"unet.{k}": v for k, v in model["unet"].state_dict().items()}
    tensors.update({f"text.{k}": v for k, v in model["text"].state_dict().items()})
    weights_name, card_name = TEACHER_FILES[cfg.kind]
    path = out_dir / weights_name
    digest = io.save_tensors(path, tensors)
    card = {
        "sha256": digest,
        "unet_config": shapes.UNET_CONFIG,
        "text_config": model["text"].config,
        "kind": cfg.kind,
        "prediction_type": shapes.PREDICTION_TYPES[cfg.kind],
        "schedule": shapes.SCHEDULE_CONFIGS[cfg.kind],
        "train_config": dataclasses.asdict(cfg),
        "params": sum(v.numel() for v in tensors.values()),
        "train_seconds_last_session": round(train_seconds, 1),
        "command": f"flashbench train-teacher --kind {cfg.kind} --steps {cfg.steps}",
    }
    io.write_text(out_dir / card_name, json.dumps(card, indent=2, default=list) + "\n")
    return path
