"""The multi-step teacher with diffusers' training-free solvers (DDIM, DPM-Solver++, Euler, UniPC)."""

from __future__ import annotations

import dataclasses

import torch

from core.errors import UserError, unknown
from methods.base import Method
from methods.diffusion import T_TRAIN
from methods.registry import register
from methods.sampling import (GUIDANCE_NFE, NOISE_CORRECTABLE, SOLVERS, Denoiser, make_scheduler, per_sample_noise,
                              solver_sample)


@dataclasses.dataclass
class TeacherConfig:
    solver: str = "dpmsolver++"
    guidance_scale: float = 1.5
    # cfg: one batched call on [uncond; cond] (2 NFE/step); true-cfg: two sequential calls (2 NFE/step);
    # embedded: guidance_scale to the network's guidance embedding (FLUX.1-dev, 1 NFE/step); none (1 NFE/step)
    guidance: str = "cfg"
    noise_correction: bool = False

    def __post_init__(self):
        if self.guidance not in GUIDANCE_NFE:
            raise unknown("guidance", self.guidance, GUIDANCE_NFE)
        if self.solver not in SOLVERS:
            raise unknown("solver", self.solver, SOLVERS)
        if self.noise_correction and self.solver not in NOISE_CORRECTABLE:
            raise UserError(f"noise_correction needs a solver whose state is x_t ({', '.join(NOISE_CORRECTABLE)}), "
                            f"not {self.solver!r}")


@register("teacher")
class Teacher(Method):
    """The multi-step teacher with DDIM / DPM-Solver++ / Euler / UniPC (training-free)."""

    Config = TeacherConfig

    def __init__(self, backbone, config: TeacherConfig, ctx):
        super().__init__(backbone, config, ctx)
        if config.guidance == "embedded" and not backbone.guidance_embeds:
            raise UserError(f"teacher: guidance = 'embedded' needs a network with a guidance embedding (FLUX.1-dev); "
                            f"{type(backbone).__name__} has none: use 'cfg', 'true-cfg' or 'none'")
        self.denoiser = Denoiser(self.counted(backbone.net), backbone.schedule, backbone.prediction_type)

    @classmethod
    def nfe_per_step(cls, config: TeacherConfig) -> int:
        return GUIDANCE_NFE[config.guidance]

    @classmethod
    def allowed_steps(cls, config: TeacherConfig) -> tuple[int, ...]:
        return tuple(range(1, T_TRAIN + 1))  # a solver visits each of the (1000) training timesteps at most once

    @torch.no_grad()
    def sample(self, texts, noise_keys, steps):
        bb, cfg = self.backbone, self.config
        x_T = per_sample_noise(noise_keys, bb.sample_shape, device=bb.device)
        cond = bb.encode_text(texts)
        uncond = bb.encode_text([""] * len(texts)) if cfg.guidance in ("cfg", "true-cfg") else None
        model_output = self.denoiser.guided(cfg.guidance, cond, uncond, cfg.guidance_scale)
        scheduler = make_scheduler(cfg.solver, bb.scheduler_config)
        x0 = solver_sample(model_output, scheduler, bb.schedule, x_T, steps, bb.prediction_type, cfg.noise_correction)
        return bb.to_images(x0)
