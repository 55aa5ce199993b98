"""FLUX.1 (dev and schnell): a flow transformer on 16-channel latents packed into 2×2 tokens, conditioned on T5
states and CLIP-L's pooled embedding; FLUX.1-dev also on a distilled guidance scale (its guidance embedding), as
diffusers' ``FluxPipeline``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from methods.backbones import register_backbone
from methods.backbones.flow import FlowBackbone, FlowNet, FlowSettings

FLUX_MAX_SEQUENCE_LENGTH = {"dev": 512, "schnell": 256}  # T5 tokens, as the model cards use them
DEFAULT_EMBEDDED_GUIDANCE = 3.5  # FluxPipeline's guidance_scale default (guidance-embedded FLUX.1-dev)
FLUX_RESOLUTION = 1024  # FluxPipeline's default image side (pixels)


@dataclasses.dataclass
class FluxSettings(FlowSettings):
    """``[backbone]`` settings of FLUX.1."""

    embedded_guidance: float = DEFAULT_EMBEDDED_GUIDANCE  # the guidance embedding's scale when a method gives none

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.embedded_guidance < 100:
            raise ValueError(f"embedded_guidance must be a guidance scale in [0, 100), got {self.embedded_guidance}")


class FluxNet(FlowNet):
    """FLUX's transformer called as FluxPipeline calls it: latents packed into 2×2 tokens with their img_ids / txt_ids
    (diffusers' own pack/unpack), t/1000; a guidance-embedded network called without ``guidance`` gets
    ``default_guidance``."""

    patch_size = 2

    def call(self, x, t, states, pooled, guidance):
        from diffusers import FluxPipeline

        b, c, h, w = x.shape
        if not self.guidance_embeds:
            guidance = None
        elif guidance is None:
            guidance = torch.full((b,), self.default_guidance, dtype=torch.float32, device=x.device)
        tokens = FluxPipeline._pack_latents(x, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        txt_ids = torch.zeros(states.shape[1], 3, device=x.device, dtype=x.dtype)
        out = self.transformer(hidden_states=tokens, timestep=t / 1000, guidance=guidance, pooled_projections=pooled,
                               encoder_hidden_states=states, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, h, w, 1)


def guidance_embedded(path: Path) -> bool:
    """Whether a FLUX directory's transformer has a guidance embedding (FLUX.1-dev), from its config alone."""
    try:
        return bool(json.loads((Path(path) / "transformer" / "config.json").read_text()).get("guidance_embeds"))
    except (OSError, json.JSONDecodeError):
        return False


@register_backbone("flux", pipelines=("FluxPipeline",))
class FluxBackbone(FlowBackbone):
    """FLUX.1 dev / schnell (flow transformer; CLIP-L pooled + T5-XXL; guidance embedding on dev)."""

    Settings = FluxSettings
    Net = FluxNet
    pipeline_name = "FluxPipeline"
    transformer_name = "FluxTransformer2DModel"
    encoder_names = ("text_encoder", "text_encoder_2")
    encoder_classes = ("CLIPTextModel", "T5EncoderModel")
    tokenizer_classes = ("CLIPTokenizer", "T5TokenizerFast")
    linear_sigmas = True

    @classmethod
    def conventions(cls, settings) -> dict[str, dict]:
        """FluxPipeline's defaults: FLUX.1-dev guides through its embedding at ``guidance_scale = 3.5`` (1 NFE per
        step); FLUX.1-schnell is unguided. For the teacher only: distillations keep their own target guidance."""
        if guidance_embedded(Path(settings.path)):
            return {"teacher": {"guidance": "embedded", "guidance_scale": settings.embedded_guidance}}
        return {"teacher": {"guidance": "none"}}

    def default_max_sequence_length(self) -> int:
        return FLUX_MAX_SEQUENCE_LENGTH["dev" if self.guidance_embeds else "schnell"]

    def default_resolution(self) -> int:
        return FLUX_RESOLUTION

    def default_guidance(self) -> float:
        return float(self.settings.embedded_guidance)

    def identity_extra(self) -> dict:
        return {**super().identity_extra(),
                "embedded_guidance": self.settings.embedded_guidance if self.guidance_embeds else None}

    def encode_prompt(self, texts, max_sequence_length):
        states, pooled, _ = self._pipe.encode_prompt(prompt=texts, prompt_2=None, device=self.text_encoders[0].device,
                                                     max_sequence_length=max_sequence_length)
        return states, pooled
