"""ImageReward v1.0 (Xu et al. 2023, github.com/THUDM/ImageReward): BLIP's ViT-L image encoder, its BERT text encoder
cross-attending to the image tokens, an MLP on the [CLS] output, normalised by the shipped mean and std.

The ``image-reward`` package (1.5) does not install beside this project: it pins timm 0.6.13 (open_clip needs
timm >= 1.0.17) and its BLIP code imports helpers transformers 5 no longer has. The network is rebuilt here from
transformers' BLIP classes, which are BLIP's own modules ported (transformers' BLIP conversion script maps the same
keys): ``BlipVisionModel`` is BLIP's ViT (fused qkv, final LayerNorm on every token), ``BlipTextModel`` with
``is_decoder=False`` is BLIP's ``BertModel`` in its multimodal mode (bidirectional self-attention, cross-attention in
every layer, no token-type embeddings). The checkpoint's keys are renamed (``blip_vision_keys``) and loaded strictly,
so a key that does not map fails loudly. Not verified here against the package's own numbers (no weights offline).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re

import torch

from bench.metrics.preference import (OPENAI_MEAN, OPENAI_STD, PreferenceScore, RewardMLP, load_state, require_file,
                                      weights_sha256)
from bench.metrics.registry import register_metric
from core.errors import UserError

REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py: rewards = (mlp - mean) / std
MAX_TOKENS = 35  # ImageReward.score: padding="max_length", truncation=True, max_length=35


@dataclasses.dataclass
class ImageRewardConfig:
    path: str = ""  # ImageReward.pt: the state dict of ImageReward (blip.visual_encoder.*, blip.text_encoder.*, mlp.*)
    med_config: str = ""  # med_config.json shipped with it (BLIP's BERT config)
    tokenizer: str = ""  # a local copy of bert-base-uncased's tokenizer files (BLIP's init_tokenizer)


# BLIP ViT (timm layout) -> transformers BlipVisionModel
_VISION_RENAMES = ((r"^cls_token$", "embeddings.class_embedding"), (r"^pos_embed$", "embeddings.position_embedding"),
                   (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
                   (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
                   (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
                   (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
                   (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
                   (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."), (r"^norm\.", "post_layernorm."))


def blip_vision_keys(state: dict) -> dict:
    """BLIP's ViT state dict (``blocks.N.attn.qkv`` ...) with transformers ``BlipVisionModel`` names; a key no rule
    matches is kept as it is (strict loading then names it)."""
    out = {}
    for k, v in state.items():
        for pattern, repl in _VISION_RENAMES:
            if re.search(pattern, k):
                k = re.sub(pattern, repl, k)
                break
        out[k] = v
    return out


def vision_config(vision: dict):
    """The BlipVisionConfig of BLIP's ViT weights (already renamed): width, depth, patch and image size from the shapes;
    heads = width / 64 (BLIP's ViT-B: 12, ViT-L: 16); LayerNorm eps 1e-6 (BLIP's ViT)."""
    from transformers import BlipVisionConfig

    width = vision["embeddings.class_embedding"].shape[-1]
    patch = vision["embeddings.patch_embedding.weight"].shape[-1]
    grid = math.isqrt(vision["embeddings.position_embedding"].shape[1] - 1)
    depth = 1 + max(int(m.group(1)) for k in vision if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    return BlipVisionConfig(hidden_size=width, intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
                            num_hidden_layers=depth, num_attention_heads=max(1, width // 64), image_size=grid * patch,
                            patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-6)


def text_config(med: dict, encoder_width: int):
    """The BlipTextConfig of BLIP's med_config.json (a BERT config with cross-attention), cross-attending to
    `encoder_width` image features (BLIP_Pretrain sets encoder_width = the ViT's width)."""
    from transformers import BlipTextConfig

    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
            "max_position_embeddings", "layer_norm_eps", "pad_token_id")
    return BlipTextConfig(**{k: med[k] for k in keys if k in med}, encoder_hidden_size=encoder_width, is_decoder=True,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _load_strict(net, state: dict, what: str) -> None:
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"metric 'image_reward': ImageReward.pt does not fit the {what} ({len(missing)} keys missing, "
                        f"{len(unexpected)} unexpected, e.g. {(missing or unexpected)[0]})")


@functools.cache
def load_image_reward(path: str, med_config: str, tokenizer: str, device: str):
    """(vision, text, mlp, tokenizer, transform) in eval mode on `device`, from local files; once per process."""
    from torchvision import transforms as T
    from transformers import BertTokenizer, BlipTextModel, BlipVisionModel

    state = load_state(path, "image_reward")
    sub = lambda prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
    vision_state = blip_vision_keys(sub("blip.visual_encoder."))
    text_state = {k: v for k, v in sub("blip.text_encoder.").items() if not k.endswith("position_ids")}
    if "embeddings.class_embedding" not in vision_state or not text_state:
        raise UserError(f"metric 'image_reward': {path} holds no blip.visual_encoder / blip.text_encoder weights; "
                        "give ImageReward.pt (THUDM/ImageReward)")
    vcfg = vision_config(vision_state)
    vision = BlipVisionModel(vcfg)
    _load_strict(vision, vision_state, "BLIP ViT")
    with open(med_config, encoding="utf-8") as f:
        text = BlipTextModel(text_config(json.load(f), vcfg.hidden_size), add_pooling_layer=False)
    _load_strict(text, text_state, "BLIP text encoder")
    mlp = RewardMLP.from_state(state, "image_reward", prefix="mlp.")
    tok = BertTokenizer.from_pretrained(tokenizer, local_files_only=True)  # BLIP's init_tokenizer:
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    transform = T.Compose([T.Resize(vcfg.image_size, interpolation=T.InterpolationMode.BICUBIC),
                           T.CenterCrop(vcfg.image_size), T.ToTensor(), T.Normalize(OPENAI_MEAN, OPENAI_STD)])
    return vision.eval().to(device), text.eval().to(device), mlp.to(device), tok, transform


@register_metric("image_reward", order=62, reward="image_reward",
    source="Xu et al. 2023 (ImageReward, NeurIPS); github.com/THUDM/ImageReward ImageReward.score",
    weights="ImageReward.pt (BLIP ViT-L + MLP head), med_config.json, a bert-base-uncased tokenizer, local files",
    license="Apache-2.0 (repository)",
    columns=(
    {"key": "image_reward", "header": "ImageReward ↑", "decimals": 3, "direction": "higher", "show_ci": True,
     "main": False, "title": "ImageReward ↑"},))
class ImageReward(PreferenceScore):
    """ImageReward v1.0 per image: (MLP(text encoder's [CLS] | image) − mean) / std, averaged with a 95% CI. Weights:
    ``path`` = ImageReward.pt, ``med_config`` = med_config.json, ``tokenizer`` = bert-base-uncased directory."""

    Config = ImageRewardConfig

    @classmethod
    def check(cls, prompts, where, evaluators_kind, config=None):
        config = config or ImageRewardConfig()
        require_file("image_reward", "path", config.path, "ImageReward.pt")
        require_file("image_reward", "med_config", config.med_config, "med_config.json")
        require_file("image_reward", "tokenizer", config.tokenizer, "bert-base-uncased tokenizer", directory=True)

    def setup(self):
        c = self.config
        self.vision, self.text, self.mlp, self.tokenizer, self.transform = load_image_reward(
            c.path, c.med_config, c.tokenizer, str(self.evaluators.device))

    def score(self, x: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """The normalised reward [n] of preprocessed images x [n, 3, S, S] and their prompts (ImageReward.score)."""
        tok = self.tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        image_embeds = self.vision(pixel_values=x).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=x.device)
        out = self.text(input_ids=tok["input_ids"].to(x.device), attention_mask=tok["attention_mask"].to(x.device),
                        encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts, is_decoder=False)
        return (self.mlp(out.last_hidden_state[:, 0].float())[:, 0] - REWARD_MEAN) / REWARD_STD


    def protocol(self):
        c = self.config
        return {"model": "ImageReward v1.0 (BLIP ViT-L + BERT, transformers Blip classes)",
                "weights_sha256": weights_sha256(c.path), "med_config_sha256": weights_sha256(c.med_config),
                "tokenizer_sha256": weights_sha256(c.tokenizer),
                "preprocessing": "8-bit PIL; shortest side bicubic to 224, centre crop; OpenAI mean/std; 35 tokens",
                "score": f"(MLP(CLS) - {REWARD_MEAN}) / {REWARD_STD}", "dtype": "float32"}
