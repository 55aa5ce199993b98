"""Sampling loops shared by the adapters, and per-sample noise.

Noise is a function of (prompt id, seed, stream) only, as in EDM: each sample has its own
generator, so batch size and process count never change an image. ``stream`` 0 is the starting
noise x_T; the bench's own re-noising samplers draw stream k at their k-th re-noising; diffusers'
stochastic schedulers draw every step's noise from one generator per sample (stream 1), exactly as
a diffusers pipeline called with that list of generators does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from methods import diffusion as D
from methods.backbone import Cond, guidance_embedding

SOLVERS = ("ddim", "dpmsolver++", "euler", "unipc")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")  # ε, v, x̂_0 (diffusers' names); flow: u = ε − x0
# solvers whose state is x_t in the VP parameterisation, where noise correction is defined
NOISE_CORRECTABLE = ("ddim", "dpmsolver++")
# guidance form -> network evaluations per sample per step: classifier-free guidance in one batched call on
# [uncond; cond] (cfg) or two sequential calls (true-cfg, FLUX/Qwen's true_cfg_scale); the scale fed to the
# network's guidance embedding (embedded, FLUX.1-dev); no guidance (none)
GUIDANCE_NFE = {"cfg": 2, "true-cfg": 2, "embedded": 1, "none": 1}


def noise_seed(prompt_id: str, seed: int, stream: int = 0) -> int:
    h = hashlib.sha256(f"{prompt_id}\x1f{seed}\x1f{stream}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def per_sample_noise(keys: list[tuple[str, int]], shape: tuple[int, ...], stream: int = 0,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """Standard normal noise [N, *shape]; row i depends on keys[i] and stream only."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed(pid, s, stream)))
            for pid, s in keys]
    return torch.stack(rows).to(device)


def per_sample_generators(keys: list[tuple[str, int]], stream: int) -> list[torch.Generator]:
    """One generator per sample, for diffusers schedulers that take a list (randn_tensor)."""
    return [torch.Generator().manual_seed(noise_seed(pid, s, stream)) for pid, s in keys]


class Denoiser:
    """A UNet behind (x_t, t, cond[, w]) -> model output / (x̂_0, ε̂), with classifier-free guidance.

    ``net`` should be NFE-counted; a guided prediction is one batched call on [uncond; cond].
    """

    def __init__(self, net, schedule: D.Schedule, prediction_type: str = "epsilon", w_dim: int | None = None):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if prediction_type == "v_prediction" and getattr(schedule, "kind", "vp") == "flow":
            raise ValueError("v_prediction's conversions assume α² + σ² = 1 (VP); a rectified flow predicts 'flow'")
        self.net, self.schedule, self.prediction_type, self.w_dim = net, schedule, prediction_type, w_dim

    def _t(self, t, n: int, device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device)
        return t.expand(n) if t.ndim == 0 else t

    @property
    def dtype(self) -> torch.dtype:
        """The network's weight dtype: its inputs are cast to it, its output returned as float32."""
        p = next(self.net.parameters(), None) if hasattr(self.net, "parameters") else None
        return p.dtype if p is not None and p.is_floating_point() else torch.float32

    def raw(self, x, t, cond: Cond, w=None, guidance=None) -> torch.Tensor:
        """The network's output for x_t [B, C, H, W] at timesteps t (float32, whatever dtype the network runs in).

        ``w``: the LCM-style guidance embedding's w (needs ``w_dim``); ``guidance``: a scale (float or float32 [B])
        passed to the network as ``guidance=`` float32 [B], for networks with a guidance embedding (FLUX.1-dev).
        """
        dt = self.dtype
        kwargs = {}
        if guidance is not None:
            kwargs["guidance"] = torch.as_tensor(guidance, dtype=torch.float32, device=x.device).expand(x.shape[0])
        if self.w_dim:
            w = torch.full((x.shape[0],), float(w)) if not torch.is_tensor(w) else w.float().expand(x.shape[0])
            kwargs["timestep_cond"] = guidance_embedding(w, self.w_dim).to(x.device, dt)
        if cond.added is not None:
            kwargs["added_cond_kwargs"] = {k: v.to(dt) if torch.is_floating_point(v) else v for k, v in cond.added.items()}
        out = self.net(x.to(dt), self._t(t, x.shape[0], x.device), encoder_hidden_states=cond.states.to(dt), **kwargs)
        return out.sample.float()

    def raw_guided(self, x, t, cond: Cond, uncond: Cond, w: float, w_embed=None) -> torch.Tensor:
        """CFG on the raw output (linear, so equal to guiding ε̂): one call on [x; x]."""
        n = x.shape[0]
        out = self.raw(torch.cat([x, x]), torch.cat([self._t(t, n, x.device)] * 2), uncond.cat(cond),
                       None if w_embed is None else torch.cat([w_embed, w_embed]))
        return D.cfg(out[:n], out[n:], w)

    def raw_true_cfg(self, x, t, cond: Cond, uncond: Cond, w: float) -> torch.Tensor:
        """CFG from two sequential calls, cond then uncond, as FluxPipeline's ``true_cfg_scale`` (2 NFE)."""
        out_c = self.raw(x, t, cond)
        return D.cfg(self.raw(x, t, uncond), out_c, w)

    def guided(self, form: str, cond: Cond, uncond: Cond | None, w: float) -> Callable:
        """model_output(x, t) for a guidance form of GUIDANCE_NFE at scale w (``uncond`` only for the CFG forms)."""
        if form == "cfg":
            return lambda x, t: self.raw_guided(x, t, cond, uncond, w)
        if form == "true-cfg":
            return lambda x, t: self.raw_true_cfg(x, t, cond, uncond, w)
        if form == "embedded":
            return lambda x, t: self.raw(x, t, cond, guidance=w)
        if form == "none":
            return lambda x, t: self.raw(x, t, cond)
        raise ValueError(f"guidance must be one of {tuple(GUIDANCE_NFE)}, got {form!r}")

    def split(self, x_t, t, out) -> tuple[torch.Tensor, torch.Tensor]:
        """Model output -> (x̂_0, ε̂) through the schedule (VP or rectified flow)."""
        t = self._t(t, x_t.shape[0], "cpu")
        alpha = self.schedule.alpha(t).to(x_t.device, x_t.dtype)
        sigma = self.schedule.sigma(t).to(x_t.device, x_t.dtype)
        if self.prediction_type == "epsilon":
            return D.x0_from_eps(x_t, out, alpha, sigma), out
        if self.prediction_type == "sample":
            return out, D.eps_from_x0(x_t, out, alpha, sigma)
        if self.prediction_type == "flow":
            return D.x0_from_flow(x_t, out, sigma), D.eps_from_flow(x_t, out, alpha)
        return D.x0_from_v(x_t, out, alpha, sigma), D.eps_from_v(x_t, out, alpha, sigma)

    def predict(self, x_t, t, cond: Cond, w=None):
        return self.split(x_t, t, self.raw(x_t, t, cond, w))

    def predict_guided(self, x_t, t, cond: Cond, uncond: Cond, w: float):
        return self.split(x_t, t, self.raw_guided(x_t, t, cond, uncond, w))


Predict = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def _coef(schedule: D.Schedule, t: int | None, like: torch.Tensor):
    """(α, σ) at grid time t; t=None is the end of sampling (clean image: α=1, σ=0)."""
    if t is None:
        return torch.tensor(1.0, dtype=like.dtype), torch.tensor(0.0, dtype=like.dtype)
    return schedule.alpha(t).to(like.dtype), schedule.sigma(t).to(like.dtype)


class _Stops:
    """Where a trajectory stops: nowhere (run to the end), at one grid index, or at one index per sample."""

    def __init__(self, stop_at, x_T: torch.Tensor, n_steps: int):
        self.per_sample = torch.is_tensor(stop_at) and stop_at.ndim == 1
        if self.per_sample:
            self.stop = stop_at.to(x_T.device)
            self.end = int(self.stop.max()) if len(self.stop) else 0
            self.out = x_T.clone()  # a sample that stops at index 0 keeps x_T
        else:
            self.end = n_steps if stop_at is None else int(stop_at)

    def keep(self, i: int, x: torch.Tensor) -> None:
        """x is the state at grid index i + 1: keep it for the samples that stop there."""
        if self.per_sample:
            sel = self.stop == i + 1
            self.out[sel] = x[sel]

    def result(self, x: torch.Tensor) -> torch.Tensor:
        return self.out if self.per_sample else x


def ddim_trajectory(predict: Predict, schedule: D.Schedule, x_T: torch.Tensor, timesteps: list,
                    noise_correction: bool = False, stop_at=None) -> torch.Tensor:
    """Deterministic DDIM down `timesteps`; returns x̂_0 after the last step, or the state x at
    timesteps[stop_at] (``stop_at``: an int, or a long tensor [B] with one grid index per sample).

    `timesteps` holds ints, or long tensors [B] (a grid per sample). With noise_correction the first
    step (from x_T) uses the true noise x_T as the direction term (Imagine Flash).
    """
    x = x_T
    stops = _Stops(stop_at, x_T, len(timesteps))
    for i in range(stops.end):
        t = timesteps[i]
        x0, eps = predict(x, t)
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else None
        a, s = _coef(schedule, t_next, x)
        if noise_correction and i == 0:
            x = D.noise_corrected_step(x0, x_T, a, s)
        else:
            x = D.ddim_step(x0, eps, a, s)
        stops.keep(i, x)
    return stops.result(x)


def renoise_trajectory(predict: Predict, schedule: D.Schedule, x_T: torch.Tensor, timesteps: list,
                       fresh_noise: Callable[[int], torch.Tensor], stop_at=None) -> torch.Tensor:
    """Few-step sampling of ADD/DMD2 students: predict x̂_0, re-noise it with fresh noise to the next time.

    Returns x̂_0 after the last step, or the state at timesteps[stop_at] (an int, or one index per sample).
    """
    x = x_T
    stops = _Stops(stop_at, x_T, len(timesteps))
    for i in range(stops.end):
        x0, _ = predict(x, timesteps[i])
        if i + 1 == len(timesteps):
            return x0
        a, s = _coef(schedule, timesteps[i + 1], x)
        x = D.renoise(x0, fresh_noise(i + 1).to(x), a, s)
        stops.keep(i, x)
    return stops.result(x)


def lcm_scheduler_config(scheduler_config: dict) -> dict:
    """The teacher's schedule, keeping only what LCMScheduler understands."""
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "steps_offset",
            "timestep_spacing", "rescale_betas_zero_snr", "set_alpha_to_one", "clip_sample")
    return {k: v for k, v in scheduler_config.items() if k in keep}


def make_scheduler(solver: str, scheduler_config: dict):
    """A diffusers scheduler for the teacher; the final step always lands on the clean estimate.

    A rectified-flow teacher (its config has ``shift``, as FlowMatchEulerDiscreteScheduler's) gets the
    flow versions: Euler (DDIM on a flow is Euler), DPM-Solver++ and UniPC on flow sigmas with its shift.
    """
    import diffusers

    if "shift" in scheduler_config:
        flow = {k: v for k, v in scheduler_config.items() if k not in ("_class_name", "_diffusers_version")}
        shift = flow.get("shift", 1.0)
        if solver in ("ddim", "euler"):
            return diffusers.FlowMatchEulerDiscreteScheduler.from_config(flow)
        common = dict(num_train_timesteps=flow.get("num_train_timesteps", 1000), use_flow_sigmas=True,
                      prediction_type="flow_prediction", flow_shift=shift, final_sigmas_type="zero",
                      use_dynamic_shifting=bool(flow.get("use_dynamic_shifting", False)))
        if solver == "dpmsolver++":
            return diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                                         lower_order_final=True, **common)
        if solver == "unipc":
            return diffusers.UniPCMultistepScheduler(solver_order=2, lower_order_final=True, **common)
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    cfg = dict(scheduler_config, timestep_spacing="trailing")
    if solver == "ddim":  # clip_sample off, as diffusers' SD pipeline forces it: latents are not in [-1, 1]
        return diffusers.DDIMScheduler.from_config(cfg, set_alpha_to_one=True, clip_sample=False)
    if solver == "dpmsolver++":
        return diffusers.DPMSolverMultistepScheduler.from_config(
            cfg, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero", lower_order_final=True)
    if solver == "euler":
        return diffusers.EulerDiscreteScheduler.from_config(cfg, final_sigmas_type="zero")
    if solver == "unipc":
        return diffusers.UniPCMultistepScheduler.from_config(cfg, solver_order=2, final_sigmas_type="zero",
                                                             lower_order_final=True)
    raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")


def set_grid(scheduler, schedule: D.Schedule, steps: int, timesteps: list | None = None) -> None:
    """``scheduler.set_timesteps`` as the teacher's pipeline calls it: explicit `timesteps`, else `steps` steps.

    A flow schedule passes its ``mu`` to a scheduler with dynamic shifting (FLUX); with ``linear_sigmas`` a scheduler that takes
    sigmas gets FluxPipeline's σ = linspace(1, 1/steps, steps) (it shifts them itself), one on flow sigmas
    (DPM-Solver++, UniPC) its own spacing, as FluxPipeline gives them.
    """
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=timesteps)
        return
    if getattr(schedule, "kind", "vp") != "flow":
        scheduler.set_timesteps(steps)
        return
    dynamic = schedule.mu is not None and getattr(scheduler.config, "use_dynamic_shifting", False)
    mu = {"mu": schedule.mu} if dynamic else {}
    if schedule.linear_sigmas and not getattr(scheduler.config, "use_flow_sigmas", False):
        scheduler.set_timesteps(sigmas=schedule.unshifted_sigmas(steps), **mu)
    else:
        scheduler.set_timesteps(steps, **mu)


def solver_sample(model_output: Callable, scheduler, schedule: D.Schedule, x_T: torch.Tensor, steps: int,
                  prediction_type: str = "epsilon", noise_correction: bool = False,
                  generators: list[torch.Generator] | None = None,
                  timesteps: list[int] | None = None, step_kwargs: dict | None = None) -> torch.Tensor:
    """Run a diffusers scheduler for `steps` steps (or on explicit `timesteps`); model_output(x_in, t)
    returns the (guided) raw output; `step_kwargs` go to every ``scheduler.step`` (e.g. TCD's eta).

    Stochastic schedulers (LCM, Euler ancestral, TCD) draw each step's noise from ``generators``, one
    generator per sample, consumed step after step (as a diffusers pipeline given the same list).
    Noise correction (ddim, dpmsolver++ only) replaces the first step's result by α_{t'} x̂_0 + σ_{t'} x_T,
    keeping the solver's own history of x̂_0 unchanged.
    """
    set_grid(scheduler, schedule, steps, timesteps)
    # FlowMatchEulerDiscreteScheduler has neither (its inputs are x_t itself, as the flow pipelines pass them)
    x = x_T * getattr(scheduler, "init_noise_sigma", 1.0)
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)
    discrete = getattr(schedule, "kind", "vp") == "vp"
    ts = [int(t) if discrete else float(t) for t in scheduler.timesteps]
    for i, t in enumerate(ts):
        out = model_output(scale(x, scheduler.timesteps[i]), t)
        kwargs = dict(step_kwargs or {}) if generators is None else {**(step_kwargs or {}), "generator": generators}
        x_next = scheduler.step(out, scheduler.timesteps[i], x, **kwargs).prev_sample
        if noise_correction and i == 0:
            split = Denoiser(None, schedule, prediction_type).split
            x0, _ = split(x, t, out)
            a, s = _coef(schedule, ts[1] if steps > 1 else None, x)
            x_next = D.noise_corrected_step(x0, x_T, a, s)
        x = x_next
    return x
