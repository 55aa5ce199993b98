"""HPS v2.1: the cosine between open_clip ViT-H-14 image and prompt embeddings, the model fine-tuned on HPD v2 human
preferences (Wu et al. 2023, github.com/tgxs002/HPSv2), as the ``hpsv2`` package scores it."""

from __future__ import annotations

import dataclasses
import functools

import torch

from bench.metrics.preference import OPENAI_MEAN, OPENAI_STD, PreferenceScore, load_state, require_file, weights_sha256
from bench.metrics.registry import register_metric


@dataclasses.dataclass
class HPSv2Config:
    path: str = ""  # HPS_v2.1_compressed.pt (a dict with "state_dict": the whole open_clip model)
    model: str = "ViT-H-14"  # the open_clip architecture the checkpoint fits


@functools.cache
def load_hpsv2(model_name: str, path: str, device: str):
    """(model, tokenizer, transform): open_clip `model_name` built without pretrained weights, every weight from the
    HPS checkpoint (strict, as ``hpsv2.img_score``), eval mode on `device`; loaded once per process. The transform is
    HPSv2's ``preprocess_val``: longest side to the model's image size (bicubic), centre-padded with 0, OpenAI
    mean/std (open_clip ``resize_mode="longest"``)."""
    import open_clip

    model = open_clip.create_model(model_name, pretrained=None, precision="fp32", device="cpu")
    model.load_state_dict(load_state(path, "hpsv2"), strict=True)
    transform = open_clip.image_transform(model.visual.image_size, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD,
                                          resize_mode="longest")
    return model.eval().to(device), open_clip.get_tokenizer(model_name), transform


@register_metric("hpsv2", order=60, reward="hpsv2",
    source="Wu et al. 2023 (Human Preference Score v2); github.com/tgxs002/HPSv2 score.py",
    weights="HPS_v2.1_compressed.pt (open_clip ViT-H-14 tuned on HPD v2), a local file",
    license="Apache-2.0 (HPSv2 repository); base ViT-H-14: MIT",
    columns=(
    {"key": "hpsv2", "header": "HPSv2.1 ↑", "decimals": 4, "direction": "higher", "show_ci": True, "main": False,
     "title": "HPS v2.1 ↑"},))
class HPSv2(PreferenceScore):
    """HPS v2.1 per image: cos(image, prompt) of the HPS-tuned open_clip ViT-H-14, as hpsv2's score (no logit scale,
    no ×100), averaged with a 95% CI. Weights: ``path`` = HPS_v2.1_compressed.pt."""

    Config = HPSv2Config

    @classmethod
    def check(cls, prompts, where, evaluators_kind, config=None):
        require_file("hpsv2", "path", (config or HPSv2Config()).path, "HPS_v2.1_compressed.pt")

    def setup(self):
        self.model, self.tokenizer, self.transform = load_hpsv2(self.config.model, self.config.path,
                                                                str(self.evaluators.device))

    def score(self, x: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """cos(image, text) [n] of preprocessed images x [n, 3, S, S] and their prompts."""
        img = self.model.encode_image(x, normalize=True)
        txt = self.model.encode_text(self.tokenizer(texts).to(x.device), normalize=True)
        return (img * txt).sum(-1)


    def protocol(self):
        return {"model": f"open_clip {self.config.model} + HPS v2.1", "weights_sha256": weights_sha256(self.config.path),
                "preprocessing": "8-bit PIL; longest side bicubic to 224, centre pad 0; OpenAI mean/std (hpsv2 "
                                 "preprocess_val)", "score": "cos(image, text)", "dtype": "float32"}
