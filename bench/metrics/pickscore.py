"""PickScore: logit_scale.exp() · cos(image, prompt) under the CLIP ViT-H-14 fine-tuned on Pick-a-Pic preferences
(Kirstain et al. 2023, huggingface.co/yuvalkirstain/PickScore_v1), as its model card scores it."""

from __future__ import annotations

import dataclasses
import functools

import torch

from bench.metrics.preference import PreferenceScore, require_file, weights_sha256
from bench.metrics.registry import register_metric


@dataclasses.dataclass
class PickScoreConfig:
    path: str = ""  # a local copy of yuvalkirstain/PickScore_v1 (config.json + weights): a transformers CLIPModel
    processor: str = ""  # a local copy of laion/CLIP-ViT-H-14-laion2B-s32B-b79K's processor files (the card's processor)


def _features(out) -> torch.Tensor:
    """CLIPModel.get_*_features' projected embedding (transformers 5 wraps it in an output's ``pooler_output``)."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


@functools.cache
def load_pickscore(path: str, processor: str, device: str):
    """(CLIPModel in eval mode on `device`, AutoProcessor), both from local directories only; once per process."""
    from transformers import AutoProcessor, CLIPModel

    model = CLIPModel.from_pretrained(path, local_files_only=True).eval().to(device)
    return model, AutoProcessor.from_pretrained(processor, local_files_only=True)


@register_metric("pickscore", order=61, reward="pickscore",
    source="Kirstain et al. 2023 (Pick-a-Pic); the PickScore_v1 model card",
    weights="PickScore_v1 (transformers CLIPModel, ViT-H-14) and the laion CLIP-ViT-H-14 processor, local directories",
    license="MIT (model card)",
    columns=(
    {"key": "pickscore", "header": "PickScore ↑", "decimals": 3, "direction": "higher", "show_ci": True, "main": False,
     "title": "PickScore ↑"},))
class PickScore(PreferenceScore):
    """PickScore per image: logit_scale.exp() · cos(image, prompt) of PickScore_v1 (the model card's score), averaged
    with a 95% CI. Weights: ``path`` = PickScore_v1 directory, ``processor`` = CLIP-ViT-H-14 processor directory."""

    Config = PickScoreConfig

    @classmethod
    def check(cls, prompts, where, evaluators_kind, config=None):
        config = config or PickScoreConfig()
        require_file("pickscore", "path", config.path, "PickScore_v1", directory=True)
        require_file("pickscore", "processor", config.processor, "CLIP-ViT-H-14 processor", directory=True)

    def setup(self):
        self.model, self.processor = load_pickscore(self.config.path, self.config.processor, str(self.evaluators.device))

    def transform(self, image) -> torch.Tensor:
        """The processor's image preprocessing of one PIL image: [3, S, S]."""
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def embeddings(self, x: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit image and text embeddings [n, d] of preprocessed images x and their prompts (77 tokens, padded to 77
        so that a prompt's tokens do not depend on its batch)."""
        tok = self.processor(text=texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        img = _features(self.model.get_image_features(pixel_values=x))
        txt = _features(self.model.get_text_features(input_ids=tok["input_ids"].to(x.device),
                                                     attention_mask=tok["attention_mask"].to(x.device)))
        return img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)

    def score(self, x: torch.Tensor, texts: list[str]) -> torch.Tensor:
        img, txt = self.embeddings(x, texts)
        return self.model.logit_scale.exp() * (img * txt).sum(-1)


    def protocol(self):
        return {"model": "transformers CLIPModel PickScore_v1", "weights_sha256": weights_sha256(self.config.path),
                "processor_sha256": weights_sha256(self.config.processor),
                "preprocessing": "8-bit PIL; the CLIP processor (shortest side bicubic to 224, centre crop, OpenAI "
                                 "mean/std); text padded to 77 tokens",
                "score": "logit_scale.exp() * cos(image, text)", "dtype": "float32"}
