"""Imagine Flash (Kohler et al. 2024, arXiv 2405.05224): backward distillation, shifted
reconstruction loss (SRL), noise correction, and an adversarial term.

Each component is a switch, so the paper's ablation is one field per row:
  backward_distillation  student inputs come from its own sampler (off: real images noised to t)
  srl                    teacher target from the re-noised student x̂_0 at γ(t) = ρ·t (off: from x_t)
  noise_correction       first sampling step uses x_T as its direction (inference only)
  adversarial            hinge GAN on frozen teacher-encoder features, weight lambda_adv
The paper prints neither γ nor k: both are settings (rho, teacher_steps), recorded in every result;
their defaults come from `flashbench sweep` (see the README).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from methods import diffusion as D
from methods.base import TrainInfo
from methods.registry import register
from methods.sampling import Denoiser, ddim_trajectory
from methods.student import AdversarialConfig, DistilledMethod
from methods.training import run_updates


@dataclasses.dataclass
class ImagineFlashConfig(AdversarialConfig):
    backward_distillation: bool = True
    srl: bool = True
    noise_correction: bool = True
    adversarial: bool = True
    rho: float = 1.0  # γ(t) = ρ·t, the SRL teacher time (the sweep in the README chose 1.0)
    teacher_steps: int = 2  # k: guided teacher DDIM steps that build the target (sweep: 2)
    lambda_adv: float = 0.1
    max_steps: int = 3  # students exist for 1..max_steps sampling steps
    shared_student: bool = False  # one student for every step count (trained on random grids) or one per count

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.rho <= 1:
            raise ValueError(f"rho must be in (0, 1], got {self.rho}")
        if self.teacher_steps < 1:
            raise ValueError(f"teacher_steps must be >= 1, got {self.teacher_steps}")


def teacher_target(teacher: Denoiser, chi, t_start: int, k: int, cond, uncond, w: float) -> torch.Tensor:
    """x̂_0 after k guided teacher DDIM steps from χ at t_start (the final estimate, no gradient)."""
    grid = [int(round(t_start * (1 - j / k))) for j in range(k)]
    grid = [g for i, g in enumerate(grid) if i == 0 or g < grid[i - 1]]  # strictly decreasing near t=0
    with torch.no_grad():
        return ddim_trajectory(lambda x, t: teacher.predict_guided(x, t, cond, uncond, w), teacher.schedule, chi, grid)


def srl_input(x0_student, t, rho: float, schedule: D.Schedule, eps_fresh):
    """χ = α_{γ(t)} sg(x̂_0^Θ) + σ_{γ(t)} ε' with γ(t) = ρ·t (Imagine Flash, shifted reconstruction)."""
    t_phi = int(D.gamma_shift(t, rho))
    chi = schedule.add_noise(x0_student.detach(), eps_fresh, t_phi).to(x0_student.dtype)
    return chi, t_phi


def backward_latent(predict, schedule: D.Schedule, x_T, timesteps: list[int], i: int,
                    noise_correction: bool) -> torch.Tensor:
    """x^Θ_{T→t}: the student's own sampler from pure noise down to grid time timesteps[i], without gradient."""
    with torch.no_grad():
        return ddim_trajectory(predict, schedule, x_T, timesteps, noise_correction, stop_at=i)


def distillation_loss(x0_student, target) -> torch.Tensor:
    """‖x̂_0^Θ − sg(target)‖² (mean over pixels)."""
    return F.mse_loss(x0_student, target.detach())


@register("imagine-flash")
class ImagineFlash(DistilledMethod):
    """Imagine Flash: backward distillation + shifted reconstruction loss + noise correction + GAN."""

    Config = ImagineFlashConfig
    INFERENCE_FIELDS = frozenset({"noise_correction"})

    @classmethod
    def smoke_settings(cls) -> dict:
        return {"student_updates": 2, "batch_size": 2, "max_steps": 2}

    def student_steps(self, steps: int) -> int:
        return self.config.max_steps if self.config.shared_student else steps

    def train_student(self, unet, grid: int, ckpt) -> TrainInfo:
        cfg, bb = self.config, self.backbone
        student = Denoiser(unet, bb.schedule, bb.prediction_type)
        teacher = self.teacher()
        opt = self.optimizer(unet.parameters())
        modules, opts = {"student": unet}, {"student": opt}
        adv = None
        if cfg.adversarial:
            adv = self.adversarial()
            modules["disc"], opts["disc"] = adv.disc.heads, adv.opt

        def update(step: int) -> dict:
            g, real, cond, uncond = self.conditioned_batch(step)
            n = len(cond)
            # 1. the training latent at a grid time t
            steps = int(torch.randint(1, grid + 1, (1,), generator=g)) if cfg.shared_student else grid
            timesteps = D.trailing_timesteps(steps)
            i = int(torch.randint(0, steps, (1,), generator=g))
            t = timesteps[i]
            if cfg.backward_distillation:
                # roll the student's own sampler from pure noise down to t, without gradient
                x_T = torch.randn((n, *bb.sample_shape), generator=g).to(bb.device)
                x_t = backward_latent(lambda x, s: student.predict(x, s, cond), bb.schedule, x_T, timesteps, i,
                                      cfg.noise_correction)
            else:
                # forward distillation: a real image noised to t
                eps = torch.randn(real.shape, generator=g).to(bb.device)
                x_t = bb.schedule.add_noise(bb.from_images(real), eps, t).float()
            # 2. the student's clean estimate
            x0_s, _ = student.predict(x_t, t, cond)
            # 3. the teacher target: from the re-noised student estimate at γ(t) (SRL) or from x_t
            if cfg.srl:
                eps_fresh = torch.randn(x_t.shape, generator=g).to(bb.device)
                chi, t_start = srl_input(x0_s, t, cfg.rho, bb.schedule, eps_fresh)
            else:
                chi, t_start = x_t, t
            target = teacher_target(teacher, chi, t_start, cfg.teacher_steps, cond, uncond, cfg.guidance_scale)
            loss_d = distillation_loss(x0_s, target)
            losses = {"distill": loss_d.item()}
            loss = loss_d
            # 4. adversarial term through the frozen teacher features
            if adv is not None:
                g_adv = adv.generator_loss(x0_s, cond, g)
                loss = loss + cfg.lambda_adv * g_adv
                losses["g_adv"] = g_adv.item()
            self.step(opt, loss, unet)
            if adv is not None:
                losses["d"] = adv.step(bb.from_images(real), cond, x0_s, g)
            return losses

        log = run_updates(update, self.updates(), ckpt, modules, opts, desc=f"imagine-flash {grid}-step",
                          progress=self.ctx.progress)
        return self.trained(log, teacher_nfe_per_sample=2 * cfg.teacher_steps)

    @torch.no_grad()
    def sample(self, texts, noise_keys, steps):
        bb = self.backbone
        student, cond, x_T = self.sampling_inputs(texts, noise_keys, steps)
        x0 = ddim_trajectory(lambda x, t: student.predict(x, t, cond), bb.schedule, x_T,
                             D.trailing_timesteps(steps), self.config.noise_correction)
        return bb.to_images(x0)
