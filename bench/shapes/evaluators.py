"""Frozen evaluator networks of the shapes world. No method may ever train against these.

* ``AttributeNet``: per position slot, predicts the shape (or empty), colour and size of the object
  there, plus the image's degradation (clean / blurred / noisy). Gives compositional accuracy; its
  penultimate features are the FID feature space.
* ``TinyCLIP``: open_clip's CLIP model code with a custom tiny config, trained contrastively on
  (render, caption) pairs. Gives CLIP score = 100·max(cos, 0).

Both are trained on ground-truth renders of the world's train split only (`flashbench
train-evaluators`, ``bench.shapes.train_evaluators``); weights ship as safetensors with their sha256,
which goes into every result. ``ShapesEvaluators`` puts them behind the ``Evaluators`` interface.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.metrics.cell import measure
from bench.metrics.base import CHUNK, in_fixed_chunks
from bench.metrics.evaluators import Evaluators
from bench.metrics.fid import Reference, cached_reference
from bench.shapes import ASSETS, world
from bench.shapes.text import WordTokenizer
from core import io

FEATURE_DIM = 64
N_SLOTS = len(world.POSITIONS)
DEGRADATIONS = ("clean", "blurred", "noisy")
ATTRIBUTES = ("color", "shape", "size", "position", "count")


class AttributeNet(nn.Module):
    """Small CNN: images [N, 3, 16, 16] in [0, 1] -> per-slot attribute logits and 64-d features."""

    num_features = FEATURE_DIM  # torchmetrics' FID reads this instead of probing with a dummy input

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GELU(),  # 8x8
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GELU(),  # 4x4
            nn.Flatten(),
            nn.Linear(4 * w * 16, 256), nn.GELU(),
            nn.Linear(256, FEATURE_DIM), nn.GELU(),
        )
        self.shape_head = nn.Linear(FEATURE_DIM, N_SLOTS * (1 + len(world.SHAPES)))
        self.color_head = nn.Linear(FEATURE_DIM, N_SLOTS * len(world.COLORS))
        self.size_head = nn.Linear(FEATURE_DIM, N_SLOTS * len(world.SIZES))
        self.degradation_head = nn.Linear(FEATURE_DIM, len(DEGRADATIONS))
        # FID features are divided by this (the RMS per-dimension std of real-render features), so
        # FID is in units of the real data's own spread rather than of arbitrary activations
        self.register_buffer("feature_scale", torch.ones(()))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The FID feature extractor: images in [0, 1] -> [N, FEATURE_DIM] (scaled penultimate features)."""
        return self.features(images) / self.feature_scale

    @torch.no_grad()
    def calibrate(self, n: int = 4000) -> float:
        """Set feature_scale from renders of the train split (scenes no evaluation prompt uses)."""
        images = world.render(world.scenes("train", 900_000_000, n))
        f = self.features(images).double()
        self.feature_scale.fill_(float(f.var(0).mean().sqrt()))
        return float(self.feature_scale)

    def heads(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        n = feats.shape[0]
        return {
            "shape": self.shape_head(feats).view(n, N_SLOTS, -1),
            "color": self.color_head(feats).view(n, N_SLOTS, -1),
            "size": self.size_head(feats).view(n, N_SLOTS, -1),
            "degradation": self.degradation_head(feats),
        }

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per slot: shape index (0 = empty, else 1 + SHAPES index), colour and size indices."""
        h = self.heads(self.features(images))
        return {k: v.argmax(-1) for k, v in h.items()}


# --- tiny CLIP ---------------------------------------------------------------------------------

CLIP_TOKENIZER = WordTokenizer(max_tokens=20, eot=True)
CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": world.RESOLUTION, "patch_size": 4, "width": 96, "layers": 3, "head_width": 32,
                   "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 20, "vocab_size": CLIP_TOKENIZER.vocab_size, "width": 64, "heads": 2,
                 "layers": 2, "mlp_ratio": 2.0},
}


def build_clip() -> nn.Module:
    """open_clip's CLIP model with the custom tiny config above (word-level vocabulary)."""
    import open_clip

    return open_clip.CLIP(**CLIP_CONFIG)


class TinyCLIP(nn.Module):
    def __init__(self, model: nn.Module | None = None):
        super().__init__()
        self.model = model if model is not None else build_clip()
        # CLIP's usual per-channel normalisation, computed on renders of the train split
        self.register_buffer("mean", torch.tensor([0.33, 0.30, 0.30]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.22, 0.20, 0.22]).view(1, 3, 1, 1))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image((images - self.mean) / self.std), dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        ids, _ = CLIP_TOKENIZER(texts)
        return F.normalize(self.model.encode_text(ids.to(self.mean.device)), dim=-1)

    @torch.no_grad()
    def score(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Per-image CLIP score 100·max(cos, 0)."""
        cos = (self.encode_image(images) * self.encode_text(texts)).sum(-1)
        return 100.0 * cos.clamp(min=0)


# --- compositional checks ------------------------------------------------------------------------


def attribute_correctness(pred: dict[str, torch.Tensor], prompts) -> dict[str, np.ndarray]:
    """Per image: correct/total counts per attribute type and whole-prompt correctness.

    For each object the prompt names, at its position slot: position = something is there;
    shape/colour/size = something is there and it has that attribute. count = the number of
    occupied slots equals the number of objects named. accuracy = every check of the prompt holds.
    """
    n = len(prompts)
    out = {f"{a}_correct": np.zeros(n) for a in ATTRIBUTES}
    out.update({f"{a}_total": np.zeros(n) for a in ATTRIBUTES})
    out["whole"] = np.zeros(n)
    shape, color, size = pred["shape"].cpu(), pred["color"].cpu(), pred["size"].cpu()
    for i, p in enumerate(prompts):
        ok_all = True
        for o in p.objects:
            j = world.POSITIONS.index(o.position)
            present = bool(shape[i, j] > 0)
            checks = {
                "position": present,
                "shape": present and int(shape[i, j]) == 1 + world.SHAPES.index(o.shape),
                "color": present and int(color[i, j]) == world.COLOR_NAMES.index(o.color),
                "size": present and int(size[i, j]) == world.SIZES.index(o.size),
            }
            for a, ok in checks.items():
                out[f"{a}_correct"][i] += ok
                out[f"{a}_total"][i] += 1
                ok_all &= ok
        count_ok = int((shape[i] > 0).sum()) == len(p.objects)
        out["count_correct"][i] += count_ok
        out["count_total"][i] += 1
        out["whole"][i] = ok_all and count_ok
    return out


def real_images(prompts, variant: int = 0) -> torch.Tensor:
    """Renders [n, 3, 16, 16] in [0, 1] of the prompts' ground-truth scenes (`variant` picks the nuisance draw)."""
    scenes = [world.scene_of(p) for p in prompts]
    if any(s is None for s in scenes):
        raise ValueError("FID reference needs prompts with ground-truth scenes (shapes world)")
    return world.render(scenes, variant=variant)


REFERENCE_CHUNK = 500  # renders per chunk while building the reference


# --- behind the Evaluators interface -----------------------------------------------------------


class ShapesEvaluators(Evaluators):
    """The attribute network (FID features, compositional checks) and the tiny CLIP (CLIP score)."""

    kind = "shapes"
    attributes = ATTRIBUTES
    num_features = FEATURE_DIM

    def __init__(self, attr: AttributeNet, clip: TinyCLIP, cards: dict, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.attr, self.clip, self.cards = attr.to(self.device), clip.to(self.device), cards

    def _identity(self) -> dict:
        attr_sha = self.cards["attribute_net"]["sha256"]
        return {"kind": self.kind, "fid_feature": f"attribute_net.penultimate[{FEATURE_DIM}]",
                "fid_feature_sha256": attr_sha, "fid_resize": f"none (native {world.RESOLUTION} px)",
                "clip_model": "open_clip.CLIP(tiny shapes config)", "clip_sha256": self.cards["clip"]["sha256"],
                "clip_score": "100*max(cos,0)", "accuracy_net_sha256": attr_sha, "dtype": "fp32"}

    def clip_truncated(self, texts):
        return [i for i, cut in enumerate(CLIP_TOKENIZER(texts)[1]) if cut]

    def _fid_features(self, images):
        return self.attr(images)

    def feature_spaces(self):
        return {**super().feature_spaces(),
                "clip": {"width": int(self.clip.model.text_projection.shape[1]),
                         "network": "open_clip.CLIP(tiny shapes config).encode_image, L2-normalised",
                         "sha256": self.cards["clip"]["sha256"]}}

    def _features(self, space, images):
        if space == "clip":
            return self.clip.encode_image(images)
        return super()._features(space, images)

    def _clip_score(self, images, texts):
        return self.clip.score(images, texts)

    def attribute_checks(self, images, prompts):
        keys = ("shape", "color", "size")

        def predict(x):
            pred = self.attr.predict(x)
            return torch.stack([pred[k] for k in keys], -1)  # [n, slots, 3]

        stacked = in_fixed_chunks(predict, len(images), images, chunk=CHUNK)
        return attribute_correctness({k: stacked[..., i] for i, k in enumerate(keys)}, prompts)

    def reference(self, prompts, cache_dir: Path | None) -> Reference:
        """FID reference: real renders of the same prompts (the world's exact ground truth)."""
        ids = [(p.id, p.scene_seed) for p in prompts]
        key = io.content_hash({"prompts": ids, "evaluators": self.identity(), "variant": 0,
                               "resolution": world.RESOLUTION, "paired": True})
        source = {"kind": "renders of the prompts' scenes", "variant": 0, "prompts_sha256": io.content_hash(ids),
                  "paired": True}  # render i is prompt i's scene: the FID bootstrap resamples the pairs
        chunks = (self.all_features(real_images(prompts[i : i + REFERENCE_CHUNK]).to(self.device))
                  for i in range(0, len(prompts), REFERENCE_CHUNK))
        return cached_reference(key, source, chunks, FEATURE_DIM, cache_dir, self.feature_spaces())

    def real_variants(self, prompt, k):
        """Renders of the prompt's scene with k nuisance draws (variants 0..k-1): k real images of one caption."""
        scene = world.scene_of(prompt)
        return None if scene is None else torch.cat([world.render([scene], variant=v) for v in range(k)])

    def floor(self, prompts, reference: Reference, metrics=None, settings=None) -> dict:
        """Real-vs-real: renders of the same prompts with other nuisance draws, against the reference."""
        chunks = (real_images(prompts[i : i + REFERENCE_CHUNK], variant=1)
                  for i in range(0, len(prompts), REFERENCE_CHUNK))
        return measure(self, reference, prompts, chunks, REFERENCE_CHUNK, metrics, settings)


def load_evaluators(device: str | torch.device = "cpu", assets: Path = ASSETS) -> ShapesEvaluators:
    """The shipped evaluators, checked against the sha256 on their cards (WeightsError if missing or corrupt)."""
    attr_state, attr_card = io.load_safetensors_checked(assets / "attribute_net.safetensors",
                                                        assets / "attribute_net.json")
    clip_state, clip_card = io.load_safetensors_checked(assets / "clip.safetensors", assets / "clip.json")
    attr = AttributeNet()
    attr.load_state_dict(attr_state)
    clip = TinyCLIP()
    clip.load_state_dict(clip_state)
    for m in (attr, clip):
        m.eval().requires_grad_(False)
    return ShapesEvaluators(attr, clip, {"attribute_net": attr_card, "clip": clip_card}, device)
