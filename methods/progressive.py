"""Guided progressive distillation (Salimans & Ho 2022; Meng et al. 2023, the paper's "step distillation").

Stage 0 distils classifier-free guidance into a w-conditioned student that samples with DDIM in
``max_steps`` steps (1 NFE per step; default 4, so each halving round gets a real share of the
budget). Each following round halves the step count N -> N/2: the
student (initialised from the previous round's) learns to match, in one DDIM step from z_t, two
DDIM steps of the previous student, through the target x̃ that makes a single step land on z''.
Loss on x̂_0 weighted by max(SNR, 1). Every round's student is kept (4, 2, 1 steps). The student's
output parameterisation is a setting (``student_prediction``): the teacher's own ("teacher": ε on SD,
velocity on a rectified flow), or v as Salimans & Ho recommend for few steps (the CFG stage then
also teaches the new output; VP teachers only: v's conversions assume α² + σ² = 1). Each training sample
draws its own grid index.

On a rectified flow nothing else changes: DDIM is the flow's Euler step, x̃ is the same closed form
with α = 1 − σ (at σ = 1, α_t = 0 and x̃ = (z'' − σ'' z_t) / α''), and SNR = ((1 − σ)/σ)². The student keeps
the velocity output: x̂_0 from ε is undefined at σ = 1, where every sampler starts, and v assumes VP.
"""

from __future__ import annotations

import dataclasses

import torch

from core.errors import UserError
from methods import diffusion as D
from methods.base import TrainInfo
from methods.registry import register
from methods.sampling import Denoiser, ddim_trajectory
from methods.student import DistillConfig, DistilledMethod
from methods.training import run_updates


STUDENT_PREDICTIONS = ("teacher", "epsilon", "v_prediction", "flow")


@dataclasses.dataclass
class ProgressiveConfig(DistillConfig):
    lr: float = 5e-5  # the `lr` study's choice (results/reference/study-lr: lowest mean validation FID, 2 seeds)
    max_steps: int = 4  # the CFG-distilled student's DDIM steps (a power of two); rounds halve it down to 1
    cfg_fraction: float = 0.2  # share of student_updates spent on the CFG-distillation stage
    w_min: float = 1.5
    w_max: float = 4.5
    student_prediction: str = "teacher"  # the student's output: the teacher's parameterisation, or "v_prediction"

    def __post_init__(self):
        super().__post_init__()
        if self.max_steps & (self.max_steps - 1):
            raise ValueError(f"max_steps must be a power of two, got {self.max_steps}")
        if not 0 < self.cfg_fraction < 1:
            raise ValueError(f"cfg_fraction must be in (0, 1), got {self.cfg_fraction}")
        if self.student_prediction not in STUDENT_PREDICTIONS:
            raise ValueError(f"student_prediction must be one of {STUDENT_PREDICTIONS}, got {self.student_prediction!r}")


def snr_weighted_x_loss(x0_pred, x0_target, t, schedule: D.Schedule) -> torch.Tensor:
    """max(SNR_t, 1)·‖x̂_0 − x̃‖² ("truncated SNR" weighting)."""
    w = D.snr_truncated_weight(schedule.snr(torch.as_tensor(t))).to(x0_pred)
    w = w.expand(x0_pred.shape[0]) if w.ndim == 0 else w
    return (w * (x0_pred - x0_target.detach()).pow(2).flatten(1).mean(1)).mean()


def _coef(schedule: D.Schedule, t: torch.Tensor):
    """(α, σ) float64 [B] at per-sample times t; t = −1 marks the end of sampling (the clean image: 1, 0)."""
    end = t < 0
    t = t.clamp(min=0)
    return (torch.where(end, 1.0, schedule.alpha(t)), torch.where(end, 0.0, schedule.sigma(t)))


@register("progressive")
class Progressive(DistilledMethod):
    """Guided progressive distillation (Meng et al.): CFG distillation, then halving rounds."""

    Config = ProgressiveConfig
    # training draws w ~ U[w_min, w_max]; guidance_scale is only the w the sampler asks for
    INFERENCE_FIELDS = frozenset({"guidance_scale"})
    w_dim = 64

    def __init__(self, backbone, config: ProgressiveConfig, ctx):
        super().__init__(backbone, config, ctx)
        out, family = self.student_prediction_type(), backbone.schedule.kind
        fits = {"vp": ("epsilon", "v_prediction"), "flow": ("flow",)}[family]
        if out not in fits:
            why = {"epsilon": " (x̂_0 from ε is undefined at σ = 1)",
                   "v_prediction": " (v's conversions assume α² + σ² = 1, a VP schedule)"}.get(out, "")
            raise UserError(f"progressive: student_prediction {out!r} does not fit a {family} teacher; use "
                            f"{' or '.join(repr(f) for f in ('teacher', *fits))}{why}")

    @classmethod
    def allowed_steps(cls, config) -> tuple[int, ...]:
        out, n = [], config.max_steps
        while n >= 1:
            out.append(n)
            n //= 2
        return tuple(sorted(out))

    @classmethod
    def smoke_settings(cls) -> dict:
        return {"student_updates": 6, "batch_size": 2, "max_steps": 2}

    def prefix_stable(self) -> bool:
        return False  # its stages are fractions of the total (cfg_fraction, then equal halving rounds)

    def training_timesteps(self, grid: int) -> set[int]:
        # the CFG stage (grid = max_steps) learns at every t; a halving round at its own grid's times
        schedule = self.backbone.schedule
        if grid == self.config.max_steps:  # the CFG stage learns at every t (all of them: a marker set)
            return set(range(schedule.T)) | set(schedule.grid(grid))
        return set(schedule.grid(grid))

    def sampling_timesteps(self, steps: int) -> list:
        return self.backbone.schedule.grid(steps)

    def _denoiser(self, net, role: str) -> Denoiser:
        return Denoiser(self.counting(net, role), self.backbone.schedule, self.student_prediction_type(), self.w_dim)

    def _stage_updates(self) -> tuple[int, int]:
        rounds = max(1, self.config.max_steps.bit_length() - 1)
        total = self.updates()
        first = max(1, round(total * self.config.cfg_fraction))
        return first, max(1, (total - first) // rounds)

    def train_student(self, net, grid: int, ckpt) -> TrainInfo:
        cfg = self.config
        if grid == cfg.max_steps:
            return self._train_cfg_stage(net, ckpt)
        # the previous round's student is this round's teacher, and this round's initialisation
        prev = self.prepare(2 * grid)
        teacher_net = self.nets[2 * grid]
        net.load_state_dict(teacher_net.state_dict())
        return self._train_round(net, teacher_net, grid, ckpt, prev)

    def _w(self, g, n):
        return self.config.w_min + (self.config.w_max - self.config.w_min) * torch.rand(n, generator=g)

    def _train_cfg_stage(self, net, ckpt) -> TrainInfo:
        """Stage 0: x̂_0 of the w-conditioned student matches the guided teacher's, at random t."""
        bb = self.backbone
        student = self._denoiser(net, "student")
        teacher = self.teacher()
        opt = self.optimizer(net.parameters())
        updates, _ = self._stage_updates()

        def update(step: int) -> dict:
            g, real, cond, uncond = self.conditioned_batch(step, gen_stream=100)
            n = len(cond)
            x0 = bb.from_images(real)
            t = bb.schedule.sample_t(n, g)
            x_t = bb.schedule.add_noise(x0, torch.randn(x0.shape, generator=g).to(x0), t).float()
            w = self._w(g, n)
            with torch.no_grad():
                target, _ = teacher.split(x_t, t, teacher.raw_guided(x_t, t, cond, uncond, w.to(x_t)))
            pred, _ = student.predict(x_t, t, cond, w)
            loss = snr_weighted_x_loss(pred, target, t, bb.schedule)
            self.step(opt, loss, net)
            return {"cfg_distill": loss.item()}

        log = run_updates(update, updates, ckpt, {"student": net}, {"student": opt},
                          desc=f"progressive cfg ({self.config.max_steps} steps)", progress=self.ctx.progress,
                          compute=self.compute)
        return self.trained(log, updates)

    def _train_round(self, net, teacher_net, grid: int, ckpt, prev: TrainInfo) -> TrainInfo:
        """One halving round: 2 teacher DDIM steps -> 1 student step, through the x̃ target."""
        bb = self.backbone
        student = self._denoiser(net, "student")
        teacher = self._denoiser(teacher_net, "round_teacher")  # the previous round's student
        opt = self.optimizer(net.parameters())
        # the teacher's grid; every other point is the student's; -1 marks the end (the clean image)
        fine = torch.tensor(bb.schedule.grid(2 * grid) + [-1])
        _, updates = self._stage_updates()

        def update(step: int) -> dict:
            g, real, cond, _ = self.conditioned_batch(step, gen_stream=grid)
            n = len(cond)
            x0 = bb.from_images(real)
            i = torch.randint(0, grid, (n,), generator=g)  # each sample its own student grid index
            t, t_mid, t_end = fine[2 * i], fine[2 * i + 1], fine[2 * i + 2]
            z_t = bb.schedule.add_noise(x0, torch.randn(x0.shape, generator=g).to(x0), t).float()
            w = self._w(g, n)
            with torch.no_grad():
                # 1. two teacher DDIM steps t -> t' -> t'' (at the last student step t'' is the end and
                #    z'' the teacher's two-step x̂_0)
                a_mid, s_mid = _coef(bb.schedule, t_mid)
                a2, s2 = _coef(bb.schedule, t_end)
                x0_a, eps_a = teacher.predict(z_t, t, cond, w)
                z_mid = D.ddim_step(x0_a, eps_a, a_mid.float(), s_mid.float())
                x0_b, eps_b = teacher.predict(z_mid, t_mid, cond, w)
                z_tpp = D.ddim_step(x0_b, eps_b, a2.float(), s2.float())
                # 2. the x̃ a single DDIM step from z_t must predict to land on z''
                a_t, s_t = _coef(bb.schedule, t)
                x_tilde = D.progressive_target(z_t.double(), z_tpp.double(), a_t, s_t, a2, s2).float()
            pred, _ = student.predict(z_t, t, cond, w)
            loss = snr_weighted_x_loss(pred, x_tilde, t, bb.schedule)
            self.step(opt, loss, net)
            return {"pd": loss.item()}

        log = run_updates(update, updates, ckpt, {"student": net}, {"student": opt},
                          desc=f"progressive {2 * grid}->{grid} steps", progress=self.ctx.progress,
                          compute=self.compute)
        return self.trained(log, updates, before=prev)

    def student_prediction_type(self) -> str:
        kind = self.config.student_prediction
        return self.backbone.prediction_type if kind == "teacher" else kind

    @torch.no_grad()
    def sample(self, texts, noise_keys, steps):
        bb = self.backbone
        student, cond, x_T = self.sampling_inputs(texts, noise_keys, steps)
        w = self.config.guidance_scale
        x0 = ddim_trajectory(lambda x, t: student.predict(x, t, cond, w), bb.schedule, x_T,
                             self.sampling_timesteps(steps))
        return bb.to_images(x0)
