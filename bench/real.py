"""Standard metrics at real scale: Inception FID (clean-fid protocol) and open_clip CLIP score.

Everything is local: the Inception network is clean-fid's own file (``inception-2015-12-05.pt``) in a
directory you give, the CLIP model is an open_clip model name plus a local pretrained file
(safetensors or a weights-only checkpoint), and the FID reference is a local image folder whose
statistics are computed once and cached by the content hash of its files. Reference images come as
they are published (mixed sizes, RGBA / grayscale / CMYK, PNG / JPEG / WebP): each is converted to RGB
and resized by the declared protocol (clean-fid "clean": PIL bicubic to 299, per image); a file that
cannot be read is named before anything is written. Every protocol field is stored with the numbers
(``identity()``, and the reference's own identity); results of different protocols never share a column.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.metrics.evaluators import Evaluators
from bench.metrics.fid import Reference, cached_reference
from core.errors import UserError
from core.io import sha256_file

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


class CleanResize(nn.Module):
    """clean-fid's "clean" preprocessing: PIL bicubic resize to 299 on uint8-range floats, then the network."""

    def __init__(self, net: nn.Module, num_features: int, size: int = 299):
        super().__init__()
        from cleanfid.resize import make_resizer

        self.net, self.num_features, self.size = net, num_features, size
        self.resize = make_resizer("PIL", False, "bicubic", (size, size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features [n, num_features] of images float [n, 3, H, W] in [0, 1] (quantised to 8 bits first)."""
        x = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return self.of_uint8(list(x))

    def of_uint8(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """Features of uint8 RGB images [H, W, 3], each of its own size (resized one by one, as clean-fid does)."""
        x = np.stack([self.resize(im) for im in arrays])
        x = torch.from_numpy(x).permute(0, 3, 1, 2).float().to(next(self.net.parameters(), torch.empty(0)).device)
        return self.net(x).flatten(1)


def inception(weights_dir: Path, device: str = "cpu") -> nn.Module:
    """clean-fid's Inception (pool3, 2048-d) from a local copy of its weights; never downloads."""
    from cleanfid.inception_torchscript import InceptionV3W

    path = Path(weights_dir) / "inception-2015-12-05.pt"
    if not path.is_file():
        raise UserError(f"Inception weights not found at {path}; copy clean-fid's inception-2015-12-05.pt there")
    with warnings.catch_warnings():  # clean-fid's TorchScript file: torch.jit.load's deprecation notice is not ours
        warnings.simplefilter("ignore", FutureWarning)
        net = InceptionV3W(str(weights_dir), download=False, resize_inside=False).to(device)
    return CleanResize(net, 2048)


class OpenCLIPScore(nn.Module):
    """CLIP score 100·max(cos, 0) with an open_clip model from a local pretrained file."""

    def __init__(self, model_name: str, pretrained: str | None, device: str = "cpu"):
        super().__init__()
        import open_clip

        self.model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained,
                                                                           device=device)
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        size = self.model.visual.image_size
        self.size = size if isinstance(size, int) else size[0]
        norm = next(t for t in preprocess.transforms if t.__class__.__name__ == "Normalize")
        self.register_buffer("mean", torch.tensor(norm.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(norm.std).view(1, 3, 1, 1))

    def truncated(self, texts: list[str]) -> list[int]:
        """Indices of texts longer than the text tower's context (start and end tokens included)."""
        encode, ctx = getattr(self.tokenizer, "encode", None), getattr(self.tokenizer, "context_length", None)
        if encode is None or ctx is None:
            return []
        return [i for i, t in enumerate(texts) if len(encode(t)) + 2 > ctx]

    @torch.no_grad()
    def forward(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        x = nn.functional.interpolate(images.float(), size=(self.size, self.size), mode="bicubic",
                                      align_corners=False, antialias=True).clamp(0, 1)
        img = nn.functional.normalize(self.model.encode_image((x - self.mean) / self.std), dim=-1)
        txt = nn.functional.normalize(self.model.encode_text(self.tokenizer(texts).to(x.device)), dim=-1)
        return 100.0 * (img * txt).sum(-1).clamp(min=0)


def folder_images(folder: Path) -> list[Path]:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"reference folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def folder_hash(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def read_rgb(path: Path) -> np.ndarray:
    """An image file as uint8 RGB [H, W, 3] (RGBA, grayscale, palette, CMYK converted); UserError naming
    the file when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UserError(f"reference image {path} cannot be read ({type(e).__name__}); remove or replace it") from None


def check_images(files: list[Path]) -> None:
    """Open every image's header: a file that cannot be read is named before anything is written."""
    from PIL import Image, UnidentifiedImageError

    for f in files:
        try:
            with Image.open(f) as im:
                im.verify()
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise UserError(f"reference image {f} cannot be read ({type(e).__name__}); remove or replace it") from None


def load_images(files: list[Path]) -> torch.Tensor:
    """Images of one size as float32 [n, 3, H, W] in [0, 1]; UserError naming a file of another size."""
    arrays = [read_rgb(f) for f in files]
    for f, a in zip(files, arrays):
        if a.shape != arrays[0].shape:
            raise UserError(f"reference image {f} is {a.shape[1]}x{a.shape[0]}, not {arrays[0].shape[1]}x"
                            f"{arrays[0].shape[0]} like {files[0].name}; this feature network does not resize")
    return torch.from_numpy(np.stack(arrays).astype(np.float32) / 255.0).permute(0, 3, 1, 2)


class RealEvaluators(Evaluators):
    """FID features + CLIP scorer + reference folder, behind the Evaluators interface."""

    kind = "real"

    def __init__(self, fid_net: nn.Module, feature_id: str, feature_sha256: str | None, clip: nn.Module,
                 clip_model: str, clip_sha256: str | None, reference_dir: Path, device: str | torch.device = "cpu",
                 dtype: str = "fp32"):
        self.device = torch.device(device)
        self.dtype_name = dtype
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        self.fid_net, self.clip = fid_net.eval().requires_grad_(False), clip
        self.num_features = int(fid_net.num_features)
        self.feature_id, self.feature_sha256 = feature_id, feature_sha256
        self.clip_model, self.clip_sha256 = clip_model, clip_sha256
        self.reference_dir = Path(reference_dir)
        self.reference_files = folder_images(self.reference_dir)
        check_images(self.reference_files)
        self.reference_hash = folder_hash(self.reference_files, self.reference_dir)

    def _identity(self) -> dict:
        return {"kind": self.kind, "fid_feature": self.feature_id, "fid_feature_sha256": self.feature_sha256,
                "fid_resize": f"clean-fid {md.version('clean-fid')} mode=clean: PIL bicubic resize to 299",
                "clip_model": self.clip_model, "clip_sha256": self.clip_sha256,
                "clip_score": "100*max(cos,0), bicubic antialiased resize to the model's size",
                "accuracy_net_sha256": None, "dtype": self.dtype_name}

    def _fid_features(self, images):
        return self.fid_net(images)

    def _clip_score(self, images, texts):
        return self.clip(images, texts)

    def clip_truncated(self, texts):
        return self.clip.truncated(texts)

    def reference(self, prompts, cache_dir) -> Reference:
        """FID reference: the images of the reference folder (whatever the prompts), cached by content hash."""
        files = self.reference_files
        key = self.reference_hash + "-" + self.feature_id.replace(":", "-")
        source = {"kind": "image folder", "folder_sha256": self.reference_hash, "images": len(files)}

        def chunk(part):
            if isinstance(self.fid_net, CleanResize):  # per image, whatever its size or mode
                return self.fid_net.of_uint8([read_rgb(f) for f in part])
            return self.fid_features(load_images(part).to(self.device))

        chunks = (chunk(files[i : i + 64]) for i in range(0, len(files), 64))
        return cached_reference(key, source, chunks, self.num_features, cache_dir)


def load_real_evaluators(inception_dir: Path | None, clip_model: str, clip_pretrained: str | None,
                         reference_dir: Path, device: str = "cpu", fid_net: nn.Module | None = None,
                         dtype: str = "fp32") -> RealEvaluators:
    """Inception FID + open_clip score. `fid_net` overrides the Inception network (tests use random weights)."""
    if fid_net is None:
        if inception_dir is None:
            raise UserError("real-scale FID needs inception_dir = a folder with clean-fid's inception-2015-12-05.pt")
        fid_net = inception(inception_dir, device)
        feature_id = "inception-2015-12-05:pool3"
        feature_sha = sha256_file(Path(inception_dir) / "inception-2015-12-05.pt")
    else:
        feature_id, feature_sha = f"custom:{type(fid_net).__name__}:{fid_net.num_features}", None
    weights = Path(clip_model[len("local-dir:"):]) / "open_clip_model.safetensors" \
        if clip_model.startswith("local-dir:") else Path(clip_pretrained) if clip_pretrained else None
    clip_sha = sha256_file(weights) if weights is not None and weights.is_file() else None
    try:
        clip = OpenCLIPScore(clip_model, clip_pretrained, device)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"cannot load the open_clip model {clip_model!r} ({str(e).splitlines()[0][:160]})") from None
    return RealEvaluators(fid_net, feature_id, feature_sha, clip, clip_model, clip_sha, Path(reference_dir), device,
                          dtype)
