"""Colour statistics: saturation (plain and low-passed), contrast and brightness — what noise correction is claimed
to move (Imagine Flash); descriptive, no direction."""

from __future__ import annotations

import torch

from bench.metrics.base import CHUNK, Metric, in_fixed_chunks
from bench.metrics.bootstrap import bootstrap_mean
from bench.metrics.registry import register_metric

COLOUR_STATS = ("saturation", "saturation_lowpass", "contrast", "brightness")


def saturation(x: torch.Tensor) -> torch.Tensor:
    """Mean HSV saturation (max − min) / max per image of x [n, 3, H, W] in [0, 1] (float64 [n])."""
    mx, mn = x.max(1).values, x.min(1).values
    return torch.where(mx > 1e-6, (mx - mn) / mx.clamp(min=1e-6), torch.zeros_like(mx)).mean((1, 2))


def colour_stats(images: torch.Tensor) -> torch.Tensor:
    """Per image [n, 4] float64: mean HSV saturation; the same after a 3×3 box low-pass (replicate padding),
    which residual per-pixel colour noise does not inflate; contrast (std of luminance); brightness
    (mean luminance, Rec. 601 weights)."""
    x = images.double().clamp(0, 1)
    low = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    lum = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    return torch.stack([saturation(x), saturation(low), lum.std((1, 2)), lum.mean((1, 2))], 1)


@register_metric(
    "colour", order=90, always=True,
    source="Imagine Flash (Kohler et al. 2024), the noise-correction claim; HSV saturation, Rec. 601 luminance",
    weights="none", license="—",
    columns=(
    {"key": "saturation", "header": "sat.", "decimals": 3},
    {"key": "saturation_lowpass", "header": "sat. 3×3", "decimals": 3},
    {"key": "contrast", "header": "contrast", "decimals": 3},
    {"key": "brightness", "header": "brightness", "decimals": 3, "main": False}))
class ColourStats(Metric):
    """Mean saturation (plain and low-passed), contrast and brightness (what noise correction is claimed to move)."""

    width = len(COLOUR_STATS)

    def per_sample(self, images, prompts):
        return in_fixed_chunks(colour_stats, len(images), images, chunk=CHUNK)

    def compute(self, values):
        row = {}
        for i, k in enumerate(COLOUR_STATS):
            row[k], row[f"{k}_ci_low"], row[f"{k}_ci_high"] = bootstrap_mean(values[:, i].numpy())
        return row
