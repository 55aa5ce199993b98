"""A tiny randomly initialised SD / SDXL-layout pipeline, written to disk in the test itself.

UNet, VAE, CLIP text encoder(s) and a character-level CLIP tokenizer built from configs and a
generated vocabulary: no downloads. Used to run every method through the latent code path.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


class RandomFeatures(nn.Module):
    """A random-weight stand-in for the FID network (clean-fid's Inception interface: 8-bit-range images in, 32
    features out; seeded), where a test needs real-scale metric code but not Inception's weights."""

    num_features = 32

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                 nn.Linear(32, 32))

    def forward(self, x):
        return self.net(x * 255)


def _tokenizer(dir_: Path) -> int:
    """The character-level CLIP tokenizer with a 24-token context (long prompts are cut); returns its size."""
    from bench.synthetic import clip_tokenizer

    return len(clip_tokenizer(dir_, model_max_length=24))


def build(root: Path, sdxl: bool = False, seed: int = 0, latent_size: int = 8, vae_blocks: int = 2) -> Path:
    """A tiny random SD (or SDXL) layout; images are latent_size * 2**(vae_blocks - 1) pixels square."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    root = Path(root)
    v = _tokenizer(root / "tokenizer")
    te_cfg = dict(vocab_size=v, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=24, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    CLIPTextModel(CLIPTextConfig(**te_cfg)).save_pretrained(root / "text_encoder", safe_serialization=True)
    cross = 16
    extra = {}
    if sdxl:
        _tokenizer(root / "tokenizer_2")
        CLIPTextModelWithProjection(CLIPTextConfig(**te_cfg, projection_dim=16)).save_pretrained(
            root / "text_encoder_2", safe_serialization=True)
        cross = 32
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=4,
                     projection_class_embeddings_input_dim=6 * 4 + 16)
    UNet2DConditionModel(sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                         cross_attention_dim=cross, attention_head_dim=4, norm_num_groups=8,
                         **extra).save_pretrained(root / "unet", safe_serialization=True)
    AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16, 16, 16)[:vae_blocks],
                  down_block_types=("DownEncoderBlock2D",) * vae_blocks, up_block_types=("UpDecoderBlock2D",) * vae_blocks,
                  latent_channels=4, norm_num_groups=4,
                  sample_size=latent_size * 2 ** (vae_blocks - 1)).save_pretrained(root / "vae", safe_serialization=True)
    # as SD 1.5 / SDXL publish it (clip_sample off: latents are not in [-1, 1])
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="epsilon",
                  clip_sample=False, steps_offset=1).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline" if sdxl
                                                       else "StableDiffusionPipeline"}))
    return root


def image_folder(root: Path, n: int = 8, resolution: int = 16) -> Path:
    """Real images (training data, FID references): shapes-world renders with their captions."""
    import numpy as np
    from PIL import Image

    from bench.shapes import world

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, s in enumerate(world.scenes("train", 0, n)):
        arr = (world.render_scene(s, resolution=resolution) * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(root / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": s.caption}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def fake_inception(root: Path) -> Path:
    """A random-weight stand-in for clean-fid's Inception file (same TorchScript interface, 2048-d)."""
    from torch import nn

    class Fake(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Conv2d(3, 2048, 13, stride=13), nn.AdaptiveAvgPool2d(1))

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.jit.script(Fake()).save(str(root / "inception-2015-12-05.pt"))
    return root


def tiny_open_clip(root: Path) -> tuple[str, str]:
    """A tiny open_clip model config registered under a test name, with random weights as safetensors."""
    import open_clip
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = "flashbench-test-tiny-clip"
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    (root / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root / f"{name}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(name)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "clip.safetensors"))
    return name, str(root / "clip.safetensors")


def load_folder(root: Path) -> torch.Tensor:
    from bench.real import folder_images, load_images

    return load_images(folder_images(root))


def make_loras(sd: Path, out: Path) -> Path:
    """The same random LoRA for a tiny SD UNet in two key layouts, plus a zero (no-op) one:
    lora_peft (diffusers/peft names), lora_kohya (``lora_unet_…`` with lora_down/lora_up/alpha), lora_zero."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(1)
    weights = {k: (torch.randn_like(v) * 0.5).contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    save_file({f"unet.{k}": v for k, v in weights.items()}, str(out / "lora_peft.safetensors"))
    save_file({f"unet.{k}": torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()},
              str(out / "lora_zero.safetensors"))
    kohya = {}
    for k, v in weights.items():
        module, which = k.rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_down.weight" if which.startswith("A") else f"{name}.lora_up.weight"] = v
        kohya[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(kohya, str(out / "lora_kohya.safetensors"))
    return out


def real_fixtures(out: Path) -> Path:
    """Real-scale stand-ins: a tiny SD pipeline (sd/), clean-fid's Inception file (inception/), an open_clip
    "local-dir:" model (clip/) and 8 reference PNGs of 16 px (ref16/)."""
    import open_clip
    from safetensors.torch import save_file

    out = Path(out)
    build(out / "sd")
    fake_inception(out / "inception")
    clip = out / "clip"
    clip.mkdir(parents=True, exist_ok=True)
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    (clip / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in open_clip.CLIP(**cfg).state_dict().items()},
              str(clip / "open_clip_model.safetensors"))
    image_folder(out / "ref16", 8)
    return out
