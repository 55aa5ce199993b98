"""CLIP score: 100·max(cos, 0) between each image and its prompt under the evaluators' CLIP model, averaged."""

from __future__ import annotations

from bench.metrics.base import Metric
from bench.metrics.bootstrap import bootstrap_mean
from bench.metrics.registry import register_metric


@register_metric(
    "clip_score", order=20, always=True,
    source="Hessel et al. 2021 (CLIPScore; w = 100, as torchmetrics CLIPScore)",
    weights="real scale: an open_clip model from a local file (e.g. ViT-g-14 laion2b_s12b_b42k); embedded: the shipped "
            "tiny open_clip CLIP",
    license="LAION open_clip weights: MIT; embedded: this repository's (Apache-2.0)",
    columns=(
    {"key": "clip_score", "header": "CLIP ↑", "decimals": 2, "direction": "higher", "show_ci": True, "gate_floor": 0.25,
     "title": "CLIP score ↑", "plot": True},))
class CLIPScore(Metric):
    """CLIP score 100·max(cos, 0) per image, averaged (Hessel et al. 2021; the evaluators' CLIP model), 95% CI."""

    width = 1

    def per_sample(self, images, prompts):
        return self.evaluators.clip_score(images, [p.text for p in prompts]).double().view(-1, 1)

    def compute(self, values):
        m, lo, hi = bootstrap_mean(values[:, 0].numpy())
        return {"clip_score": m, "clip_score_ci_low": lo, "clip_score_ci_high": hi}
