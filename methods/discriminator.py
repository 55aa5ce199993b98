"""A discriminator on frozen teacher-UNet encoder features with small trainable heads (ADD / LADD style).

The image (x̂_0 in model space) is re-noised to a random t_d, the frozen teacher UNet runs its
encoder half (time embedding, down blocks, mid block) on it with the prompt, and one small
text-conditioned head per feature level gives a logit (projection discriminator). Hinge loss;
optional R1 penalty on real inputs. The features are the *teacher's* — never an evaluator's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods.backbone import Cond


def encoder_features(unet, x_t, t, cond: Cond, timestep_cond=None) -> list[torch.Tensor]:
    """The outputs of a diffusers UNet2DConditionModel's down blocks and mid block."""
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
    def __init__(self, channels: int, text_dim: int, width: int):
        super().__init__()
        groups = 8 if width % 8 == 0 else 1
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(groups, width), nn.LeakyReLU(0.2),
            nn.Conv2d(width, width, 1),
        )
        self.out = nn.Linear(width, 1)
        self.proj = nn.Linear(text_dim, width)  # projection-discriminator text conditioning

    def forward(self, f: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = self.body(f).mean((2, 3))  # [B, width]
        return self.out(h).squeeze(1) + (h * self.proj(text)).sum(1) / h.shape[1] ** 0.5


class TeacherFeatureDiscriminator(nn.Module):
    """Hinge discriminator: frozen teacher encoder features + trainable text-conditioned heads."""

    def __init__(self, teacher_unet, schedule, null_cond: Cond, t_max: int = 500, width: int = 32):
        """`null_cond`: the teacher's encoding of one prompt (any), to probe feature shapes and text width."""
        super().__init__()
        self.teacher = [teacher_unet]  # a list: not a submodule, never trained, never saved with the heads
        self.schedule = schedule
        self.t_max = t_max
        with torch.no_grad():
            probe = torch.zeros(1, teacher_unet.config.in_channels, teacher_unet.config.sample_size,
                                teacher_unet.config.sample_size, device=next(teacher_unet.parameters()).device)
            chans = [f.shape[1] for f in encoder_features(teacher_unet, probe, 0, null_cond.index(slice(0, 1)))]
        self.heads = nn.ModuleList(_Head(c, null_cond.states.shape[-1], width) for c in chans)
        self.feature_passes = 0  # teacher encoder evaluations per sample, summed

    def logits(self, x0: torch.Tensor, cond: Cond, gen: torch.Generator | None = None) -> torch.Tensor:
        n = x0.shape[0]
        t = torch.randint(0, self.t_max + 1, (n,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen).to(x0)
        x_t = self.schedule.add_noise(x0, eps, t).to(x0.dtype)
        feats = encoder_features(self.teacher[0], x_t, t.to(x0.device), cond)
        self.feature_passes += n
        text = cond.states.mean(1)
        return sum(h(f, text) for h, f in zip(self.heads, feats)) / len(self.heads)

    def d_loss(self, real_x0, real_cond: Cond, fake_x0, fake_cond: Cond, gen=None, r1_gamma: float = 0.0):
        """Hinge loss for the heads (fake detached); R1 = γ/2 E‖∇_x D(real)‖² when r1_gamma > 0."""
        real_x0 = real_x0.detach().requires_grad_(r1_gamma > 0)
        if r1_gamma > 0:
            # R1 needs a double backward, which fused attention kernels do not implement
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                d_real = self.logits(real_x0, real_cond, gen)
        else:
            d_real = self.logits(real_x0, real_cond, gen)
        d_fake = self.logits(fake_x0.detach(), fake_cond, gen)
        loss = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
        if r1_gamma > 0:
            (grad,) = torch.autograd.grad(d_real.sum(), real_x0, create_graph=True)
            loss = loss + 0.5 * r1_gamma * grad.pow(2).flatten(1).sum(1).mean()
        return loss

    def g_loss(self, fake_x0, cond: Cond, gen=None):
        """Generator hinge loss −E[D(fake)]; gradients reach the student through the frozen features."""
        return -self.logits(fake_x0, cond, gen).mean()
