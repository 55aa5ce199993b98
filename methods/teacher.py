"""The multi-step teacher with diffusers' training-free solvers (DDIM, DPM-Solver++, Euler, UniPC)."""

from __future__ import annotations

import dataclasses

import torch

from core.errors import UserError, unknown
from methods.base import Method
from methods.diffusion import T_TRAIN
from methods.registry import register
from methods.sampling import NOISE_CORRECTABLE, SOLVERS, Denoiser, make_scheduler, per_sample_noise, solver_sample


@dataclasses.dataclass
class TeacherConfig:
    solver: str = "dpmsolver++"
    guidance_scale: float = 1.5
    guided: bool = True  # classifier-free guidance: 2 NFE per step
    noise_correction: bool = False

    def __post_init__(self):
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
        self.denoiser = Denoiser(self.counted(backbone.unet), backbone.schedule, backbone.prediction_type)

    @classmethod
    def nfe_per_step(cls, config: TeacherConfig) -> int:
        return 2 if config.guided else 1

    @classmethod
    def allowed_steps(cls, config: TeacherConfig) -> tuple[int, ...]:
        return tuple(range(1, T_TRAIN + 1))  # a solver visits each of the (1000) training timesteps at most once

    @torch.no_grad()
    def sample(self, texts, noise_keys, steps):
        bb, cfg = self.backbone, self.config
        x_T = per_sample_noise(noise_keys, bb.sample_shape, device=bb.device)
        cond = bb.encode_text(texts)
        if cfg.guided:
            uncond = bb.encode_text([""] * len(texts))

            def model_output(x, t):
                return self.denoiser.raw_guided(x, t, cond, uncond, cfg.guidance_scale)
        else:
            def model_output(x, t):
                return self.denoiser.raw(x, t, cond)

        scheduler = make_scheduler(cfg.solver, bb.scheduler_config)
        # a flow's Euler runs on the schedule's own grid σ = 1 − i/N (shifted), from σ = 1 (as FluxPipeline);
        # diffusers' flow DPM-Solver++ / UniPC choose their own (from σ = 1 − 1/T)
        sigmas = bb.schedule.unshifted_sigmas(steps) if bb.schedule.kind == "flow" and cfg.solver in ("ddim", "euler") else None
        x0 = solver_sample(model_output, scheduler, bb.schedule, x_T, steps, bb.prediction_type, cfg.noise_correction,
                           sigmas=sigmas)
        return bb.to_images(x0)
