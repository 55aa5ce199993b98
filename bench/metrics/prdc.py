"""Precision, recall, density and coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for
Generative Models"; precision and recall from Kynkäänniemi et al. 2019), k = 5 nearest neighbours.

The definitions of the ``prdc`` package (clovaai/generative-evaluation-prdc, ``prdc/prdc.py``), in torch float64:
each real feature r_i has the radius ρ_i of a ball reaching its k-th nearest other real feature (the (k+1)-th
smallest distance, itself included), each generated f_j likewise ρ̃_j among the generated ones; with strict
inequalities,
  precision = share of generated f_j inside some real ball (∃i: ‖r_i − f_j‖ < ρ_i),
  recall    = share of real r_i inside some generated ball (∃j: ‖r_i − f_j‖ < ρ̃_j),
  density   = (1/kM) Σ_j #{i: ‖r_i − f_j‖ < ρ_i}  (can exceed 1: generated samples crowd real ones),
  coverage  = share of real r_i whose ball holds some generated f_j (min_j ‖r_i − f_j‖ < ρ_i).

CI: bias-centred percentile bootstrap over prompts (``bench.metrics.distribution``; the reference paired by prompt
when it is paired). The balls are those of the whole sets: a resample only chooses which rows are present (counted
as often as drawn), so duplicated rows never shrink a radius to 0.
"""

from __future__ import annotations

import dataclasses

import torch

from bench.metrics.distribution import DistributionMetric, centred_ci, resampled_counts
from bench.metrics.registry import register_metric
from core.errors import UserError

NAMES = ("precision", "recall", "density", "coverage")


def distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Euclidean distances [n_x, n_y] in float64 (computed from differences, not the Gram trick)."""
    return torch.cdist(x.double(), y.double(), compute_mode="donot_use_mm_for_euclid_dist")


def radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's distance to its k-th nearest other row [n] (the (k+1)-th smallest, itself included)."""
    return distances(x, x).kthvalue(k + 1, dim=1).values


@dataclasses.dataclass
class Balls:
    """Who lies in whose ball: in_real[i, j] = f_j in real ball i, in_fake[i, j] = r_i in generated ball j."""

    in_real: torch.Tensor  # [n_r, n_g] float64 0/1
    in_fake: torch.Tensor  # [n_r, n_g] float64 0/1
    k: int

    @classmethod
    def of(cls, real: torch.Tensor, fake: torch.Tensor, k: int) -> Balls:
        d = distances(real, fake)
        return cls((d < radii(real, k)[:, None]).double(), (d < radii(fake, k)[None, :]).double(), k)

    def measure(self, wg: torch.Tensor | None = None, wr: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The four metrics [c] of sets whose rows are counted wg [c, n_g], wr [c, n_r] times (None: once each)."""
        nr, ng = self.in_real.shape
        wg = torch.ones(1, ng, dtype=torch.float64) if wg is None else wg
        wr = torch.ones(1, nr, dtype=torch.float64) if wr is None else wr
        real_balls_holding = wr @ self.in_real  # [c, n_g]: present real balls holding each f_j
        return {"precision": (wg * (real_balls_holding > 0)).sum(1) / wg.sum(1),
                "recall": (wr * (wg @ self.in_fake.T > 0)).sum(1) / wr.sum(1),
                "density": (wg * real_balls_holding).sum(1) / (self.k * wg.sum(1)),
                "coverage": (wr * (wg @ self.in_real.T > 0)).sum(1) / wr.sum(1)}


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict[str, float]:
    """Precision, recall, density, coverage of fake features [M, d] against real features [N, d]."""
    return {name: float(v) for name, v in Balls.of(real, fake, k).measure().items()}


@register_metric("prdc", order=53, needs=("reference",),
    source="Kynkäänniemi et al. 2019 (precision/recall); Naeem et al. 2020 (density/coverage, ICML), the prdc package, k = 5",
    weights="the evaluators' feature space (default fid)",
    license="as the feature network",
    columns=(
    {"key": "precision", "header": "precision ↑", "decimals": 3, "direction": "higher", "show_ci": True,
     "main": False, "title": "precision ↑"},
    {"key": "recall", "header": "recall ↑", "decimals": 3, "direction": "higher", "show_ci": True, "main": False,
     "title": "recall ↑"},
    {"key": "density", "header": "density ↑", "decimals": 3, "direction": "higher", "show_ci": True, "main": False,
     "title": "density ↑"},
    {"key": "coverage", "header": "coverage ↑", "decimals": 3, "direction": "higher", "show_ci": True,
     "main": False, "title": "coverage ↑"}))
class PRDC(DistributionMetric):
    """Precision, recall, density and coverage of a cell's samples against the reference in one feature space."""

    @dataclasses.dataclass
    class Config:
        space: str = "fid"  # the evaluators' feature space (Evaluators.feature_spaces)
        nearest_k: int = 5

    @classmethod
    def check(cls, prompts, where, evaluators_kind, config=None):
        super().check(prompts, where, evaluators_kind, config)
        config = config if config is not None else cls.make_config({}, cls.name)
        if not 1 <= config.nearest_k < len(prompts):
            raise UserError(f"prdc: nearest_k must be between 1 and samples − 1 = {len(prompts) - 1}, got "
                            f"{config.nearest_k}")

    def compute(self, values):
        gen, ref = self.pair(values)
        if self.config.nearest_k >= min(len(gen), len(ref)):
            raise UserError(f"prdc: nearest_k = {self.config.nearest_k} needs more than that many samples and "
                            f"reference images ({len(gen)}, {len(ref)})")
        balls = Balls.of(ref, gen, self.config.nearest_k)
        point = {name: float(v) for name, v in balls.measure().items()}
        boot = [balls.measure(wg, wr) for wg, wr in resampled_counts(len(gen), len(ref), self.reference.paired)]
        row = {}
        for name in NAMES:
            vals = torch.cat([b[name] for b in boot]).numpy()
            lo, hi = centred_ci(vals, point[name], 0.0, float("inf") if name == "density" else 1.0)
            row.update({name: point[name], f"{name}_ci_low": lo, f"{name}_ci_high": hi})
        return row

    def protocol(self):
        return {**self.space_protocol(), "nearest_k": self.config.nearest_k,
                "definitions": "prdc 0.2 (clovaai/generative-evaluation-prdc): k-NN balls of the whole sets, strict <",
                "ci_balls": "the whole sets' k-NN radii; a resample chooses which rows are present"}
