"""What every diffusers-directory family shares: its settings, loading as published, identity by content,
placement on the device (dtype, compile, channels_last, offload, VAE slicing/tiling) and the VAE maps.

Components load with ``local_files_only=True`` and safetensors only (no hub access, nothing unpickled), as
published: plain or only as a variant (``fp16``, found by itself when it is the only one), single-file or
sharded with an index. The identity records the sha256 of exactly the files loaded. Real training images
(for methods that train on real data) come from an image folder with a ``metadata.jsonl`` or webdataset
shards (``methods.training_data``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from core.errors import UserError
from core.io import sha256_file
from methods.backbone import COMPILE_MARK, Backbone
from methods.training_data import TrainingData

# the file stem of each component's weights (diffusers models / transformers text encoders)
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                "text_encoder_2": "model", "transformer": "diffusion_pytorch_model", "text_encoder_3": "model"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# torch.compile modes ("" = eager); `compile = true` in a suite is "default"
COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# offload: "model" keeps every component but the denoiser on the CPU and moves it to the device only while it runs
# (text encoders at encode time, the VAE at decode), as diffusers' model offload; the denoiser stays resident
OFFLOAD = ("none", "model")


@dataclasses.dataclass
class DirectorySettings:
    """``[backbone]`` settings of every diffusers-directory family (kind = "diffusers")."""

    path: str = ""  # the local pipeline directory
    variant: str | None = None  # weight variant ("fp16"); None: plain weights, else the only variant present
    dtype: str = "fp32"  # fp32 | bf16 | fp16: the denoiser and text encoders (students train fp32 masters under autocast)
    resolution: int | None = None  # image side in pixels; None: the family's convention (its config's sample size)
    compile: str = ""  # torch.compile mode for every sampling network ("default", "max-autotune", ...); "" eager
    vae: str | None = None  # a folder holding another VAE (e.g. an fp16-safe one) instead of the pipeline's
    vae_dtype: str | None = None  # the VAE's dtype; None: the family's rule (SDXL: fp32 where fp16 would overflow)
    vae_slicing: bool = False  # decode a batch one image at a time (memory for time)
    vae_tiling: bool = False  # decode in overlapping tiles (memory for time; seams possible)
    offload: str = "none"  # none | model (text encoders and VAE wait on the CPU until used)
    train_data: str | None = None  # real training images: a folder with metadata.jsonl, or webdataset .tar shards
    train_workers: int = 2  # DataLoader worker processes reading train_data

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.vae_dtype is not None and self.vae_dtype not in DTYPES:
            raise ValueError(f"vae_dtype must be one of {sorted(DTYPES)}, got {self.vae_dtype!r}")
        if self.vae in DTYPES:
            raise ValueError(f"vae is a folder holding another VAE, got {self.vae!r}; for the VAE's precision set "
                             f"vae_dtype = {self.vae!r}")
        if isinstance(self.compile, bool):
            self.compile = "default" if self.compile else ""
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be a torch.compile mode ({', '.join(m for m in COMPILE_MODES if m)}) or "
                             f"\"\" for eager, got {self.compile!r}")
        if self.offload not in OFFLOAD:
            raise ValueError(f"offload must be one of {OFFLOAD}, got {self.offload!r}")
        if self.resolution is not None and self.resolution < 8:
            raise ValueError(f"resolution must be an image side in pixels (>= 8), got {self.resolution}")
        if self.train_workers < 0:
            raise ValueError(f"train_workers must be >= 0, got {self.train_workers}")


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


def first_line(e: BaseException) -> str:
    msg = str(e).strip()
    return msg.splitlines()[0][:200] if msg else type(e).__name__


class DirectoryBackbone(Backbone):
    """A diffusers pipeline directory behind the Backbone interface (latent space). Families subclass it with
    their components (``denoiser``, ``encoder_names``), how they load (``load_components``) and condition."""

    Settings: ClassVar[type] = DirectorySettings
    family: ClassVar[str]
    pipelines: ClassVar[tuple[str, ...]]
    denoiser: ClassVar[str] = "unet"  # the denoiser's subfolder: unet or transformer
    encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    train_data: TrainingData | None = None

    # --- conventions: the method settings this family's pipeline defaults to -------------------------------
    @classmethod
    def conventions(cls, settings) -> dict[str, dict]:
        """{method name or "*": {setting: value}}: what the family's diffusers pipeline does by default (its
        ``__call__`` defaults), filling method settings a suite leaves unset. Reads configs only, loads nothing."""
        return {}

    # --- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, settings: DirectorySettings, device: str | torch.device = "cpu") -> DirectoryBackbone:
        """The family's backbone from checked `settings` on `device`, with its training data when given."""
        bb = cls(settings, device)
        if settings.train_data:
            bb.train_data = TrainingData(Path(settings.train_data), bb.resolution, settings.train_workers)
        return bb

    def __init__(self, settings: DirectorySettings, device: str | torch.device = "cpu"):
        """Loads every component; UserError (one line) for a missing component, weights that do not load, or a
        setting that does not fit the directory."""
        self.settings = settings
        self.path = Path(settings.path)
        missing = [c for c in (self.denoiser, "vae", *self.encoder_names, "scheduler") if not (self.path / c).is_dir()]
        if settings.vae and "vae" in missing:
            missing.remove("vae")
        if missing:
            raise UserError(f"{self.path}: the {self.family} layout needs {', '.join(m + '/' for m in missing)}")
        self.dtype_name, self.dtype = settings.dtype, DTYPES[settings.dtype]
        self.vae_path = Path(settings.vae) if settings.vae else None
        if self.vae_path is not None and not self.vae_path.is_dir():
            raise UserError(f"[backbone] vae = {settings.vae}: not a folder (give a diffusers AutoencoderKL folder)")
        self.components = [self.denoiser, *([] if self.vae_path else ["vae"]), *self.encoder_names]
        self.variant = resolve_variant(self.path, self.components, settings.variant)
        self.device = torch.device(device)
        kw = {"local_files_only": True, "use_safetensors": True, "variant": self.variant, "torch_dtype": self.dtype}
        try:
            self.load_components(kw)
            if self.vae_path is not None:
                import diffusers

                self.vae = diffusers.AutoencoderKL.from_pretrained(self.vae_path, local_files_only=True,
                                                                   use_safetensors=True, torch_dtype=self.dtype)
            sched = json.loads((self.path / "scheduler" / "scheduler_config.json").read_text())
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise UserError(f"cannot load the {self.family} pipeline in {self.path}: {first_line(e)}") from None
        files = pipeline_files(self.path, self.components, list(self.encoder_names), self.variant)
        if self.vae_path is not None:
            files.update({f"vae[{self.vae_path.name}]/{p.name}": sha256_file(p)
                          for p in sorted(self.vae_path.glob("*")) if p.suffix in (".json", ".safetensors")})
        self._finish(sched, {"name": self.path.name, "variant": self.variant,
                             "sha256": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(),
                             "files": files})

    @classmethod
    def assemble(cls, settings: DirectorySettings, modules: dict, scheduler_config: dict,
                 device: str | torch.device = "cpu") -> DirectoryBackbone:
        """A backbone of this family from modules already in memory ({"net" (the UNet or transformer), "vae",
        "text_encoders", "tokenizers"}) instead of a directory: real-sized networks with random weights time the
        real sampling path (``bench.gpucheck``). Its identity says it is synthetic (no files)."""
        bb = cls.__new__(cls)
        bb.settings, bb.path, bb.vae_path, bb.variant = settings, Path(settings.path or "synthetic"), None, None
        bb.dtype_name, bb.dtype = settings.dtype, DTYPES[settings.dtype]
        bb.device = torch.device(device)
        bb.net, bb.vae = modules["net"], modules["vae"]
        bb.text_encoders, bb.tokenizers = list(modules["text_encoders"]), list(modules["tokenizers"])
        if cls.denoiser == "transformer":
            bb.transformer = bb.net
        params = sum(p.numel() for m in [bb.net, bb.vae, *bb.text_encoders] for p in m.parameters())
        bb._finish(scheduler_config, {"name": "synthetic", "variant": None, "sha256": None, "files": {},
                                      "synthetic_parameters": params})
        return bb

    def _finish(self, sched: dict, ident: dict) -> None:
        """What loading from a directory and assembling from modules share: the scheduler config, the VAE's dtype and
        the latent geometry, the family's setup, placement on the device, and the identity."""
        settings = self.settings
        self.scheduler_config = {k: v for k, v in sched.items() if not k.startswith("_")}
        self.vae_dtype = DTYPES[settings.vae_dtype] if settings.vae_dtype else self.default_vae_dtype()
        self.vae.to(self.vae_dtype)
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.scaling = float(self.vae.config.scaling_factor)
        self.shift_factor = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        self.latent_channels = int(self.vae.config.latent_channels)
        self.resolution = int(settings.resolution or self.default_resolution())
        self.latent_size = self.resolution // self.vae_factor
        if self.resolution % (self.vae_factor * self.patch):
            raise UserError(f"[backbone] resolution {self.resolution} must be a multiple of {self.vae_factor * self.patch} "
                            f"for this {self.family} pipeline")
        self.setup()
        self.place()
        self._identity = {"backbone": "diffusers", "family": self.family, **ident, "resolution": self.resolution,
                          "prediction_type": self.prediction_type, "dtype": self.dtype_name,
                          "vae_dtype": str(self.vae_dtype).replace("torch.", ""),
                          "compile": settings.compile or None, "offload": settings.offload,
                          "vae_slicing": settings.vae_slicing, "vae_tiling": settings.vae_tiling,
                          **self.identity_extra()}

    def load_components(self, kw: dict) -> None:
        """Load the denoiser (``self.net``), ``self.vae``, ``self.text_encoders`` and ``self.tokenizers`` with the
        ``from_pretrained`` keywords `kw` (the VAE may be replaced by ``[backbone] vae`` afterwards)."""
        raise NotImplementedError

    def setup(self) -> None:
        """What the family derives once its components are loaded (schedule, prediction type, ...)."""

    def identity_extra(self) -> dict:
        """Family-specific identity fields (settings that move a number)."""
        return {}

    def default_vae_dtype(self) -> torch.dtype:
        """The VAE's dtype when the suite does not say: the backbone's."""
        return self.dtype

    def default_resolution(self) -> int:
        """The image side the family's pipeline samples at by default (pixels)."""
        return int(self.net.config.sample_size) * self.vae_factor

    @property
    def patch(self) -> int:
        """Latent pixels per token side (1 for a UNet)."""
        return 1

    def at_resolution(self, resolution: int | None) -> DirectoryBackbone:
        """This backbone sampling images of side `resolution` (pixels): a view sharing every module, with its own
        latent size, conditioning (SDXL's target size) and schedule (a flow's resolution-dependent shift); itself when
        `resolution` is None or its own. UserError when the side does not fit the VAE and patch size."""
        if resolution is None or resolution == self.resolution:
            return self
        if resolution % (self.vae_factor * self.patch) or resolution < self.vae_factor * self.patch:
            raise UserError(f"resolution {resolution} must be a positive multiple of {self.vae_factor * self.patch} for "
                            f"this {self.family} pipeline")
        view = copy.copy(self)
        view.resolution, view.latent_size = resolution, resolution // self.vae_factor
        view._identity = {**self._identity, "resolution": resolution}
        view.resolution_changed()
        return view

    def resolution_changed(self) -> None:
        """What a view at another resolution recomputes (a flow's schedule)."""

    # --- placement --------------------------------------------------------------------------------------------
    def place(self) -> None:
        """Every component on its device, eval and frozen; offloaded ones on the CPU; the VAE's slicing/tiling; the
        denoiser prepared for sampling (``prepare_net``)."""
        s = self.settings
        for m in [self.vae, *self.text_encoders]:
            m.to("cpu" if s.offload == "model" else self.device).eval().requires_grad_(False)
        self.net.to(self.device).eval().requires_grad_(False)
        if s.vae_slicing:
            self.vae.enable_slicing()
        if s.vae_tiling:
            self.vae.enable_tiling()
        self.prepare_net(self.net)

    def prepare_net(self, net: nn.Module) -> nn.Module:
        """A sampling network as the suite asks: channels_last (UNets) and torch.compile in the suite's mode, marked so
        latency rows can say which networks ran compiled (``compiled_mode``). Returns `net` (compiled in place)."""
        s = self.settings
        if getattr(s, "channels_last", False):
            net.to(memory_format=torch.channels_last)
        if s.compile:
            net.compile(mode=None if s.compile == "default" else s.compile)
            setattr(net, COMPILE_MARK, s.compile)
        return net

    @contextlib.contextmanager
    def on_device(self, *modules: nn.Module):
        """Offloaded `modules` moved to the device while the block runs, and back to the CPU after (no-op without
        offload)."""
        if self.settings.offload != "model":
            yield
            return
        for m in modules:
            m.to(self.device)
        try:
            yield
        finally:
            for m in modules:
                m.to("cpu")

    # --- the Backbone interface shared by the families ------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.latent_size, self.latent_size)

    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> images float32 [B, 3, R, R] in [0, 1] (decode(x0 / scaling + shift))."""
        with self.on_device(self.vae):
            return decode_latents(self.vae, x0, self.scaling, self.shift_factor, dtype=self.vae_dtype)

    def from_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, R, R] in [0, 1] -> latents float32 [B, C, h, w] on the device (the posterior mean)."""
        with self.on_device(self.vae):
            return encode_images(self.vae, images.to(self.device), self.scaling, self.shift_factor,
                                 dtype=self.vae_dtype)

    def training_batch(self, n: int, key: int):
        """(images float32 [n, 3, R, R] in [0, 1] on the device, captions, micro-conditioning [n, 4] or None) of
        ``[backbone] train_data``; UserError naming the missing setting when there is none."""
        if self.train_data is None:
            raise UserError(f"this method trains on real images: give the {self.family} teacher training data "
                            "([backbone] train_data = an image folder with metadata.jsonl, or webdataset .tar shards)")
        images, captions, micro = self.train_data(n, key)
        return images.to(self.device), captions, micro if self.micro_conditioning else None

    micro_conditioning: ClassVar[bool] = False  # the network takes the training image's size and crop (SDXL)

    def identity(self) -> dict:
        return dict(self._identity)
