"""LAION aesthetic score: the improved aesthetic predictor v2, an MLP on L2-normalised CLIP ViT-L/14 image embeddings
(Schuhmann, github.com/christophschuhmann/improved-aesthetic-predictor, ``simple_inference.py``), 1-10 scale."""

from __future__ import annotations

import dataclasses
import functools

import torch

from bench.metrics.preference import (OPENAI_MEAN, OPENAI_STD, PreferenceScore, RewardMLP, load_state, require_file,
                                      weights_sha256)
from bench.metrics.registry import register_metric


@dataclasses.dataclass
class AestheticConfig:
    path: str = ""  # sac+logos+ava1-l14-linearMSE.pth: the MLP's state dict
    clip_pretrained: str = ""  # OpenAI CLIP ViT-L/14 weights in open_clip's layout (e.g. open_clip_pytorch_model.bin)
    clip_model: str = "ViT-L-14-quickgelu"  # OpenAI's ViT-L/14 uses QuickGELU; the predictor was fit on its embeddings


@functools.cache
def load_aesthetic(clip_model: str, clip_pretrained: str, path: str, device: str):
    """(CLIP, MLP, transform) in eval mode on `device`, from local files; once per process. The transform is CLIP's:
    shortest side bicubic to the image size, centre crop, OpenAI mean/std."""
    import open_clip

    clip = open_clip.create_model(clip_model, pretrained=clip_pretrained, precision="fp32", device="cpu")
    mlp = RewardMLP.from_state(load_state(path, "aesthetic"), "aesthetic")
    transform = open_clip.image_transform(clip.visual.image_size, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD,
                                          resize_mode="shortest")
    return clip.eval().to(device), mlp.to(device), transform


@register_metric("aesthetic", order=63, reward="laion_aesthetic",
    source="Schuhmann, LAION improved aesthetic predictor v2 (github.com/christophschuhmann/improved-aesthetic-predictor)",
    weights="sac+logos+ava1-l14-linearMSE.pth (MLP) on OpenAI CLIP ViT-L/14, local files",
    license="Apache-2.0 (repository); OpenAI CLIP: MIT",
    columns=(
    {"key": "aesthetic", "header": "Aesthetic ↑", "decimals": 3, "direction": "higher", "show_ci": True,
     "main": False, "title": "LAION aesthetic score ↑"},))
class Aesthetic(PreferenceScore):
    """LAION aesthetic predictor v2 per image: MLP(CLIP ViT-L/14 image embedding / its norm), averaged with a 95% CI.
    Weights: ``path`` = sac+logos+ava1-l14-linearMSE.pth, ``clip_pretrained`` = the OpenAI ViT-L/14 open_clip file."""

    uses_text = False  # an image-only score

    Config = AestheticConfig

    @classmethod
    def check(cls, prompts, where, evaluators_kind, config=None):
        config = config or AestheticConfig()
        require_file("aesthetic", "path", config.path, "sac+logos+ava1-l14-linearMSE.pth")
        require_file("aesthetic", "clip_pretrained", config.clip_pretrained, "OpenAI CLIP ViT-L/14 (open_clip)")

    def setup(self):
        c = self.config
        self.clip, self.mlp, self.transform = load_aesthetic(c.clip_model, c.clip_pretrained, c.path,
                                                             str(self.evaluators.device))

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """The predicted rating [n] of preprocessed images x [n, 3, S, S]."""
        emb = self.clip.encode_image(x, normalize=True)
        return self.mlp(emb)[:, 0]


    def protocol(self):
        c = self.config
        return {"model": f"open_clip {c.clip_model} + LAION aesthetic MLP v2", "weights_sha256": weights_sha256(c.path),
                "clip_sha256": weights_sha256(c.clip_pretrained),
                "preprocessing": "8-bit PIL; shortest side bicubic to 224, centre crop; OpenAI mean/std",
                "score": "MLP(normalised CLIP image embedding)", "dtype": "float32"}
