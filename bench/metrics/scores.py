"""Per-image scores as accumulators: CLIP score, compositional accuracy, colour statistics."""

from __future__ import annotations

import numpy as np
import torch

from bench.metrics.base import CHUNK, Accumulator, in_fixed_chunks
from bench.metrics.bootstrap import bootstrap_mean, bootstrap_ratio


class CLIPScore(Accumulator):
    """CLIP score 100·max(cos, 0) per image, averaged (the evaluator's CLIP model)."""

    width = 1

    def __init__(self, evaluators):
        super().__init__()
        self.evaluators = evaluators

    def per_sample(self, images, prompts):
        return self.evaluators.clip_score(images, [p.text for p in prompts]).double().view(-1, 1)

    def compute(self, values):
        m, lo, hi = bootstrap_mean(values[:, 0].numpy())
        return {"clip_score": m, "clip_score_ci_low": lo, "clip_score_ci_high": hi}


class Accuracy(Accumulator):
    """Compositional accuracy against each prompt's ground truth, per attribute type and per whole prompt.

    The evaluator's ``attribute_checks`` gives, per image, correct and total checks of each attribute
    type and whether every check holds; ``accuracy`` is the share of prompts with every check right,
    ``acc_<type>`` the share of checks right (ratio CI), ``accuracy_two_object`` accuracy over the
    prompts that name two objects.
    """

    def __init__(self, evaluators, attributes: tuple[str, ...]):
        super().__init__()
        self.evaluators, self.attributes = evaluators, attributes
        self.width = 2 * len(attributes) + 2  # correct per type, total per type, whole, two-object flag

    def per_sample(self, images, prompts):
        c = self.evaluators.attribute_checks(images, prompts)
        cols = [c[f"{a}_correct"] for a in self.attributes] + [c[f"{a}_total"] for a in self.attributes]
        cols += [c["whole"], np.array([len(p.objects) == 2 for p in prompts], dtype=np.float64)]
        return torch.from_numpy(np.stack(cols, 1).astype(np.float64))

    def compute(self, values):
        v = values.numpy()
        k = len(self.attributes)
        whole, two = v[:, 2 * k], v[:, 2 * k + 1].astype(bool)
        row = {}
        row["accuracy"], row["accuracy_ci_low"], row["accuracy_ci_high"] = bootstrap_mean(whole)
        for i, a in enumerate(self.attributes):
            key = f"acc_{a}"
            row[key], row[f"{key}_ci_low"], row[f"{key}_ci_high"] = bootstrap_ratio(v[:, i], v[:, k + i])
        if two.any():
            row["accuracy_two_object"] = float(whole[two].mean())
        return row


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


class ColourStats(Accumulator):
    """Mean saturation (plain and low-passed), contrast and brightness (what noise correction is claimed to move)."""

    width = len(COLOUR_STATS)

    def per_sample(self, images, prompts):
        return in_fixed_chunks(colour_stats, len(images), images, chunk=CHUNK)

    def compute(self, values):
        row = {}
        for i, k in enumerate(COLOUR_STATS):
            row[k], row[f"{k}_ci_low"], row[f"{k}_ci_high"] = bootstrap_mean(values[:, i].numpy())
        return row
