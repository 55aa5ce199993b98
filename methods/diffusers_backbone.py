"""Real-scale teachers: an SD 1.x / 2.x or SDXL pipeline from a local diffusers directory.

Loads the UNet, VAE, text encoder(s), tokenizer(s) and scheduler config with
``local_files_only=True`` and safetensors only (no hub access, nothing unpickled), as published:
plain or only as a variant (``fp16``, found by itself when it is the only one), single-file or
sharded with an index. The identity records the sha256 of exactly the files loaded. It exposes the
same Backbone interface as the shapes teacher, in latent space: every method trains and samples on
it unchanged. Prompts longer than a text encoder's context are truncated; which ones is recorded.

Real training images (for methods that use real data) come from an image folder with a
``metadata.jsonl`` or webdataset shards (``methods.training_data``).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from core.errors import UserError
from core.io import sha256_file
from methods.backbone import Backbone, Cond
from methods.diffusion import Schedule
from methods.training_data import TrainingData


# the file stem of each component's weights (diffusers models / transformers text encoders)
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                "text_encoder_2": "model", "transformer": "diffusion_pytorch_model", "text_encoder_3": "model"}


def weight_files(folder: Path, stem: str, variant: str | None) -> list[Path]:
    """The safetensors files ``from_pretrained`` opens for a component and variant: the single file, or
    the sharded index and every shard it lists ([] when neither exists)."""
    v = f".{variant}" if variant else ""
    single = folder / f"{stem}{v}.safetensors"
    if single.is_file():
        return [single]
    index = folder / f"{stem}.safetensors.index{v}.json"
    if not index.is_file():
        return []
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise UserError(f"{folder}: the index {index.name} lists {len(missing)} missing shard(s) (first: {missing[0]})")
    return [index] + [folder / s for s in shards]


def variants_in(folder: Path, stem: str) -> set[str]:
    """The weight variants present: "fp16" for model.fp16.safetensors or model.safetensors.index.fp16.json."""
    found = set()
    for p in folder.glob(f"{stem}*"):
        m = re.fullmatch(rf"{re.escape(stem)}\.([A-Za-z0-9_]+)\.safetensors", p.name) or \
            re.fullmatch(rf"{re.escape(stem)}\.safetensors\.index\.([A-Za-z0-9_]+)\.json", p.name)
        if m:
            found.add(m[1])
    return found


def resolve_variant(root: Path, components: list[str], requested: str | None) -> str | None:
    """The variant to load: the requested one, else none when plain weights exist, else the only variant present.

    UserError (one line) when weights are missing, or several variants exist and none was asked for.
    """
    for comp in components:
        folder, stem = root / comp, WEIGHT_STEMS[comp]
        if requested is not None:
            if not weight_files(folder, stem, requested):
                raise UserError(f"{folder}: no {requested!r} weights ({stem}.{requested}.safetensors or a sharded "
                                f"index); variants here: {sorted(variants_in(folder, stem)) or 'none'}")
        elif not weight_files(folder, stem, None):
            found = variants_in(folder, stem)
            if not found:
                names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
                raise UserError(f"{folder}: no safetensors weights ({stem}.safetensors, a variant, or a sharded index); "
                                f"found {names[:6]}; flashbench loads safetensors only")
            if len(found) > 1:
                raise UserError(f"{folder}: only variant weights, and several ({sorted(found)}); set variant = one of them "
                                "in [backbone]")
            requested = next(iter(found))
    return requested


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def decode_latents(vae, x0: torch.Tensor, scaling: float, shift: float = 0.0, dtype=None) -> torch.Tensor:
    """Latents [B, C, h, w] -> images float32 [B, 3, H, W] in [0, 1]: ``vae.decode(x0 / scaling + shift)``, as the
    SD/SDXL (shift 0) and SD3/FLUX pipelines decode; `dtype` the VAE's compute dtype (default its weights')."""
    with torch.no_grad():
        img = vae.decode((x0 / scaling + shift).to(dtype or vae.dtype)).sample
    return ((img.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def encode_images(vae, images: torch.Tensor, scaling: float, shift: float = 0.0, dtype=None) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] (on the VAE's device) -> latents float32 (the posterior mean, (z − shift)·scaling)."""
    with torch.no_grad():
        x = (images * 2.0 - 1.0).to(dtype or vae.dtype)
        return ((vae.encode(x).latent_dist.mean - shift) * scaling).float()


def real_training_batch(train_data: TrainingData | None, n: int, key: int, device, what: str, micro: bool = True):
    """``Backbone.training_batch`` from a diffusers teacher's `train_data` (images on `device`, captions, and the
    micro-conditioning unless `micro` is False); UserError naming the missing setting when there is none."""
    if train_data is None:
        raise UserError(f"this method trains on real images: give the {what} teacher training data "
                        "(train_data = an image folder with metadata.jsonl, or webdataset .tar shards)")
    images, captions, conditioning = train_data(n, key)
    return images.to(device), captions, conditioning if micro else None


def pipeline_files(root: Path, components: list[str], encoder_names: list[str], variant: str | None) -> dict[str, str]:
    """sha256 of every file of a diffusers directory that moves a number, by path relative to `root`: each
    component's config and the weight files loaded (the variant's, all shards), the tokenizers' files, the
    scheduler config."""
    files = {}
    for comp in components:
        folder = root / comp
        for f in [folder / "config.json", *weight_files(folder, WEIGHT_STEMS[comp], variant)]:
            files[f.relative_to(root).as_posix()] = sha256_file(f)
    for tok in [n.replace("text_encoder", "tokenizer") for n in encoder_names]:
        for f in sorted((root / tok).iterdir()):
            if f.is_file():
                files[f.relative_to(root).as_posix()] = sha256_file(f)
    files["scheduler/scheduler_config.json"] = sha256_file(root / "scheduler" / "scheduler_config.json")
    return files


class DirectoryBackbone(Backbone):
    """What the diffusers-directory backbones share (SD/SDXL here, SD3/FLUX.1 in ``methods.flow_backbone``):
    loading with optional real training data, and the identity hashed at load time (``_identity``)."""

    _identity: dict
    resolution: int
    train_data: TrainingData | None = None

    @classmethod
    def load(cls, path, device="cpu", train_data: Path | None = None, variant: str | None = None,
             train_workers: int = 2, **settings):
        """A backbone from a folder; `settings` go to the class's __init__ (dtype, vae, ... / resolution, ...);
        training data read by `train_workers` DataLoader workers."""
        bb = cls(path, device, variant=variant, **settings)
        if train_data is not None:
            bb.train_data = TrainingData(train_data, bb.resolution, train_workers)
        return bb

    def identity(self) -> dict:
        return dict(self._identity)


class DiffusersBackbone(DirectoryBackbone):
    """An SD 1.x/2.x or SDXL layout behind the Backbone interface (latent space)."""

    def __init__(self, path: Path, device: str | torch.device = "cpu", train_data=None, dtype: str = "fp32",
                 variant: str | None = None, vae: Path | None = None, compile: str = "", channels_last: bool = False):
        """`dtype`: fp32, bf16 or fp16 for the UNet and text encoders (the VAE decodes in fp32 when fp16 would
        overflow, as diffusers' force_upcast, unless an fp16-safe `vae` folder replaces the pipeline's);
        `compile`: a torch.compile backend ("inductor", ...) for the UNet, "" for eager; `channels_last`:
        the UNet's memory format."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        self.path = Path(path)
        if not (self.path / "unet").is_dir() or not (self.path / "vae").is_dir():
            raise UserError(f"{path} is not a diffusers SD/SDXL directory (needs unet/, vae/, text_encoder/, "
                            "tokenizer/, scheduler/)")
        self.sdxl = (self.path / "text_encoder_2").is_dir()
        self.encoder_names = ["text_encoder"] + (["text_encoder_2"] if self.sdxl else [])
        components = ["unet", "vae", *self.encoder_names]
        if dtype not in DTYPES:
            raise UserError(f"[backbone] dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.dtype_name, self.dtype = dtype, DTYPES[dtype]
        self.vae_path = Path(vae) if vae else None
        if self.vae_path is not None:
            components.remove("vae")
        self.variant = resolve_variant(self.path, components, variant)
        self.device = torch.device(device)
        kw = {"local_files_only": True, "use_safetensors": True, "variant": self.variant, "torch_dtype": self.dtype}
        try:
            self.unet = UNet2DConditionModel.from_pretrained(self.path, subfolder="unet", **kw)
            if self.vae_path is not None:
                self.vae = AutoencoderKL.from_pretrained(self.vae_path, local_files_only=True, use_safetensors=True,
                                                         torch_dtype=self.dtype)
            else:
                self.vae = AutoencoderKL.from_pretrained(self.path, subfolder="vae", **kw)
            self.tokenizers = [CLIPTokenizer.from_pretrained(self.path, subfolder=n.replace("text_encoder", "tokenizer"),
                                                             local_files_only=True) for n in self.encoder_names]
            self.text_encoders = [CLIPTextModel.from_pretrained(self.path, subfolder="text_encoder", **kw)]
            if self.sdxl:
                self.text_encoders.append(CLIPTextModelWithProjection.from_pretrained(
                    self.path, subfolder="text_encoder_2", **kw))
            sched = json.loads((self.path / "scheduler" / "scheduler_config.json").read_text())
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot load the diffusers pipeline in {self.path}: {msg}") from None
        # fp16 VAEs that overflow decode in fp32 (diffusers' force_upcast), as the SDXL pipeline does
        self.vae_dtype = torch.float32 if (self.dtype == torch.float16 and self.vae.config.get("force_upcast", False)) \
            else self.dtype
        self.vae.to(self.vae_dtype)
        for m in [self.unet, self.vae, *self.text_encoders]:
            m.to(self.device).eval().requires_grad_(False)
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.compile, self.channels_last = compile, channels_last
        if compile:
            self.unet.compile(backend=compile)
        self.scheduler_config = {k: v for k, v in sched.items() if not k.startswith("_")}
        self.schedule = Schedule.from_diffusers(DDPMScheduler.from_config(self.scheduler_config))
        self.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        self.scaling = float(self.vae.config.scaling_factor)
        self.resolution = int(self.unet.config.sample_size) * 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.train_data = train_data
        self._identity = self._hash_components(components)
        if self.vae_path is not None:
            self._identity["files"].update({f"vae[{self.vae_path.name}]/{p.name}": sha256_file(p)
                                            for p in sorted(self.vae_path.glob("*")) if p.suffix in (".json", ".safetensors")})
        self._identity.update(dtype=dtype, vae_dtype=str(self.vae_dtype).replace("torch.", ""), compile=compile or None,
                              channels_last=channels_last)

    def _hash_components(self, components: list[str]) -> dict:
        """The identity: ``pipeline_files`` of the components loaded, and their combined sha256."""
        files = pipeline_files(self.path, components, self.encoder_names, self.variant)
        combined = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
        return {"backbone": "diffusers", "name": self.path.name, "sdxl": self.sdxl, "variant": self.variant,
                "resolution": self.resolution, "prediction_type": self.prediction_type, "sha256": combined,
                "files": files}

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        s = int(self.unet.config.sample_size)
        return (int(self.unet.config.in_channels), s, s)

    def truncated(self, texts: list[str]) -> dict[str, list[int]]:
        out = {}
        for name, tok in zip(self.encoder_names, self.tokenizers):
            lengths = [len(ids) for ids in tok(texts, padding=False, truncation=False)["input_ids"]]
            out[name] = [i for i, n in enumerate(lengths) if n > tok.model_max_length]
        return out

    @torch.no_grad()
    def encode_text(self, texts: list[str], micro: torch.Tensor | None = None) -> Cond:
        """SD: the text encoder's last hidden states. SDXL: both encoders' penultimate states, the second's pooled
        embedding, zeros for the empty prompt, and time_ids (original size, crop corner, target size): `micro`'s
        per image in training, (R, R, 0, 0, R, R) otherwise, as diffusers' SDXL pipeline."""
        states, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.text_encoders):
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
        if micro is None:
            time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=h.dtype, device=self.device).repeat(len(texts), 1)
        else:
            target = torch.tensor([[r, r]], dtype=micro.dtype).repeat(len(texts), 1)
            time_ids = torch.cat([micro, target], 1).to(self.device, h.dtype)
        return Cond(h, {"text_embeds": pooled, "time_ids": time_ids})

    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.vae, x0, self.scaling, dtype=self.vae_dtype)

    def from_images(self, images: torch.Tensor) -> torch.Tensor:
        return encode_images(self.vae, images.to(self.device), self.scaling, dtype=self.vae_dtype)

    def training_batch(self, n: int, key: int):
        return real_training_batch(self.train_data, n, key, self.device, "latent")

