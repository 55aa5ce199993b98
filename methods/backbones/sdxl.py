"""Stable Diffusion XL: a UNet over 4-channel latents conditioned on two CLIP encoders' penultimate states, the
second's pooled embedding and the micro-conditioning time ids, as diffusers' ``StableDiffusionXLPipeline``."""

from __future__ import annotations

import torch

from methods.backbone import Cond
from methods.backbones import register_backbone
from methods.backbones.sd import StableDiffusionBackbone


@register_backbone("sdxl", pipelines=("StableDiffusionXLPipeline",))
class SDXLBackbone(StableDiffusionBackbone):
    """Stable Diffusion XL (CLIP-L + OpenCLIP-bigG, pooled text and size/crop conditioning)."""

    encoder_names = ("text_encoder", "text_encoder_2")
    micro_conditioning = True

    @classmethod
    def conventions(cls, settings) -> dict[str, dict]:
        """StableDiffusionXLPipeline's ``guidance_scale = 5.0`` (CFG); LCM/progressive guidance ranges as diffusers'
        train_lcm_distill_lora_sdxl_wds.py (w ∈ [3, 15] in Imagen's form, + 1 in this bench's form)."""
        return {"*": {"guidance": "cfg", "guidance_scale": 5.0}, "lcm": {"w_min": 4.0, "w_max": 16.0},
                "progressive": {"w_min": 4.0, "w_max": 16.0}}

    def load_text_encoders(self, kw: dict) -> list:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        return [CLIPTextModel.from_pretrained(self.path, subfolder="text_encoder", **kw),
                CLIPTextModelWithProjection.from_pretrained(self.path, subfolder="text_encoder_2", **kw)]

    def default_vae_dtype(self) -> torch.dtype:
        """fp32 where an fp16 VAE would overflow (its config's force_upcast), as the SDXL pipeline decodes."""
        if self.dtype == torch.float16 and self.vae.config.get("force_upcast", False):
            return torch.float32
        return self.dtype

    @torch.no_grad()
    def encode_text(self, texts: list[str], micro: torch.Tensor | None = None) -> Cond:
        """Both encoders' penultimate states [B, 77, 768 + 1280], the second's pooled embedding, zeros for the empty
        prompt, and time_ids (original size, crop corner, target size): `micro`'s [B, 4] per image in training,
        (R, R, 0, 0, R, R) otherwise, as diffusers' SDXL pipeline."""
        outs = self.encoder_outputs(texts)
        h = torch.cat([o.hidden_states[-2].to(self.device) for o in outs], dim=-1)
        pooled = outs[-1].text_embeds.to(self.device)
        empty = torch.tensor([t == "" for t in texts], device=self.device)
        h = torch.where(empty[:, None, None], torch.zeros_like(h), h)  # SDXL: zeros for the empty prompt
        pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        r = self.resolution
        if micro is None:
            time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=h.dtype, device=self.device).repeat(len(texts), 1)
        else:
            target = torch.tensor([[r, r]], dtype=micro.dtype).repeat(len(texts), 1)
            time_ids = torch.cat([micro, target], 1).to(self.device, h.dtype)
        return Cond(h, {"text_embeds": pooled, "time_ids": time_ids})
