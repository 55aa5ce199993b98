"""Latent consistency distillation (Luo et al. 2023; as diffusers' consistency-distillation example).

The student (teacher copy with a guidance-scale embedding, ``time_cond_proj_dim``) learns the
consistency function f_θ(x_t, t, w) = c_skip(t) x_t + c_out(t) x̂_0 along the teacher's guided
probability-flow ODE, discretised by a skipping-step DDIM solver over a 50-step grid (skip 20 of
1000). The target is f_θ⁻ at the previous grid point after one CFG-guided teacher DDIM step, with
θ⁻ an EMA of θ. Sampling uses diffusers' ``LCMScheduler`` (re-noising with fresh per-sample noise
at each grid time; 1 NFE per step).

On a rectified flow (as diffusers' ``FlowMatchLCMScheduler``): the solver grid is N points uniform in σ
(then shifted, as the schedule's sampling grid), the teacher step is the flow's Euler (= DDIM) step, and
the boundary condition sits at σ = 0 with the same c_skip/c_out in the timestep t = 1000 σ (c_skip ≤ 6e-6
at every grid time t ≥ 1000/N, so the consistency output is x̂_0 = x_t − σ û there). Sampling is
``FlowMatchLCMScheduler`` on every (1000/N·⌊N/steps⌋)-th grid point from σ = 1: x̂_0, re-noised with fresh
per-sample noise to the next σ.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from methods import diffusion as D
from methods.base import TrainInfo
from methods.registry import register
from methods.sampling import Denoiser, lcm_scheduler_config, per_sample_generators, solver_sample
from methods.student import DistillConfig, DistilledMethod
from methods.training import EMA, run_updates


@dataclasses.dataclass
class LCMConfig(DistillConfig):
    lr: float = 2e-4  # the `lr` study's choice (results/reference/study-lr: lowest mean validation FID, 2 seeds)
    w_min: float = 1.5  # guidance scales sampled in training, fed to the student as an embedding
    w_max: float = 4.5
    num_ddim_timesteps: int = 50  # the skipping-step solver grid: skip = 1000 / 50 = 20
    ema_decay: float = 0.95  # θ⁻
    loss: str = "huber"  # "l2" or "huber" (pseudo-Huber)
    huber_c: float = 0.001
    max_steps: int = 8

    def __post_init__(self):
        super().__post_init__()
        if self.loss not in ("l2", "huber"):
            raise ValueError(f"loss must be 'l2' or 'huber', got {self.loss!r}")
        if not 0 < self.w_min <= self.w_max:
            raise ValueError(f"need 0 < w_min <= w_max, got {self.w_min}, {self.w_max}")


def consistency(x_t, x0, t) -> torch.Tensor:
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x̂_0 (the LCM boundary-conditioned output)."""
    c_skip, c_out = D.lcm_boundary(t)
    return D._bcast(c_skip.to(x_t.dtype), x_t) * x_t + D._bcast(c_out.to(x_t.dtype), x_t) * x0


def consistency_loss(pred, target, kind: str = "huber", c: float = 0.001) -> torch.Tensor:
    """L2 or pseudo-Huber distance sqrt(‖·‖² + c²) − c between f_θ and sg(f_θ⁻)."""
    if kind == "l2":
        return F.mse_loss(pred.float(), target.float())
    return torch.mean(torch.sqrt((pred.float() - target.float()) ** 2 + c**2) - c)


@register("lcm")
class LCM(DistilledMethod):
    """Latent consistency distillation (skipping-step DDIM solver, w-embedding, EMA target)."""

    Config = LCMConfig
    # training draws w ~ U[w_min, w_max]; guidance_scale is only the w the sampler asks for
    INFERENCE_FIELDS = frozenset({"guidance_scale"})
    w_dim = 64

    @classmethod
    def smoke_settings(cls) -> dict:
        return {"student_updates": 2, "batch_size": 2}

    def student_steps(self, steps: int) -> int:
        return 0  # one student for every step count

    def training_timesteps(self, grid: int) -> set:
        return set(self.backbone.schedule.solver_grid(self.config.num_ddim_timesteps).tolist())

    def sampling_timesteps(self, steps: int) -> list:
        schedule = self.backbone.schedule
        if schedule.kind == "vp":  # diffusers' LCMScheduler picks them from its origin grid
            scheduler = self._scheduler()
            scheduler.set_timesteps(steps)
            return [int(t) for t in scheduler.timesteps]
        # rectified flow: the same rule on the flow solver grid (every `skip`-th point, from pure noise)
        grid = schedule.solver_grid(self.config.num_ddim_timesteps).flip(0)
        return [float(t) for t in grid[:: len(grid) // steps][:steps]]

    def _scheduler(self):
        import diffusers

        if self.backbone.schedule.kind == "flow":  # the grid comes already shifted (FlowSchedule.solver_grid)
            return diffusers.FlowMatchLCMScheduler(num_train_timesteps=self.backbone.schedule.T, shift=1.0)
        return diffusers.LCMScheduler.from_config(lcm_scheduler_config(self.backbone.scheduler_config),
                                                  original_inference_steps=self.config.num_ddim_timesteps)

    def train_student(self, net, grid: int, ckpt) -> TrainInfo:
        cfg, bb = self.config, self.backbone
        student = Denoiser(self.counting(net, "student"), bb.schedule, bb.prediction_type, self.w_dim)
        target_ema = EMA(net, cfg.ema_decay)
        target = Denoiser(self.counting(target_ema.module, "ema_target"), bb.schedule, bb.prediction_type,
                          self.w_dim)
        teacher = self.teacher()
        opt = self.optimizer(net.parameters())
        solver_grid = bb.schedule.solver_grid(cfg.num_ddim_timesteps)
        # each grid point's predecessor (the first one's is t = 0, where f = x)
        previous = torch.cat([torch.zeros(1, dtype=solver_grid.dtype), solver_grid[:-1]])

        def update(step: int) -> dict:
            g, real, cond, uncond = self.conditioned_batch(step)
            n = len(cond)
            x0 = bb.from_images(real)
            # 1. a grid time t_{n+k} and its neighbour t_n on the grid below it; x at t_{n+k} from real data
            idx = torch.randint(0, cfg.num_ddim_timesteps, (n,), generator=g)
            t_start, t_prev = solver_grid[idx], previous[idx]
            eps = torch.randn(x0.shape, generator=g).to(x0)
            x_start = bb.schedule.add_noise(x0, eps, t_start).float()
            w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(n, generator=g)
            # 2. online consistency output
            pred_x0, _ = student.predict(x_start, t_start, cond, w)
            f_online = consistency(x_start, pred_x0, t_start)
            with torch.no_grad():
                # 3. one guided teacher DDIM step t_{n+k} -> t_n (per-sample w)
                out = teacher.raw_guided(x_start, t_start, cond, uncond, w.to(x_start))
                x0_t, eps_t = teacher.split(x_start, t_start, out)
                x_prev = D.ddim_step(x0_t, eps_t, bb.schedule.alpha(t_prev).float(), bb.schedule.sigma(t_prev).float())
                # 4. EMA target at t_n (t_n = 0 gives the boundary condition f = x)
                tgt_x0, _ = target.predict(x_prev, t_prev, cond, w)
                f_target = consistency(x_prev, tgt_x0, t_prev)
            loss = consistency_loss(f_online, f_target, cfg.loss, cfg.huber_c)
            self.step(opt, loss, net)
            target_ema.update(net)
            return {"consistency": loss.item()}

        log = run_updates(update, self.updates(), ckpt, {"student": net, "target": target_ema.module}, {"student": opt},
                          desc="lcm", progress=self.ctx.progress, compute=self.compute)
        return self.trained(log)

    @torch.no_grad()
    def sample(self, texts, noise_keys, steps):
        bb = self.backbone
        student, cond, x_T = self.sampling_inputs(texts, noise_keys, steps)
        w = self.config.guidance_scale  # the guidance the student emulates at inference
        timesteps = None if bb.schedule.kind == "vp" else self.sampling_timesteps(steps)
        x0 = solver_sample(lambda x, t: student.raw(x, t, cond, w), self._scheduler(), bb.schedule, x_T, steps,
                           bb.prediction_type, generators=per_sample_generators(noise_keys, 1), timesteps=timesteps)
        return bb.to_images(x0)
