"""DMD2 (Yin et al. 2024): distribution matching distillation with two time-scale updates, a GAN
term and backward simulation for the multi-step generator. (Beyond the Imagine Flash paper.)

Generator G (a teacher copy) produces x̂_0. The distribution-matching gradient at a noised
x_t' = α x̂_0 + σ ε is the difference between the fake score (a second UNet trained online with a
denoising loss on G's outputs) and the real score (the guided teacher), normalised per sample:
  loss_DM = ½ mean‖x̂_0 − sg(x̂_0 − (x̂_0^fake − x̂_0^real) / mean|x̂_0 − x̂_0^real|)‖²
(mean over elements, as tianweiy/DMD2's ``compute_distribution_matching_loss``).
The fake score takes ``fake_updates`` steps per generator step (the two time-scale update rule;
DMD2 uses 5). Backward simulation: the generator's inputs at grid time t come from running its own
few-step sampler from noise (as in Imagine Flash's backward distillation), never from noised real
images; a shared generator draws its step count k ∈ 1..max_steps per update and each sample its
own grid index, so every sampling grid is one it trained on. The GAN term reuses the
frozen-teacher-feature discriminator on the returned samples (DMD2 puts its classifier on the
fake-score network; a documented deviation that keeps one discriminator design in the bench); like
DMD2's classifier, it is updated with the fake score, ``fake_updates`` times per generator update.

On a rectified-flow teacher nothing in the loss changes: both scores enter as x̂_0, which the flow's
velocity gives as x_t − σ û, and the fake-score network trains with the teacher's own objective (its
raw output regressed onto ``prediction_target``: the velocity ε − x0 on a flow). The noise times t'
are σ·1000 with σ uniform, then shifted, and the few-step generator re-noises to the next σ as on a
VP schedule (DMD2 itself distils SDXL; its flow use, e.g. for SD3/FLUX distillations, keeps this form).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from methods import diffusion as D
from methods.base import TrainInfo
from methods.registry import register
from methods.sampling import Denoiser, per_sample_noise, renoise_trajectory
from methods.student import GRID_DRAWS, AdversarialConfig, DistilledMethod, draw_grid
from methods.training import optimizer_step, run_updates


@dataclasses.dataclass
class DMD2Config(AdversarialConfig):
    lr: float = 5e-5  # the `lr` study's choice (results/reference/study-lr: lowest mean validation FID, 2 seeds)
    lr_fake: float = 1e-4
    fake_updates: int = 5  # fake-score updates per generator update (DMD2's two time-scale ratio)
    lambda_gan: float = 0.05
    adv_times: str = "last"  # the GAN term on the returned samples (x̂_0 at the last grid time) or at every time
    t_min: int = 20  # the distribution-matching noise range
    t_max: int = 980
    max_steps: int = 4
    backward_simulation: bool = True
    shared_student: bool = True  # one generator for 1..max_steps steps (trained on all their grids)
    # the shared generator's grid draw (methods.student.grid_weights): "steps", the step count uniform then the grid
    # index uniform, as tianweiy/DMD2 (t = T gets 52% of the samples at max_steps 4); "pairs", every (steps, grid
    # index) pair equally likely
    grid_draw: str = "steps"

    def __post_init__(self):
        super().__post_init__()
        if self.fake_updates < 1:
            raise ValueError(f"fake_updates must be >= 1, got {self.fake_updates}")
        if self.adv_times not in ("last", "all"):
            raise ValueError(f"adv_times must be 'last' or 'all', got {self.adv_times!r}")
        if self.grid_draw not in GRID_DRAWS:
            raise ValueError(f"grid_draw must be one of {GRID_DRAWS}, got {self.grid_draw!r}")


def dm_loss(x0, x0_real, x0_fake) -> torch.Tensor:
    """The DMD loss, mean-reduced: its gradient w.r.t. x̂_0 is (x̂_0^fake − x̂_0^real) / mean|x̂_0 − x̂_0^real|
    (normalised per sample) divided by the number of elements."""
    norm = (x0 - x0_real).abs().flatten(1).mean(1).clamp(min=1e-5)
    grad = (x0_fake - x0_real) / D._bcast(norm, x0)
    return 0.5 * F.mse_loss(x0, (x0 - grad).detach())


def fake_score_loss(score: Denoiser, x0, eps, t, cond) -> torch.Tensor:
    """The fake score's denoising loss on generator samples x0 [B, C, H, W] noised to t [B] with eps: MSE of the
    network's raw output to its own parameterisation's target (ε on an ε teacher, u = ε − x0 on a flow), as the
    teacher was trained (DMD2: the fake score is trained like the diffusion model it starts from)."""
    schedule = score.schedule
    alpha, sigma = (c.to(x0.device, x0.dtype) for c in (schedule.alpha(t), schedule.sigma(t)))
    x_t = schedule.add_noise(x0, eps, t).float()
    target = D.prediction_target(score.prediction_type, x0, eps, alpha, sigma)
    return F.mse_loss(score.raw(x_t, t, cond), target)


@register("dmd2")
class DMD2(DistilledMethod):
    """Distribution matching distillation v2 (fake score, two time-scale updates, GAN, backward simulation)."""

    Config = DMD2Config

    @classmethod
    def smoke_settings(cls) -> dict:
        return {"student_updates": 2, "batch_size": 2, "fake_updates": 1}

    def student_steps(self, steps: int) -> int:
        return self.config.max_steps if self.config.shared_student else steps

    def training_timesteps(self, grid: int) -> set[int]:
        counts = range(1, grid + 1) if self.config.shared_student else [grid]
        return {t for k in counts for t in self.backbone.schedule.grid(k)}

    def sampling_timesteps(self, steps: int) -> list:
        return self.backbone.schedule.grid(steps)

    def train_student(self, net, grid: int, ckpt) -> TrainInfo:
        cfg, bb = self.config, self.backbone
        gen = Denoiser(self.counting(net, "student"), bb.schedule, bb.prediction_type)
        fake_net = bb.new_net()
        fake = Denoiser(self.counting(fake_net, "fake_score"), bb.schedule, bb.prediction_type)
        teacher = self.teacher()
        opt = self.optimizer(net.parameters())
        opt_fake = torch.optim.AdamW(fake_net.parameters(), lr=cfg.lr_fake, weight_decay=0.0)
        adv = self.adversarial()

        def generate(g, cond, real, n, with_grad: bool):
            """(x̂_0 of the generator, which samples are at their grid's last time), each sample at its own
            grid time; inputs by backward simulation (or noised real data)."""
            if cfg.shared_student:
                k, i = draw_grid(grid, n, g, cfg.grid_draw)
            else:
                k, i = grid, torch.randint(0, grid, (n,), generator=g)
            timesteps = bb.schedule.grid(k)
            t = torch.tensor(timesteps)[i]
            if cfg.backward_simulation:
                x_T = torch.randn((n, *bb.sample_shape), generator=g).to(bb.device)
                fresh = lambda j: torch.randn((n, *bb.sample_shape), generator=g)  # noqa: E731
                with torch.no_grad():
                    x_t = renoise_trajectory(lambda x, s: gen.predict(x, s, cond), bb.schedule, x_T, timesteps,
                                             fresh, stop_at=i)
            else:
                eps = torch.randn(real.shape, generator=g).to(bb.device)
                x_t = bb.schedule.add_noise(bb.from_images(real), eps, t).float()
            with torch.set_grad_enabled(with_grad):
                x0, _ = gen.predict(x_t, t, cond)
            return x0, (i == k - 1) if cfg.adv_times == "last" else torch.ones(n, dtype=torch.bool)

        def update(step: int) -> dict:
            g, real, cond, uncond = self.conditioned_batch(step)
            n = len(cond)
            # 1. the guidance updates (the faster time scale), each on fresh generator samples: the fake score's
            # denoising loss, and the discriminator on real renders vs the returned samples (tianweiy/DMD2 trains
            # its classifier in the guidance update, so it too takes fake_updates steps per generator step)
            l_fake, d = 0.0, {}
            real_x0 = bb.from_images(real)
            for _ in range(cfg.fake_updates):
                x0_fake_data, last_f = generate(g, cond, real, n, with_grad=False)
                t = bb.schedule.sample_t(n, g)
                eps = torch.randn(x0_fake_data.shape, generator=g).to(x0_fake_data)
                loss_f = fake_score_loss(fake, x0_fake_data, eps, t, cond)
                optimizer_step(opt_fake, loss_f, fake_net.parameters(), cfg.grad_clip)
                l_fake += loss_f.item() / cfg.fake_updates
                d = adv.step(real_x0[last_f], cond.index(last_f), x0_fake_data[last_f], g, at=step)
            # 2. generator: distribution matching at a random t' + GAN term on the returned samples
            x0, last = generate(g, cond, real, n, with_grad=True)
            t = bb.schedule.sample_t(n, g, cfg.t_min, cfg.t_max + 1)
            eps = torch.randn(x0.shape, generator=g).to(x0)
            x_t = bb.schedule.add_noise(x0.detach(), eps, t).float()
            with torch.no_grad():
                x0_real, _ = teacher.predict_guided(x_t, t, cond, uncond, cfg.guidance_scale)
                x0_fake, _ = fake.predict(x_t, t, cond)
            l_dm = dm_loss(x0, x0_real, x0_fake)
            l_gan = adv.generator_loss(x0[last], cond.index(last), g, step)
            stats = adv.generator_step(opt, net, l_dm, None if l_gan is None else cfg.lambda_gan * l_gan,
                                       cfg.grad_clip)
            losses = {"dm": l_dm.item(), "fake": l_fake, **stats, **d}
            if l_gan is not None:
                losses["g_gan"] = l_gan.item()
            return losses

        log = run_updates(update, self.updates(), ckpt, {"student": net, "fake": fake_net, "disc": adv.disc.heads},
                          {"student": opt, "fake": opt_fake, "disc": adv.opt}, desc=f"dmd2 {grid}-step",
                          progress=self.ctx.progress, compute=self.compute)
        return self.trained(log, adversarial=adv)

    @torch.no_grad()
    def sample(self, texts, noise_keys, steps):
        bb = self.backbone
        gen, cond, x_T = self.sampling_inputs(texts, noise_keys, steps)
        fresh = lambda k: per_sample_noise(noise_keys, bb.sample_shape, stream=k, device=bb.device)  # noqa: E731
        x0 = renoise_trajectory(lambda x, t: gen.predict(x, t, cond), bb.schedule, x_T,
                                self.sampling_timesteps(steps), fresh)
        return bb.to_images(x0)
