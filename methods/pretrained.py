"""Published distilled checkpoints, loaded from local paths and measured under the bench's protocol.

kind        what `path` is                                  scheduler (trailing spacing)      guidance
lcm         a diffusers UNet dir with a w-embedding         LCMScheduler                      w = guidance_scale − 1, embedded
lcm-lora    LoRA weights (safetensors) for the teacher UNet LCMScheduler                      none
turbo       a diffusers UNet dir (SD-Turbo / SDXL-Turbo)    EulerAncestralDiscreteScheduler   none
lightning   a UNet dir or LoRA (SDXL-Lightning)             EulerDiscreteScheduler            none
Each step is 1 NFE. Text encoder, VAE and schedule are the backbone's (the checkpoint's base model).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from core.errors import UserError, unknown
from methods.base import Method, TrainInfo
from methods.registry import register
from methods.sampling import Denoiser, lcm_scheduler_config, per_sample_generators, per_sample_noise, solver_sample

KINDS = ("lcm", "lcm-lora", "turbo", "lightning")


@dataclasses.dataclass
class PretrainedConfig:
    kind: str = "lcm"
    path: str = ""
    guidance_scale: float = 8.0  # used by kind "lcm" only (embedded as w = guidance_scale - 1)
    max_steps: int = 8
    steps: tuple[int, ...] = ()  # step counts the checkpoint was distilled for (empty: 1..max_steps)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise unknown("checkpoint kind", self.kind, KINDS)
        if not self.path:
            raise UserError(f"pretrained {self.kind}: give path = the local checkpoint (UNet directory or LoRA file)")


@register("pretrained")
class Pretrained(Method):
    """Published distilled checkpoints from local paths (LCM, LCM-LoRA, SD/SDXL-Turbo, SDXL-Lightning)."""

    Config = PretrainedConfig

    def __init__(self, backbone, config: PretrainedConfig, ctx):
        super().__init__(backbone, config, ctx)
        self.denoiser = None

    @classmethod
    def allowed_steps(cls, config) -> tuple[int, ...]:
        return tuple(config.steps) or tuple(range(1, config.max_steps + 1))

    def prepare(self, steps: int) -> TrainInfo:
        if self.denoiser is not None:
            return TrainInfo(cached=True, checkpoint=Path(self.config.path).name)
        from diffusers import UNet2DConditionModel

        path = Path(self.config.path)
        if not path.exists():
            raise UserError(f"pretrained {self.config.kind}: {path} does not exist")
        bb = self.backbone
        if path.is_dir():
            unet = UNet2DConditionModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
        elif path.suffix == ".safetensors":  # LoRA on the base model's UNet
            unet = bb.new_unet()
            unet.load_lora_adapter(str(path), prefix="unet", adapter_name="distilled")
            unet.fuse_lora()
        else:
            raise UserError(f"pretrained {self.config.kind}: {path} must be a UNet directory or a .safetensors LoRA")
        unet = unet.to(bb.device).eval().requires_grad_(False)
        w_dim = unet.config.time_cond_proj_dim if self.config.kind == "lcm" else None
        if self.config.kind == "lcm" and not w_dim:
            raise UserError(f"pretrained lcm: {path} has no guidance embedding (time_cond_proj_dim); "
                            "use kind = 'lcm-lora' or 'turbo'")
        self.denoiser = Denoiser(self.counted(unet), bb.schedule, bb.prediction_type, w_dim)
        return TrainInfo(cached=True, checkpoint=path.name)

    def _scheduler(self):
        import diffusers

        cfg = dict(self.backbone.scheduler_config, timestep_spacing="trailing")
        if self.config.kind in ("lcm", "lcm-lora"):
            return diffusers.LCMScheduler.from_config(lcm_scheduler_config(cfg))
        if self.config.kind == "turbo":
            return diffusers.EulerAncestralDiscreteScheduler.from_config(cfg)
        return diffusers.EulerDiscreteScheduler.from_config(cfg)

    @torch.no_grad()
    def sample(self, texts, noise_keys, steps):
        self.prepare(steps)
        bb = self.backbone
        cond = bb.encode_text(texts)
        w = self.config.guidance_scale - 1.0 if self.config.kind == "lcm" else None
        x_T = per_sample_noise(noise_keys, bb.sample_shape, device=bb.device)
        stochastic = self.config.kind in ("lcm", "lcm-lora", "turbo")
        x0 = solver_sample(lambda x, t: self.denoiser.raw(x, t, cond, w), self._scheduler(), bb.schedule, x_T, steps,
                           bb.prediction_type,
                           generators=(lambda i: per_sample_generators(noise_keys, i + 1)) if stochastic else None)
        return bb.to_images(x0)
