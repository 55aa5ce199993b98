"""Real-scale teachers: an SD 1.x / 2.x or SDXL pipeline from a local diffusers directory.

Loads the UNet, VAE, text encoder(s), tokenizer(s) and scheduler config with
``local_files_only=True`` and safetensors only (no hub access, nothing unpickled), and exposes the
same Backbone interface as the shapes teacher, in latent space: every method trains and samples
on it unchanged. Prompts longer than the text encoder's context are truncated and recorded.

Real training images (for methods that use real data) come from an image folder with a
``metadata.jsonl`` of ``{"file_name", "text"}`` rows (the Hugging Face imagefolder convention).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from core.errors import UserError
from core.io import sha256_file
from methods.backbone import Backbone, Cond
from methods.diffusion import Schedule


class ImageFolderData:
    """(image, caption) pairs from a local folder with metadata.jsonl; images resized to `resolution`."""

    def __init__(self, root: Path, resolution: int):
        from PIL import Image

        self.root, self.resolution, self._Image = Path(root), resolution, Image
        meta = self.root / "metadata.jsonl"
        if not meta.is_file():
            raise UserError(f"training data {root} has no metadata.jsonl ({{\"file_name\", \"text\"}} per line)")
        self.rows = []
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if line.strip():
                try:
                    d = json.loads(line)
                    self.rows.append((d["file_name"], d["text"]))
                except (json.JSONDecodeError, KeyError):
                    raise UserError(f"{meta.name}:{n}: expected a JSON object with file_name and text") from None
        if not self.rows:
            raise UserError(f"{meta} lists no images")

    def __call__(self, n: int, step: int):
        import numpy as np

        imgs, caps = [], []
        for i in range(n):
            f, text = self.rows[(step * n + i) % len(self.rows)]
            im = self._Image.open(self.root / f).convert("RGB").resize((self.resolution,) * 2)
            imgs.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
            caps.append(text)
        return torch.stack(imgs), caps


class DiffusersBackbone(Backbone):
    """An SD/SDXL layout behind the Backbone interface (latent space)."""

    def __init__(self, path: Path, device: str | torch.device = "cpu", train_data=None, dtype=torch.float32):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        self.path = Path(path)
        if not (self.path / "unet").is_dir() or not (self.path / "vae").is_dir():
            raise UserError(f"{path} is not a diffusers SD/SDXL directory (needs unet/, vae/, text_encoder/, "
                            "tokenizer/, scheduler/)")
        self.device = torch.device(device)
        kw = {"local_files_only": True, "use_safetensors": True}
        self.unet = UNet2DConditionModel.from_pretrained(self.path, subfolder="unet", torch_dtype=dtype, **kw)
        self.vae = AutoencoderKL.from_pretrained(self.path, subfolder="vae", torch_dtype=dtype, **kw)
        self.tokenizers = [CLIPTokenizer.from_pretrained(self.path, subfolder="tokenizer", local_files_only=True)]
        self.text_encoders = [CLIPTextModel.from_pretrained(self.path, subfolder="text_encoder", torch_dtype=dtype,
                                                            **kw)]
        self.sdxl = (self.path / "text_encoder_2").is_dir()
        if self.sdxl:
            self.tokenizers.append(CLIPTokenizer.from_pretrained(self.path, subfolder="tokenizer_2",
                                                                 local_files_only=True))
            self.text_encoders.append(CLIPTextModelWithProjection.from_pretrained(
                self.path, subfolder="text_encoder_2", torch_dtype=dtype, **kw))
        for m in [self.unet, self.vae, *self.text_encoders]:
            m.to(self.device).eval().requires_grad_(False)
        sched = json.loads((self.path / "scheduler" / "scheduler_config.json").read_text())
        self.scheduler_config = {k: v for k, v in sched.items() if not k.startswith("_")}
        from diffusers import DDPMScheduler

        self.schedule = Schedule.from_diffusers(DDPMScheduler.from_config(self.scheduler_config))
        self.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        self.scaling = float(self.vae.config.scaling_factor)
        self.resolution = int(self.unet.config.sample_size) * 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.train_data = train_data
        self.truncated: dict[str, bool] = {}

    @classmethod
    def load(cls, path, device="cpu", train_data: Path | None = None) -> DiffusersBackbone:
        bb = cls(path, device)
        if train_data is not None:
            bb.train_data = ImageFolderData(train_data, bb.resolution)
        return bb

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        s = int(self.unet.config.sample_size)
        return (int(self.unet.config.in_channels), s, s)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Cond:
        states, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.text_encoders):
            full = tok(texts, padding=False, truncation=False)["input_ids"]
            for t, ids in zip(texts, full):
                self.truncated[t] = len(ids) > tok.model_max_length
            ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            out = enc(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2] if self.sdxl else out.last_hidden_state)
            if self.sdxl and hasattr(out, "text_embeds"):
                pooled = out.text_embeds
        h = torch.cat(states, dim=-1)
        if not self.sdxl:
            return Cond(h)
        empty = torch.tensor([t == "" for t in texts], device=self.device)
        h = torch.where(empty[:, None, None], torch.zeros_like(h), h)  # SDXL: zeros for the empty prompt
        pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        r = self.resolution
        time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=h.dtype, device=self.device).repeat(len(texts), 1)
        return Cond(h, {"text_embeds": pooled, "time_ids": time_ids})

    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            img = self.vae.decode(x0 / self.scaling).sample
        return ((img.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def from_images(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.vae.encode(images.to(self.device) * 2.0 - 1.0).latent_dist.mean * self.scaling

    def training_batch(self, n: int, step: int):
        if self.train_data is None:
            raise UserError("this method trains on real images: give the latent teacher an image folder "
                            "(train_data = DIR with metadata.jsonl)")
        images, captions = self.train_data(n, step)
        return images.to(self.device), captions

    def identity(self) -> dict:
        weights = sorted((self.path / "unet").glob("*.safetensors"))
        return {"backbone": "diffusers", "name": self.path.name, "sdxl": self.sdxl,
                "unet_sha256": sha256_file(weights[0]) if weights else None, "resolution": self.resolution,
                "prediction_type": self.prediction_type}
