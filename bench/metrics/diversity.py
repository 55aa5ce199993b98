"""Diversity: several samples of one prompt (different noise seeds), their spread in a feature space, beside the
spread of real images of that prompt — mode collapse, the main critique of distribution-matching distillation,
shows as a generated spread far below the real one.

Per prompt p of the first ``prompts`` evaluation prompts, ``seeds`` samples x_1..x_k (noise keys (p, GROUP_SEED +
k·cell seed + j)) are embedded in ``space`` and L2-normalised to f_1..f_k; with the cosine kernel K_ij = f_i·f_j:

* mean pairwise distance  D = 2/(k(k−1)) Σ_{i<j} (1 − K_ij)  ∈ [0, 2]
* Vendi score             V = exp(−Σ_i λ_i log λ_i),  λ = eigenvalues of K/k  ∈ [1, k]
  (Friedman & Dieng 2023, "The Vendi Score", eq. 2 with q = 1, as ``vendi_score.vendi.score_K``)

and the same of k real images of p where the evaluators can make them (the embedded world renders a prompt's scene
with k nuisance draws: ``Evaluators.real_variants``). The row holds each mean over prompts with a bootstrap CI over
prompts, and V_generated / V_real (a ratio of sums, its CI by the same resamples). Vendi is computed here in float64
torch rather than with the ``vendi-score`` package (0.0.3, 2022: it pulls in scikit-learn and uses
``scipy.sparse.csr``, deprecated); tests pin it to the definition (k identical items → 1, k orthogonal → k).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from bench.metrics.base import Metric
from bench.metrics.bootstrap import bootstrap_mean, bootstrap_ratio
from bench.metrics.registry import register_metric
from core.errors import UserError

GROUP_SEED = 2_000_000  # noise seeds of the diversity samples: GROUP_SEED + seeds·(cell seed) + j, apart from any cell's


def cosine_kernel(features: torch.Tensor) -> torch.Tensor:
    """K [k, k] float64: cosines of the rows of features [k, w] (each row L2-normalised first)."""
    f = torch.nn.functional.normalize(features.double(), dim=-1)
    return f @ f.T


def vendi_score(kernel: torch.Tensor) -> float:
    """exp of the Shannon entropy of the eigenvalues of K/k, for a PSD kernel [k, k] with unit diagonal
    (Friedman & Dieng 2023, eq. 2, q = 1): 1 for k identical items, k for k mutually orthogonal ones."""
    lam = torch.linalg.eigvalsh(kernel.double() / kernel.shape[0]).clamp(min=0)
    lam = lam[lam > 0]
    return float(torch.exp(-(lam * lam.log()).sum()))


def mean_pairwise_distance(kernel: torch.Tensor) -> float:
    """Mean of 1 − K_ij over the k(k−1)/2 pairs i < j of a cosine kernel [k, k] (0: identical items)."""
    k = kernel.shape[0]
    iu = torch.triu_indices(k, k, 1)
    return float((1 - kernel[iu[0], iu[1]]).mean())


def spread(features: torch.Tensor) -> tuple[float, float]:
    """(Vendi score, mean pairwise cosine distance) of one prompt's samples' features [k, w]."""
    kernel = cosine_kernel(features)
    return vendi_score(kernel), mean_pairwise_distance(kernel)


@dataclasses.dataclass
class DiversityConfig:
    prompts: int = 16  # the first this many evaluation prompts (the seed-0 sample grid's prompts come first)
    seeds: int = 8  # samples per prompt, k >= 2
    space: str = "clip"  # the evaluators' feature space (Evaluators.feature_spaces)

    def __post_init__(self):
        if self.prompts < 1:
            raise ValueError(f"prompts must be >= 1, got {self.prompts}")
        if self.seeds < 2:
            raise ValueError(f"seeds must be >= 2 (a spread needs two samples), got {self.seeds}")


@register_metric(
    "diversity", order=70, needs=("groups",),
    source="Friedman & Dieng 2023 (The Vendi Score, TMLR), eq. 2, q = 1; mean pairwise cosine distance",
    weights="the evaluators' feature space: embedded, the shipped tiny CLIP; real scale, the CLIP model (or DINOv2)",
    license="as the feature network's",
    columns=(
    {"key": "vendi", "header": "Vendi ↑", "decimals": 2, "direction": "higher", "show_ci": True, "main": False,
     "title": "Vendi score of k seeds per prompt ↑"},
    {"key": "vendi_real", "header": "Vendi (real)", "decimals": 2, "show_ci": True, "main": False},
    {"key": "vendi_ratio", "header": "Vendi / real ↑", "decimals": 3, "direction": "higher", "show_ci": True,
     "main": False},
    {"key": "pairwise_distance", "header": "pairwise dist. ↑", "decimals": 4, "direction": "higher",
     "show_ci": True, "main": False},
    {"key": "pairwise_distance_real", "header": "pairwise dist. (real)", "decimals": 4, "show_ci": True,
     "main": False}))
class Diversity(Metric):
    """Per prompt, ``seeds`` samples' Vendi score and mean pairwise cosine distance in a feature space, against the
    same of real images of the prompt (module docstring). Measured by ``flashbench run`` only (it samples the extra
    seeds itself): shards, ``merge`` and ``evaluate`` have one sample per prompt and refuse it."""

    Config = DiversityConfig
    width = 0  # nothing per evaluation sample: the groups are sampled apart (``group_prompts``, ``update_group``)

    def setup(self):
        self.groups: list[tuple[float, float, float, float]] = []

    @classmethod
    def check(cls, prompts, where, evaluators_kind, config=None):
        config = config or DiversityConfig()
        if config.space not in ("fid", "clip", "dinov2"):
            raise UserError(f"{where}: diversity space must be fid, clip or dinov2, got {config.space!r}")
        if config.prompts > len(prompts):
            raise UserError(f"diversity prompts = {config.prompts} but {where!r} gives {len(prompts)} prompts; set "
                            f"[metrics.diversity] prompts to {len(prompts)} or fewer")

    def per_sample(self, images, prompts):
        return torch.zeros(len(images), 0, dtype=self.dtype)  # never called: grouped metrics are not fed per batch

    def group_prompts(self) -> list:
        """The prompts whose several samples the runner makes (``seeds`` each)."""
        return list(self.prompts[: self.config.prompts])

    def noise_seeds(self, cell_seed: int) -> list[int]:
        """The noise seeds of one prompt's group in a cell of seed `cell_seed`."""
        k = self.config.seeds
        return [GROUP_SEED + k * cell_seed + j for j in range(k)]

    def update_group(self, prompt, images: torch.Tensor) -> None:
        """One prompt's samples float32 [k, 3, H, W] in [0, 1]: their spread, and that of k real images of it."""
        gen = spread(self.evaluators.features(self.config.space, images.to(self.evaluators.device)))
        real = self.evaluators.real_variants(prompt, len(images))
        real = spread(self.evaluators.features(self.config.space, real.to(self.evaluators.device))) \
            if real is not None else (float("nan"), float("nan"))
        self.groups.append((*gen, *real))

    def protocol(self):
        space = self.evaluators.feature_spaces()[self.config.space]
        return {"prompts": self.config.prompts, "seeds": self.config.seeds, "space": self.config.space,
                "network": space["network"], "sha256": space["sha256"], "kernel": "cosine",
                "vendi": "exp(entropy(eig(K/k))), q = 1", "ci": "percentile bootstrap over prompts"}

    def compute(self, values=None):
        if not self.groups:
            raise RuntimeError("diversity has no groups: the runner samples them (flashbench run only)")
        g = np.asarray(self.groups, dtype=np.float64)
        row = {}
        for i, key in enumerate(("vendi", "pairwise_distance", "vendi_real", "pairwise_distance_real")):
            if not np.isnan(g[:, i]).any():
                row[key], row[f"{key}_ci_low"], row[f"{key}_ci_high"] = bootstrap_mean(g[:, i])
        if "vendi_real" in row:
            row["vendi_ratio"], row["vendi_ratio_ci_low"], row["vendi_ratio_ci_high"] = bootstrap_ratio(g[:, 0], g[:, 2])
        return row
