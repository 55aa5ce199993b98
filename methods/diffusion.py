"""All diffusion math of the project, in one place, for both families of models.

The forward process is x_t = alpha_t · x0 + sigma_t · eps for both:
  variance preserving (VP, ``Schedule``): alpha = sqrt(ᾱ_t), sigma = sqrt(1 − ᾱ_t), ᾱ = diffusers'
      ``alphas_cumprod``; t a discrete timestep in [0, T), T = 1000; non-zero terminal SNR (SD)
  rectified flow (``FlowSchedule``): alpha = 1 − σ, sigma = σ with σ = t / T; t a continuous timestep in
      (0, T], the network's own timestep input (σ·1000, as SD3/FLUX); zero terminal SNR (σ = 1 at t = T);
      a timestep shift (static ``shift``, or FLUX's resolution-dependent ``mu``) spaces the sampling grid
Symbols (one meaning each, everywhere): alpha, sigma as above; ``eps``, ``v``, ``x0`` and ``flow``
(u = ε − x0, what SD3/FLUX predict) are the network parameterisations; every method is written once in
(x̂_0, ε̂) terms and the conversions happen here. Every adapter imports these functions; nobody re-derives them.
"""

from __future__ import annotations

import dataclasses

import torch

T_TRAIN = 1000


def _bcast(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample coefficient [B] (or scalar) against a batch [B, ...]."""
    a = torch.as_tensor(a, dtype=like.dtype, device=like.device)
    return a.reshape(-1, *([1] * (like.ndim - 1))) if a.ndim else a


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A discrete DDPM (variance-preserving) noise schedule: ᾱ_t for t = 0..T-1, stored in float64."""

    alpha_bar: torch.Tensor
    kind = "vp"

    @classmethod
    def scaled_linear(cls, beta_start: float = 0.00085, beta_end: float = 0.012, T: int = T_TRAIN) -> Schedule:
        """The SD/Emu schedule: betas linear in sqrt-space; non-zero terminal SNR (ᾱ_999 ≈ 0.0047)."""
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @classmethod
    def from_diffusers(cls, scheduler) -> Schedule:
        return cls(torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64).clone())

    @property
    def T(self) -> int:
        return self.alpha_bar.shape[0]

    def _at(self, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.long)
        return self.alpha_bar[t.cpu()]

    def alpha(self, t) -> torch.Tensor:
        return self._at(t).sqrt()

    def sigma(self, t) -> torch.Tensor:
        return (1.0 - self._at(t)).sqrt()

    def snr(self, t) -> torch.Tensor:
        ab = self._at(t)
        return ab / (1.0 - ab)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """Forward process x_t = α_t x0 + σ_t ε."""
        return _bcast(self.alpha(t), x0) * x0 + _bcast(self.sigma(t), x0) * eps

    def alpha_sq(self, t) -> torch.Tensor:
        """α_t² (= ᾱ_t), float64."""
        return self._at(t)

    # --- the timesteps methods train and sample at ---------------------------------------------
    def grid(self, steps: int) -> list[int]:
        """A `steps`-step sampling grid from pure noise: diffusers' "trailing" spacing (starts at T − 1)."""
        return trailing_timesteps(steps, self.T)

    def sample_t(self, n: int, generator: torch.Generator, low: int = 0, high: int | None = None) -> torch.Tensor:
        """n training timesteps, uniform on the integers [low, high) (default [0, T)), long [n]."""
        return torch.randint(low, self.T if high is None else high, (n,), generator=generator)

    def solver_grid(self, n: int) -> torch.Tensor:
        """LCM's skipping-step solver grid of n points: [skip − 1, 2·skip − 1, ..., T − 1] (diffusers' DDIMSolver)."""
        skip = self.T // n
        return torch.arange(1, n + 1) * skip - 1

    def shift_t(self, t, rho: float):
        """γ(t) = ρ·t rounded to a timestep (the shifted reconstruction loss's teacher time)."""
        return gamma_shift(t, rho)


@dataclasses.dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow: x_t = (1 − σ) x0 + σ ε with σ = t / T, t ∈ (0, T] continuous (the network's timestep).

    ``shift`` (or ``mu`` with exponential time shifting, as FLUX's ``calculate_shift``) warps the sampling
    grid and training times towards noise: σ' = shift·σ / (1 + (shift − 1)·σ), or e^mu / (e^mu + 1/σ − 1).
    """

    shift: float = 1.0
    mu: float | None = None
    T: int = T_TRAIN
    # the pipeline's solver grid: σ = linspace(1, 1/steps, steps) then shifted (FluxPipeline), instead of the
    # scheduler's own spacing from set_timesteps(steps) (StableDiffusion3Pipeline)
    linear_sigmas: bool = False
    kind = "flow"

    def _sigma(self, t) -> torch.Tensor:
        return torch.as_tensor(t, dtype=torch.float64).cpu() / self.T

    def alpha(self, t) -> torch.Tensor:
        return 1.0 - self._sigma(t)

    def sigma(self, t) -> torch.Tensor:
        return self._sigma(t)

    def alpha_sq(self, t) -> torch.Tensor:
        return self.alpha(t) ** 2

    def snr(self, t) -> torch.Tensor:
        s = self._sigma(t)
        return (1.0 - s) ** 2 / s**2

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """Forward process x_t = (1 − σ) x0 + σ ε."""
        return _bcast(self.alpha(t), x0) * x0 + _bcast(self.sigma(t), x0) * eps

    def warp(self, s: torch.Tensor) -> torch.Tensor:
        """The timestep shift applied to σ ∈ [0, 1] (identity with shift 1 and no mu)."""
        s = torch.as_tensor(s, dtype=torch.float64)
        if self.mu is not None:
            m = torch.exp(torch.tensor(self.mu, dtype=torch.float64))
            return torch.where(s > 0, m / (m + 1 / s.clamp(min=1e-12) - 1), s)
        return self.shift * s / (1 + (self.shift - 1) * s)

    def unshifted_sigmas(self, steps: int) -> list[float]:
        """σ_i = 1 − i/steps, i < steps: the grid before the shift (what FluxPipeline passes its scheduler)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return (1.0 - torch.arange(steps, dtype=torch.float64) / steps).tolist()

    def grid(self, steps: int) -> list[float]:
        """A `steps`-step grid from pure noise (σ = 1): σ_i = warp(1 − i/steps), as timesteps σ·T."""
        return [float(v) * self.T for v in self.warp(torch.tensor(self.unshifted_sigmas(steps)))]

    def sample_t(self, n: int, generator: torch.Generator, low: float = 0, high: float | None = None) -> torch.Tensor:
        """n training timesteps, σ uniform on (low, high]/T (default (0, 1]) then warped, float64 [n]."""
        high = self.T if high is None else high
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        s = (high - (high - low) * u) / self.T  # in (low, high] / T
        return self.warp(s) * self.T

    def solver_grid(self, n: int) -> torch.Tensor:
        """A consistency solver grid of n points, uniform in σ then shifted: warp([1/n, 2/n, ..., 1])·T, float64 [n]."""
        return self.warp(torch.arange(1, n + 1, dtype=torch.float64) / n) * self.T

    def shift_t(self, t, rho: float):
        """γ(t) = ρ·t (continuous time)."""
        if not 0.0 < rho <= 1.0:
            raise ValueError(f"rho must be in (0, 1], got {rho}")
        return torch.as_tensor(t, dtype=torch.float64) * rho


def flow_shift_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                  max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift mu: linear in the number of latent tokens (diffusers' calculate_shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


# --- conversions between parameterisations ---------------------------------------------------


def x0_from_eps(x_t, eps, alpha, sigma):
    """x̂_0(x_t, ε̂) = (x_t − σ_t ε̂) / α_t."""
    return (x_t - _bcast(sigma, x_t) * eps) / _bcast(alpha, x_t)


def eps_from_x0(x_t, x0, alpha, sigma):
    """ε̂ = (x_t − α_t x̂_0) / σ_t."""
    return (x_t - _bcast(alpha, x_t) * x0) / _bcast(sigma, x_t)


def x0_from_flow(x_t, u, sigma):
    """x̂_0 = x_t − σ u for rectified flow (u = ε − x0)."""
    return x_t - _bcast(sigma, x_t) * u


def eps_from_flow(x_t, u, alpha):
    """ε̂ = x_t + (1 − σ) u for rectified flow (alpha = 1 − σ)."""
    return x_t + _bcast(alpha, x_t) * u


def x0_from_v(x_t, v, alpha, sigma):
    """x̂_0 = α_t x_t − σ_t v (v = α ε − σ x0)."""
    return _bcast(alpha, x_t) * x_t - _bcast(sigma, x_t) * v


def eps_from_v(x_t, v, alpha, sigma):
    return _bcast(sigma, x_t) * x_t + _bcast(alpha, x_t) * v


def v_from_x0_eps(x0, eps, alpha, sigma):
    return _bcast(alpha, x0) * eps - _bcast(sigma, x0) * x0


def prediction_target(prediction_type: str, x0, eps, alpha, sigma):
    """What a network of ``prediction_type`` is trained to output at x_t = α x0 + σ ε: ε ("epsilon"),
    v = α ε − σ x0 ("v_prediction"), x0 ("sample") or the flow velocity u = ε − x0 ("flow", SD3 Eq. 1-3).
    x0, eps [B, ...]; alpha, sigma [B] or scalars (unused by "epsilon", "sample" and "flow")."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return v_from_x0_eps(x0, eps, alpha, sigma)
    if prediction_type == "sample":
        return x0
    if prediction_type == "flow":
        return eps - x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def cfg(eps_uncond, eps_cond, w: float | torch.Tensor):
    """Classifier-free guidance ε̂^w = ε̂_∅ + w (ε̂_c − ε̂_∅)."""
    w = _bcast(w, eps_cond) if torch.is_tensor(w) else w
    return eps_uncond + w * (eps_cond - eps_uncond)


# --- steps ------------------------------------------------------------------------------------


def ddim_step(x0, eps, alpha_next, sigma_next):
    """Deterministic DDIM step f(x_t) = α_{t'} x̂_0 + σ_{t'} ε̂ (η = 0)."""
    return _bcast(alpha_next, x0) * x0 + _bcast(sigma_next, x0) * eps


def noise_corrected_step(x0, x_T, alpha_next, sigma_next):
    """Noise correction at the first step (Imagine Flash): f(x_T) = α_{T'} x̂_0 + σ_{T'} x_T.

    Equal to ``ddim_step`` wherever ε̂ = x_T, as at σ = 1 of a rectified flow (zero terminal SNR)."""
    return _bcast(alpha_next, x0) * x0 + _bcast(sigma_next, x0) * x_T


def renoise(x0, eps, alpha_next, sigma_next):
    """Re-noise a clean estimate with fresh noise: α_{t'} x̂_0 + σ_{t'} ε'."""
    return _bcast(alpha_next, x0) * x0 + _bcast(sigma_next, x0) * eps


# --- grids ------------------------------------------------------------------------------------


def trailing_timesteps(steps: int, T: int = T_TRAIN) -> list[int]:
    """diffusers' "trailing" spacing: starts at T-1 (the only grid that visits pure noise)."""
    if steps < 1 or steps > T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    ratio = T / steps
    return [int(round(T - i * ratio)) - 1 for i in range(steps)]


def gamma_shift(t, rho: float):
    """Teacher time of the shifted reconstruction loss, γ(t) = ρ·t (a bench setting; not in the paper)."""
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    t = torch.as_tensor(t)
    return torch.clamp(torch.round(t.double() * rho).long(), min=0)


# --- distillation targets ---------------------------------------------------------------------


def progressive_target(z_t, z_tpp, alpha_t, sigma_t, alpha_tpp, sigma_tpp):
    """Progressive distillation x̃: one DDIM step from z_t predicting x̃ lands on z'' (Salimans & Ho, Eq. 8).

    x̃ = (z'' − (σ''/σ_t) z_t) / (α'' − (σ''/σ_t) α_t)
    """
    ratio = _bcast(sigma_tpp, z_t) / _bcast(sigma_t, z_t)
    return (z_tpp - ratio * z_t) / (_bcast(alpha_tpp, z_t) - ratio * _bcast(alpha_t, z_t))


def snr_truncated_weight(snr):
    """max(SNR, 1): the "truncated SNR" weighting of the x-space loss (Salimans & Ho)."""
    return torch.clamp(torch.as_tensor(snr), min=1.0)


def eps_loss_weight(snr: torch.Tensor, kind: str, gamma: float) -> torch.Tensor:
    """Per-sample weight of the ε-prediction loss ‖ε̂ − ε‖² (= SNR·‖x̂_0 − x_0‖²): min-SNR-γ (Hang et al.) or x̂_0-truncated."""
    if kind == "min-snr":
        return torch.clamp(snr, max=gamma) / snr
    if kind == "x0-truncated":
        return torch.clamp(snr, min=1.0, max=gamma) / snr
    raise ValueError(f"loss_weighting must be 'min-snr' or 'x0-truncated', got {kind!r}")


def lcm_boundary(t, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """LCM consistency-function coefficients (c_skip, c_out) at timestep t.

    c_skip = σ_d² / ((s t)² + σ_d²), c_out = s t / sqrt((s t)² + σ_d²); c_skip(0) = 1, c_out(0) = 0.
    """
    st = torch.as_tensor(t, dtype=torch.float64) * timestep_scaling
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2) ** 0.5
    return c_skip, c_out
