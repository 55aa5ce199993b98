"""Stable Diffusion 3 / 3.5: an MMDiT (``SD3Transformer2DModel``) predicting the flow velocity on 16-channel
latents, conditioned on CLIP-L + CLIP-G penultimate states and T5 (padded to one width) and both CLIPs' pooled
projections, as diffusers' ``StableDiffusion3Pipeline``."""

from __future__ import annotations

from methods.backbones import register_backbone
from methods.backbones.flow import FlowBackbone, FlowNet

SD3_MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default T5 tokens
SD3_GUIDANCE_SCALE = 7.0  # StableDiffusion3Pipeline.__call__'s default


class SD3Net(FlowNet):
    """SD3's transformer called as StableDiffusion3Pipeline calls it (t = σ·1000, no packing)."""

    def call(self, x, t, states, pooled, guidance):
        return self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=states, pooled_projections=pooled,
                                return_dict=False)[0]


@register_backbone("sd3", pipelines=("StableDiffusion3Pipeline",))
class SD3Backbone(FlowBackbone):
    """Stable Diffusion 3 / 3.5 (MMDiT; CLIP-L, CLIP-G and T5-XXL; rectified flow with shift)."""

    Net = SD3Net
    pipeline_name = "StableDiffusion3Pipeline"
    transformer_name = "SD3Transformer2DModel"
    encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    encoder_classes = ("CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel")
    tokenizer_classes = ("CLIPTokenizer", "CLIPTokenizer", "T5TokenizerFast")

    @classmethod
    def conventions(cls, settings) -> dict[str, dict]:
        """StableDiffusion3Pipeline's ``guidance_scale = 7.0`` (CFG). (Model cards often ask for less: SD3.5-Large's
        gives 3.5; set guidance_scale in the suite to follow a card.)"""
        return {"*": {"guidance": "cfg", "guidance_scale": SD3_GUIDANCE_SCALE}}

    def default_max_sequence_length(self) -> int:
        return SD3_MAX_SEQUENCE_LENGTH

    def encode_prompt(self, texts, max_sequence_length):
        states, _, pooled, _ = self._pipe.encode_prompt(prompt=texts, prompt_2=None, prompt_3=None,
                                                        device=self.text_encoders[0].device,
                                                        do_classifier_free_guidance=False,
                                                        max_sequence_length=max_sequence_length)
        return states, pooled
