"""Compositional accuracy against each prompt's ground truth (the embedded world's exact objects)."""

from __future__ import annotations

import numpy as np
import torch

from bench.metrics.base import Metric, prompt_ids
from bench.metrics.bootstrap import bootstrap_mean, bootstrap_ratio
from bench.metrics.registry import register_metric
from core.errors import UserError


@register_metric(
    "accuracy", order=30, always=True, needs=("ground_truth",),
    source="this project's embedded world (exact ground truth; GenEval's check kinds, Ghosh et al. 2023)",
    weights="embedded: the shipped attribute network",
    license="this repository's (Apache-2.0)",
    columns=(
    {"key": "accuracy", "header": "Acc ↑", "decimals": 3, "direction": "higher", "show_ci": True, "gate_floor": 0.01,
     "title": "compositional accuracy ↑", "plot": True},
    {"key": "acc_color", "header": "colour", "decimals": 3, "direction": "higher"},
    {"key": "acc_shape", "header": "shape", "decimals": 3, "direction": "higher"},
    {"key": "acc_size", "header": "size", "decimals": 3, "direction": "higher"},
    {"key": "acc_position", "header": "position", "decimals": 3, "direction": "higher"},
    {"key": "acc_count", "header": "count", "decimals": 3, "direction": "higher"}))
class Accuracy(Metric):
    """Compositional accuracy against each prompt's ground truth, per attribute type and per whole prompt.

    The evaluator's ``attribute_checks`` gives, per image, correct and total checks of each attribute
    type and whether every check holds; ``accuracy`` is the share of prompts with every check right,
    ``acc_<type>`` the share of checks right (ratio CI), ``accuracy_two_object`` accuracy over the
    prompts that name two objects. Measured wherever the evaluators check attributes and every prompt has
    ground truth.
    """

    def setup(self):
        self.attributes = self.evaluators.attributes
        self.width = 2 * len(self.attributes) + 2  # correct per type, total per type, whole, two-object flag

    @classmethod
    def check(cls, prompts, where, evaluators_kind, config=None):
        if evaluators_kind != "shapes":
            raise UserError("accuracy needs the embedded world's attribute evaluator ([evaluators] kind = \"shapes\"); "
                            "remove \"accuracy\" from metrics at real scale")
        lacking = [p for p in prompts if p.objects is None]
        if lacking:
            raise UserError(f"accuracy needs each prompt's ground-truth objects, and {len(lacking)} of {len(prompts)} "
                            f"prompts of {where!r} have none ({prompt_ids(lacking)}): write them in the shapes grammar "
                            "(\"a large red circle at the top left\") or remove \"accuracy\" from metrics")

    @classmethod
    def applies(cls, evaluators, prompts):
        return bool(evaluators.attributes) and all(p.objects is not None for p in prompts)

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
