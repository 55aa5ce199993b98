"""Stable Diffusion 1.x / 2.x: a UNet (ε- or v-prediction) over SD's VAE latents, conditioned on one CLIP text
encoder's last hidden states, as diffusers' ``StableDiffusionPipeline``."""

from __future__ import annotations

import dataclasses

import torch

from methods.backbone import Cond
from methods.backbones import register_backbone
from methods.backbones.directory import DirectoryBackbone, DirectorySettings
from methods.diffusion import Schedule


@dataclasses.dataclass
class UNetSettings(DirectorySettings):
    """``[backbone]`` settings of the UNet families (SD, SDXL)."""

    channels_last: bool = False  # the UNet's memory format


@register_backbone("sd", pipelines=("StableDiffusionPipeline",))
class StableDiffusionBackbone(DirectoryBackbone):
    """Stable Diffusion 1.x / 2.x (one CLIP text encoder, a UNet on 4-channel latents)."""

    Settings = UNetSettings
    denoiser = "unet"
    encoder_names = ("text_encoder",)

    @classmethod
    def conventions(cls, settings) -> dict[str, dict]:
        """StableDiffusionPipeline's ``guidance_scale = 7.5`` (CFG); LCM/progressive guidance ranges as diffusers'
        train_lcm_distill_sd_wds.py (w ∈ [5, 15] in Imagen's form, + 1 in this bench's guidance_scale form)."""
        return {"*": {"guidance": "cfg", "guidance_scale": 7.5}, "lcm": {"w_min": 6.0, "w_max": 16.0},
                "progressive": {"w_min": 6.0, "w_max": 16.0}}

    def load_components(self, kw: dict) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTokenizer

        self.net = UNet2DConditionModel.from_pretrained(self.path, subfolder="unet", **kw)
        if self.vae_path is None:
            self.vae = AutoencoderKL.from_pretrained(self.path, subfolder="vae", **kw)
        self.tokenizers = [CLIPTokenizer.from_pretrained(self.path, subfolder=n.replace("text_encoder", "tokenizer"),
                                                         local_files_only=True) for n in self.encoder_names]
        self.text_encoders = self.load_text_encoders(kw)

    def load_text_encoders(self, kw: dict) -> list:
        from transformers import CLIPTextModel

        return [CLIPTextModel.from_pretrained(self.path, subfolder="text_encoder", **kw)]

    def setup(self) -> None:
        from diffusers import DDPMScheduler

        self.schedule = Schedule.from_diffusers(DDPMScheduler.from_config(self.scheduler_config))
        self.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (int(self.net.config.in_channels), self.latent_size, self.latent_size)

    def truncated(self, texts: list[str]) -> dict[str, list[int]]:
        out = {}
        for name, tok in zip(self.encoder_names, self.tokenizers):
            lengths = [len(ids) for ids in tok(texts, padding=False, truncation=False)["input_ids"]]
            out[name] = [i for i, n in enumerate(lengths) if n > tok.model_max_length]
        return out

    def encoder_outputs(self, texts: list[str]):
        """Each text encoder's output for `texts` (padded to its context, truncated), on the device."""
        outs = []
        with self.on_device(*self.text_encoders):
            for tok, enc in zip(self.tokenizers, self.text_encoders):
                ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="pt").input_ids.to(enc.device)
                outs.append(enc(ids, output_hidden_states=True))
        return outs

    @torch.no_grad()
    def encode_text(self, texts: list[str], micro: torch.Tensor | None = None) -> Cond:
        """The text encoder's last hidden states [B, 77, D] (the empty prompt encoded as a prompt, as the SD pipeline
        encodes its negative prompt). `micro` is unused."""
        return Cond(self.encoder_outputs(texts)[0].last_hidden_state.to(self.device))
