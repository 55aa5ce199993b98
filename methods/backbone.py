"""The denoiser interface every method trains and samples through, and the NFE counter.

A backbone bundles what a text-to-image diffusion teacher is made of: text encoder(s), the denoising
network ``net`` (diffusers' ``UNet2DConditionModel``, or a flow transformer behind the same call), its
noise schedule, and the map between model space (pixels or latents) and images in [0, 1]. Methods never
touch those parts directly except through this interface, so the same method code runs on the embedded
shapes teachers and on every diffusers family (``methods.backbones``).
"""

from __future__ import annotations

import abc
import dataclasses

import torch
from torch import nn

from methods.diffusion import Schedule


@dataclasses.dataclass
class Cond:
    """Encoded text: cross-attention states and any extra UNet kwargs (SDXL's added conditions)."""

    states: torch.Tensor
    added: dict | None = None

    def __len__(self) -> int:
        return self.states.shape[0]

    def cat(self, other: Cond) -> Cond:
        added = None
        if self.added is not None:
            added = {k: torch.cat([self.added[k], other.added[k]]) for k in self.added}
        return Cond(torch.cat([self.states, other.states]), added)

    def index(self, idx) -> Cond:
        added = None if self.added is None else {k: v[idx] for k, v in self.added.items()}
        return Cond(self.states[idx], added)

    def repeat(self, n: int) -> Cond:
        return self.index(torch.arange(len(self)).repeat(n))


MIN_BATCH = 8


def _pad_rows(v, n: int, to: int):
    if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == n:
        return torch.cat([v, v[-1:].expand(to - n, *v.shape[1:])])
    if isinstance(v, dict):
        return {k: _pad_rows(x, n, to) for k, x in v.items()}
    return v


class NFECounter(nn.Module):
    """Wraps a network and counts evaluations per sample: a call on a batch of B counts B.

    A guided step that runs cond and uncond in one batched call of 2B therefore counts 2 NFE per
    sample, as the bench defines NFE.

    With ``min_batch`` set, smaller batches are padded (repeating the last row, outputs dropped):
    CPU kernels pick other code paths for tiny batches, and padding keeps every sample
    bit-identical whatever batch it was drawn in. Latency measurement turns it off.
    """

    def __init__(self, net: nn.Module, min_batch: int | None = MIN_BATCH):
        super().__init__()
        self.net = net
        self.count = 0
        self.min_batch = min_batch

    def forward(self, x, *args, **kwargs):
        n = x.shape[0]
        self.count += n
        if not self.min_batch or n >= self.min_batch or torch.is_grad_enabled():
            return self.net(x, *args, **kwargs)
        to = self.min_batch
        out = self.net(_pad_rows(x, n, to), *[_pad_rows(a, n, to) for a in args],
                       **{k: _pad_rows(v, n, to) for k, v in kwargs.items()})
        if hasattr(out, "sample"):
            out.sample = out.sample[:n]
            return out
        return out[:n]

    def reset(self) -> int:
        n, self.count = self.count, 0
        return n


class Backbone(abc.ABC):
    """A text-conditioned ε-prediction (or v-prediction) diffusion model."""

    schedule: Schedule
    prediction_type: str = "epsilon"
    scheduler_config: dict
    guidance_embeds: bool = False  # the network takes ``guidance=`` (a distilled guidance scale, FLUX.1-dev)

    @property
    @abc.abstractmethod
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the model space."""

    @abc.abstractmethod
    def encode_text(self, texts: list[str], micro: torch.Tensor | None = None) -> Cond:
        """Encode prompts; the empty string is the unconditional (CFG null) prompt. `micro` [B, 4] long: a training
        image's original (height, width) and crop (top, left), for teachers conditioned on them (SDXL)."""

    @abc.abstractmethod
    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        """Model space -> images in [0, 1], NCHW (VAE decode for latent teachers)."""

    @abc.abstractmethod
    def from_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> model space (VAE encode for latent teachers)."""

    def new_net(self, time_cond_proj_dim: int | None = None) -> nn.Module:
        """A trainable copy of the teacher's network (optionally with a w-embedding, zero-initialised)."""
        cls = type(self.net)
        if time_cond_proj_dim:
            return add_w_embedding(cls, self.net, time_cond_proj_dim)
        student = cls.from_config(self.net.config)
        student.load_state_dict(self.net.state_dict())
        return student.to(self.device, self.net.dtype)

    @abc.abstractmethod
    def training_batch(self, n: int, key: int) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
        """Real training data for methods that use it, never evaluation data: (images float32 [n, 3, H, W] in
        [0, 1], captions, micro-conditioning [n, 4] or None), a function of `key` alone."""

    def truncated(self, texts: list[str]) -> dict[str, list[int]]:
        """Per text encoder, the indices of the texts longer than its context (which it encodes cut)."""
        return {}

    @abc.abstractmethod
    def identity(self) -> dict:
        """What identifies the teacher (name, config, weight hashes) for caches and results."""

    def prepare_net(self, net: nn.Module) -> nn.Module:
        """A network that will sample, as the suite asks it to run (compiled, memory format); the identity here."""
        return net

    net: nn.Module  # the denoiser: x_t [B, C, H, W], t [B], encoder_hidden_states=... -> .sample [B, C, H, W]
    device: torch.device
    dtype: torch.dtype = torch.float32  # the teacher's weights (students train in fp32 under autocast to it)


COMPILE_MARK = "_flashbench_compile"


def compiled_mode(net: nn.Module) -> str | None:
    """The torch.compile mode a network was compiled with by ``Backbone.prepare_net`` (None: it runs eager)."""
    return getattr(net, COMPILE_MARK, None)


def add_w_embedding(net_cls, teacher_net: nn.Module, time_cond_proj_dim: int) -> nn.Module:
    """A copy of a diffusers UNet with a guidance-scale embedding (time_cond_proj_dim), zero-initialised.

    With the new projection at zero the student starts exactly as the teacher.
    """
    student = net_cls.from_config(teacher_net.config, time_cond_proj_dim=time_cond_proj_dim)
    missing, unexpected = student.load_state_dict(teacher_net.state_dict(), strict=False)
    assert not unexpected and all("cond_proj" in k for k in missing), (missing, unexpected)
    nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(next(teacher_net.parameters()).device)


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the guidance scale w (as in LCM / diffusers' get_guidance_scale_embedding)."""
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half, dtype=torch.float32) / (half - 1))
    emb = w[:, None] * freqs[None, :].to(w.device)
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
