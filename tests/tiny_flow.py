"""Tiny randomly initialised SD3 and FLUX.1 pipelines, written to disk in the test itself (seconds, no downloads).

Transformer, VAE (16-channel-style with scaling and shift factors, here 4 channels), CLIP text encoder(s) with the
character-level CLIP tokenizer of ``tiny_sd`` and a T5 encoder with a Unigram tokenizer made with the
``tokenizers`` library (wrapped as ``T5TokenizerFast``), plus the scheduler configs the real model cards ship.
Images are 16 px (latent 8, VAE factor 2).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.tiny_sd import _tokenizer as clip_tokenizer

LATENT_CHANNELS = 4
RESOLUTION = 16  # pixels (latent 8 × VAE factor 2)
T5_DIM = 32


def t5_tokenizer(dir_: Path) -> int:
    """The character-level T5 tokenizer saved to `dir_`; returns its size."""
    from bench.synthetic import t5_tokenizer as build

    return len(build(dir_))


def _clip_config(vocab: int, **extra) -> dict:
    return dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=24, bos_token_id=0, eos_token_id=1, pad_token_id=1, **extra)


def _t5(root: Path, folder: str, tok_folder: str) -> None:
    from transformers import T5Config, T5EncoderModel

    v = t5_tokenizer(root / tok_folder)
    T5EncoderModel(T5Config(vocab_size=v, d_model=T5_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).save_pretrained(
        root / folder, safe_serialization=True)


def _vae(root: Path) -> None:
    from diffusers import AutoencoderKL

    AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=LATENT_CHANNELS,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=4, sample_size=RESOLUTION, scaling_factor=1.5035, shift_factor=0.0609,
                  use_quant_conv=False, use_post_quant_conv=False).save_pretrained(root / "vae", safe_serialization=True)


def build_sd3(root: Path, seed: int = 0, shift: float = 3.0) -> Path:
    """A tiny SD3/SD3.5 layout: SD3Transformer2DModel (patch 2), CLIP-L + CLIP-G with projection, T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    root = Path(root)
    for enc, tok in [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")]:
        v = clip_tokenizer(root / tok)
        CLIPTextModelWithProjection(CLIPTextConfig(**_clip_config(v, projection_dim=16))).save_pretrained(
            root / enc, safe_serialization=True)
    _t5(root, "text_encoder_3", "tokenizer_3")
    SD3Transformer2DModel(sample_size=RESOLUTION // 2, patch_size=2, in_channels=LATENT_CHANNELS, num_layers=2,
                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_DIM,
                          caption_projection_dim=16, pooled_projection_dim=32, out_channels=LATENT_CHANNELS,
                          pos_embed_max_size=16).save_pretrained(root / "transformer", safe_serialization=True)
    _vae(root)
    FlowMatchEulerDiscreteScheduler(shift=shift).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    return root


def build_flux(root: Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A tiny FLUX.1 layout: FluxTransformer2DModel (2×2-packed latents), CLIP-L (pooled) and T5.

    ``guidance_embeds`` True is FLUX.1-dev's (guidance embedding, dynamic shifting), False FLUX.1-schnell's
    (shift 1, no dynamic shifting), as their scheduler configs ship.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    root = Path(root)
    v = clip_tokenizer(root / "tokenizer")
    CLIPTextModel(CLIPTextConfig(**_clip_config(v))).save_pretrained(root / "text_encoder", safe_serialization=True)
    _t5(root, "text_encoder_2", "tokenizer_2")
    FluxTransformer2DModel(patch_size=1, in_channels=LATENT_CHANNELS * 4, num_layers=2, num_single_layers=1,
                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_DIM,
                           pooled_projection_dim=16, guidance_embeds=guidance_embeds,
                           axes_dims_rope=(4, 4, 8)).save_pretrained(root / "transformer", safe_serialization=True)
    _vae(root)
    if guidance_embeds:
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    else:
        sched = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    sched.save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    return root


def flux_lora(flux: Path, out: Path, seed: int = 1) -> Path:
    """A random LoRA (peft, rank 2) on the tiny FLUX transformer's attention projections, saved as FluxPipeline
    writes LoRAs (``transformer.``-prefixed diffusers/peft keys)."""
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tf = FluxTransformer2DModel.from_pretrained(flux, subfolder="transformer")
    tf.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(seed)
    weights = {k: (torch.randn_like(v) * 0.5).contiguous() for k, v in get_peft_model_state_dict(tf).items()}
    save_file({f"transformer.{k}": v for k, v in weights.items()}, str(out / "flux_lora.safetensors"))
    return out / "flux_lora.safetensors"
