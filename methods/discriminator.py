"""A discriminator on frozen teacher-UNet encoder features with small trainable heads (ADD / LADD style).

The image (x̂_0 in model space) is re-noised to a random t_d ∈ [0, t_max], the frozen teacher UNet
runs its encoder half (time embedding, down blocks, mid block) on it with the prompt, and one small
text-conditioned head per feature level gives logits (projection discriminator): one per image
(pooled) or one per feature-map location (``patch``, as PatchGAN / LADD). The loss is hinge or
non-saturating (``loss``); R1 penalises the gradient of D at the *noised* real input. The features
are the *teacher's*, never an evaluator's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods.backbone import Cond

LOSSES = ("hinge", "non-saturating")


def encoder_features(unet, x_t, t, cond: Cond, timestep_cond=None) -> list[torch.Tensor]:
    """The outputs of a diffusers UNet2DConditionModel's down blocks and mid block (a network that defines its own
    ``encoder_features``, as the flow transformers' wrapper, gives those)."""
    if hasattr(unet, "encoder_features"):
        return unet.encoder_features(x_t, t, cond, timestep_cond)
    t = torch.as_tensor(t, device=x_t.device)
    t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
    emb = unet.time_embedding(unet.get_time_embed(sample=x_t, timestep=t), timestep_cond)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=cond.states, added_cond_kwargs=cond.added or {})
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    states = unet.process_encoder_hidden_states(encoder_hidden_states=cond.states, added_cond_kwargs=cond.added or {})
    h = unet.conv_in(x_t)
    feats = []
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=states)
        else:
            h, _ = block(hidden_states=h, temb=emb)
        feats.append(h)
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            h = unet.mid_block(h, emb, encoder_hidden_states=states)
        else:
            h = unet.mid_block(h, emb)
        feats.append(h)
    return feats


class _Head(nn.Module):
    """Logits of one feature level [B, C, h, w] -> [B, h·w] (patch) or [B, 1] (pooled), text-projected."""

    def __init__(self, channels: int, text_dim: int, width: int, patch: bool):
        super().__init__()
        groups = 8 if width % 8 == 0 else 1
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(groups, width), nn.LeakyReLU(0.2),
            nn.Conv2d(width, width, 1),
        )
        self.out = nn.Linear(width, 1)
        self.proj = nn.Linear(text_dim, width)  # projection-discriminator text conditioning
        self.patch = patch

    def forward(self, f: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = self.body(f)  # [B, width, h, w]
        h = h.flatten(2).transpose(1, 2) if self.patch else h.mean((2, 3))[:, None]  # [B, P, width]
        return self.out(h).squeeze(-1) + (h * self.proj(text)[:, None]).sum(-1) / h.shape[-1] ** 0.5


class TeacherFeatureDiscriminator(nn.Module):
    """Frozen teacher encoder features + trainable text-conditioned heads; hinge or non-saturating loss.

    Counts its passes (per sample) for the training-compute record: ``forward_passes`` (teacher
    encoder + heads) and ``backward_passes`` (samples whose logits a gradient flowed back through).
    """

    def __init__(self, teacher_net, schedule, null_cond: Cond, t_max: int = 500, width: int = 32,
                 patch: bool = True, loss: str = "hinge"):
        """`null_cond`: the teacher's encoding of one prompt (any), to probe feature shapes and text width."""
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.teacher = [teacher_net]  # a list: not a submodule, never trained, never saved with the heads
        self.schedule, self.t_max, self.loss = schedule, t_max, loss
        with torch.no_grad():
            probe = torch.zeros(1, teacher_net.config.in_channels, teacher_net.config.sample_size,
                                teacher_net.config.sample_size, device=next(teacher_net.parameters()).device)
            chans = [f.shape[1] for f in encoder_features(teacher_net, probe, 0, null_cond.index(slice(0, 1)))]
        self.heads = nn.ModuleList(_Head(c, null_cond.states.shape[-1], width, patch) for c in chans)
        self.forward_passes = 0
        self.backward_passes = 0

    def noised(self, x0: torch.Tensor, gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, t): x0 re-noised to t ~ U{0..t_max}, per sample."""
        t = self.schedule.sample_t(x0.shape[0], gen, 0, self.t_max + 1)
        eps = torch.randn(x0.shape, generator=gen).to(x0)
        return self.schedule.add_noise(x0, eps, t).to(x0.dtype), t

    def logits_at(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Logits [B, P] of noised inputs x_t at times t (P: patches over all heads, or one per head)."""
        n = x_t.shape[0]
        feats = encoder_features(self.teacher[0], x_t, t.to(x_t.device), cond)
        text = cond.states.mean(1)
        out = torch.cat([h(f, text) for h, f in zip(self.heads, feats)], 1)
        self.forward_passes += n
        if out.requires_grad:
            out.register_hook(lambda grad: self._backward(n))
        return out

    def _backward(self, n: int) -> None:
        self.backward_passes += n

    def logits(self, x0: torch.Tensor, cond: Cond, gen: torch.Generator | None = None) -> torch.Tensor:
        x_t, t = self.noised(x0, gen)
        return self.logits_at(x_t, t, cond)

    def d_loss(self, real_x0, real_cond: Cond, fake_x0, fake_cond: Cond, gen=None, r1_gamma: float = 0.0,
               with_logits: bool = False):
        """The heads' loss (fake detached); with r1_gamma > 0 plus R1 = γ/2 E‖∇_{x_t} D(x_t)‖² at the noised real x_t.
        `with_logits`: (loss, real logits, fake logits)."""
        x_r, t_r = self.noised(real_x0.detach(), gen)
        if r1_gamma > 0:
            # R1 needs a double backward, which fused attention kernels do not implement
            from torch.nn.attention import SDPBackend, sdpa_kernel

            x_r.requires_grad_(True)
            with sdpa_kernel(SDPBackend.MATH):
                d_real = self.logits_at(x_r, t_r, real_cond)
        else:
            d_real = self.logits_at(x_r, t_r, real_cond)
        d_fake = self.logits(fake_x0.detach(), fake_cond, gen)
        if self.loss == "hinge":
            loss = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
        else:
            loss = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        if r1_gamma > 0:  # on each sample's mean logit (comparable between patch and pooled heads)
            (grad,) = torch.autograd.grad(d_real.mean(1).sum(), x_r, create_graph=True)
            loss = loss + 0.5 * r1_gamma * grad.pow(2).flatten(1).sum(1).mean()
        return (loss, d_real, d_fake) if with_logits else loss

    def g_loss(self, fake_x0, cond: Cond, gen=None, loss: str | None = None):
        """Generator loss: −E[D(fake)] (hinge) or E[softplus(−D(fake))] (non-saturating); `loss` None: the
        discriminator's own. Gradients reach the student through the frozen features."""
        loss = loss or self.loss
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        d = self.logits(fake_x0, cond, gen)
        return -d.mean() if loss == "hinge" else F.softplus(-d).mean()
