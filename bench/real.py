"""Standard metrics at real scale: Inception FID (clean-fid) and open_clip CLIP score, under a protocol.

Everything is local: the Inception network is clean-fid's own file (``inception-2015-12-05.pt``) in a
directory you give, the CLIP model is an open_clip model name plus a local pretrained file
(safetensors or a weights-only checkpoint). The FID reference is what the protocol (``bench.protocols``)
names: a local image folder (``unpaired-folder``), or the images of the drawn COCO captions, one per prompt
(``coco2014-30k``, ``mlperf-sdxl-coco2014-5k``); its features are computed once and cached by the content
hash of its files, the feature network and the preprocessing. (The teacher's own samples, ``teacher-fid``,
are sampled by the runner.) Reference images come as they are published (mixed sizes, RGBA / grayscale /
CMYK, PNG / JPEG / WebP): each is converted to RGB, preprocessed by the protocol (COCO: centre crop to a
square and LANCZOS resize, as GigaGAN and DMD2 do; ``centre_crop_resize``), generated samples likewise, and
resized by clean-fid's own "clean" resize (PIL bicubic to 299, per image); a file that cannot be read is
named before anything is written. CLIP score feeds each 8-bit sample, as a PIL image, through the open_clip
model's own ``preprocess`` transform. The distribution metrics (``bench.metrics.distribution``) compare features in
named spaces: ``fid`` (the FID network), ``clip`` (open_clip's image tower, L2-normalised) and ``dinov2`` (a local
transformers Dinov2Model, ``Dinov2Features``, where ``[evaluators] dinov2`` names one); the reference holds every
space and its cache key names every space's network. Every protocol field is stored with the numbers (``identity()``, the
reference's own identity and the protocol's definition); results of different protocols never share a column.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata as md
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.metrics.evaluators import Evaluators
from bench.metrics.fid import Reference, cached_reference
from bench.protocols import PRESETS, Preprocess, Protocol
from core import io
from core.errors import UserError
from core.io import sha256_file

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """Images float [n, 3, H, W] in [0, 1] as the 8-bit RGB arrays [H, W, 3] they would be saved as."""
    return list((images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())


class CleanResize(nn.Module):
    """clean-fid's "clean" preprocessing: PIL bicubic resize to 299 on uint8-range floats, then the network."""

    def __init__(self, net: nn.Module, num_features: int, size: int = 299):
        super().__init__()
        from cleanfid.resize import make_resizer

        self.net, self.num_features, self.size = net, num_features, size
        self.resize = make_resizer("PIL", False, "bicubic", (size, size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features [n, num_features] of images float [n, 3, H, W] in [0, 1] (quantised to 8 bits first)."""
        return self.of_uint8(to_uint8(images))

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


def centre_crop_resize(image: np.ndarray, size: int | None) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> uint8 [s, s, 3]: the largest centred square, then a PIL LANCZOS resize to size x size
    (no resize when size is None).

    The crop is torchvision's ``center_crop(img, min(img.size))`` (top = round((H − s) / 2), left =
    round((W − s) / 2), Python rounding): BigGAN's ``CenterCropLongEdge``. Crop then ``img.resize((size, size),
    Image.LANCZOS)`` is GigaGAN's ``resize_and_center_crop`` (mingukkang/GigaGAN evaluation/evaluation.py, with
    data_util.py) and DMD2's (tianweiy/DMD2 main/coco_eval/coco_evaluator.py), applied there to real and
    generated images before clean-fid's own resize, as here.
    """
    from PIL import Image
    from torchvision.transforms.functional import center_crop

    im = center_crop(Image.fromarray(image), min(image.shape[:2]))
    if size is not None:
        im = im.resize((size, size), Image.LANCZOS)
    return np.asarray(im)


def describe_preprocess(pre: Preprocess | None) -> str:
    """The preprocessing before clean-fid's resize, in words (part of ``fid_resize`` in the evaluators' identity)."""
    steps = []
    if pre is not None and pre.crop == "centre-square":
        steps.append("centre crop to a square (torchvision center_crop to min(H, W))")
    if pre is not None and pre.size is not None:
        steps.append(f"PIL LANCZOS resize to {pre.size}x{pre.size}")
    return "".join(f"{s}, then " for s in steps)


class OpenCLIPScore(nn.Module):
    """CLIP score 100·max(cos, 0) with an open_clip model from a local pretrained file, its images prepared by the
    model's own ``preprocess`` transform (``open_clip.create_model_and_transforms``: resize of the shortest side,
    centre crop, normalisation) applied to each 8-bit sample as a PIL image."""

    def __init__(self, model_name: str, pretrained: str | None, device: str = "cpu"):
        super().__init__()
        import open_clip

        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained,
                                                                                device=device)
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)

    def truncated(self, texts: list[str]) -> list[int]:
        """Indices of texts longer than the text tower's context (start and end tokens included)."""
        encode, ctx = getattr(self.tokenizer, "encode", None), getattr(self.tokenizer, "context_length", None)
        if encode is None or ctx is None:
            return []
        return [i for i, t in enumerate(texts) if len(encode(t)) + 2 > ctx]

    def image_input(self, images: torch.Tensor) -> torch.Tensor:
        """The image tower's input float32 [n, 3, S, S] (normalised) for images float [n, 3, H, W] in [0, 1]:
        ``preprocess(PIL.Image)`` of each image quantised to 8 bits, on the images' device."""
        from PIL import Image

        return torch.stack([self.preprocess(Image.fromarray(a)) for a in to_uint8(images)]).to(images.device)

    @property
    def width(self) -> int:
        """The image embeddings' width."""
        return int(self.model.visual.output_dim)

    @torch.no_grad()
    def embed(self, arrays: list[np.ndarray], device: torch.device) -> torch.Tensor:
        """L2-normalised image embeddings float [n, width] of uint8 RGB images [H, W, 3] (any sizes), each through
        ``preprocess(PIL.Image)``."""
        from PIL import Image

        x = torch.stack([self.preprocess(Image.fromarray(a)) for a in arrays]).to(device)
        return nn.functional.normalize(self.model.encode_image(x), dim=-1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """CLIP score float [n] in [0, 100] of images float [n, 3, H, W] in [0, 1] against their texts."""
        x = self.image_input(images)
        img = nn.functional.normalize(self.model.encode_image(x), dim=-1)
        txt = nn.functional.normalize(self.model.encode_text(self.tokenizer(texts).to(x.device)), dim=-1)
        return 100.0 * (img * txt).sum(-1).clamp(min=0)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Dinov2Features(nn.Module):
    """DINOv2 features as dgm-eval computes them (Stein et al. 2023, layer6ai-labs/dgm-eval): each 8-bit image as a
    PIL image, bicubic resize to 224x224 (torchvision ``Resize((224, 224), BICUBIC)``), ImageNet normalisation, and
    the CLS token after the final layer norm (transformers ``Dinov2Model``'s ``pooler_output``; torch hub's DINOv2
    returns the same token). Weights from a local transformers directory; never downloads."""

    SIZE = 224

    def __init__(self, path: Path, device: str | torch.device = "cpu"):
        super().__init__()
        from transformers import Dinov2Model

        self.model = Dinov2Model.from_pretrained(str(path), local_files_only=True).to(device).eval()
        self.model.requires_grad_(False)
        cfg = self.model.config
        self.num_features = int(cfg.hidden_size)
        self.network = (f"transformers Dinov2Model ({cfg.num_hidden_layers} layers, {cfg.hidden_size}-d, patch "
                        f"{cfg.patch_size}) pooler_output at {self.SIZE}x{self.SIZE}, bicubic resize, ImageNet "
                        "normalisation (dgm-eval)")

    @torch.no_grad()
    def forward(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """Features float [n, num_features] of uint8 RGB images [H, W, 3] (any sizes)."""
        from PIL import Image
        from torchvision import transforms as T

        prep = T.Compose([T.Resize((self.SIZE, self.SIZE), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                          T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        x = torch.stack([prep(Image.fromarray(a)) for a in arrays]).to(self.model.device)
        return self.model(pixel_values=x).pooler_output


def load_dinov2(path: Path, device: str = "cpu") -> tuple[Dinov2Features, str]:
    """(DINOv2 features, the weights file's sha256) from a local transformers Dinov2Model directory; UserError
    when it is not one."""
    path = Path(path)
    weights = next((path / f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).is_file()), None)
    if not (path / "config.json").is_file() or weights is None:
        raise UserError(f"[evaluators] dinov2 = {str(path)!r} is not a transformers Dinov2Model directory (config.json "
                        "and model.safetensors); save facebook/dinov2-large there with save_pretrained")
    try:
        net = Dinov2Features(path, device)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load the DINOv2 model in {path} ({str(e).splitlines()[0][:160]})") from None
    return net, sha256_file(weights)


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


@dataclasses.dataclass
class Networks:
    """The real-scale evaluator networks and what identifies them: the FID feature network (its id and its weights'
    sha256, None for a stand-in), the open_clip scorer (model name, weights sha256) and, where its weights were given,
    DINOv2."""

    fid_net: nn.Module
    feature_id: str
    feature_sha256: str | None
    clip: nn.Module
    clip_model: str
    clip_sha256: str | None
    dinov2: Dinov2Features | None = None  # the "dinov2" feature space, where its weights were given
    dinov2_sha256: str | None = None


class RealEvaluators(Evaluators):
    """FID features + CLIP scorer + the protocol's reference, behind the Evaluators interface.

    `folder`: the ``unpaired-folder`` reference; `images`: the folder of the drawn COCO captions' images (each
    prompt's ``file_name`` under it). A folder's images are checked here; paired images by ``check_paired``.
    """

    kind = "real"

    def __init__(self, nets: Networks, protocol: Protocol, folder: Path | None = None, images: Path | None = None,
                 device: str | torch.device = "cpu", dtype: str = "fp32"):
        self.device = torch.device(device)
        self.dtype_name = dtype
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        self.nets, self.protocol, self.images = nets, protocol, None if images is None else Path(images)
        self.fid_net, self.clip = nets.fid_net, nets.clip  # fid_net None: a protocol without FID (CLIP score only)
        if self.fid_net is not None:
            self.fid_net.eval().requires_grad_(False)
        self.num_features = int(nets.fid_net.num_features) if nets.fid_net is not None else 0
        self.pre = protocol.preprocess if protocol.preprocess and protocol.preprocess.crop else None
        if protocol.reference == "image-folder":
            self.reference_dir = Path(folder)
            self.reference_files = folder_images(self.reference_dir)
            check_images(self.reference_files)
            self.reference_hash = folder_hash(self.reference_files, self.reference_dir)

    def _identity(self) -> dict:
        n = self.nets
        return {"kind": self.kind, "fid_feature": n.feature_id, "fid_feature_sha256": n.feature_sha256,
                "fid_resize": f"{describe_preprocess(self.pre)}clean-fid {md.version('clean-fid')} mode=clean: PIL "
                              "bicubic resize to 299",
                "clip_model": n.clip_model, "clip_sha256": n.clip_sha256,
                "clip_score": "100*max(cos,0); open_clip's own preprocess transform on each 8-bit sample as a PIL image",
                "accuracy_net_sha256": None, "dtype": self.dtype_name}

    def _fid_features(self, images):
        if self.pre is None and not isinstance(self.fid_net, CleanResize):
            return self.fid_net(images)
        return self.features_of_uint8(to_uint8(images))

    def feature_spaces(self):
        """``fid`` (where FID is measured), ``clip`` (open_clip's image tower, L2-normalised) and ``dinov2`` (where its
        weights were given); each sees the protocol's crop and resize first."""
        n, pre = self.nets, describe_preprocess(self.pre)
        out = {**super().feature_spaces(),
               "clip": {"width": self.clip.width, "sha256": n.clip_sha256,
                        "network": f"open_clip {n.clip_model} encode_image, L2-normalised; {pre}the model's own "
                                   "preprocess transform on each 8-bit image as a PIL image"}}
        if n.dinov2 is not None:
            out["dinov2"] = {"width": n.dinov2.num_features, "network": f"{pre}{n.dinov2.network}",
                             "sha256": n.dinov2_sha256}
        return out

    def _features(self, space, images):
        return self.features_of_uint8(to_uint8(images), space)

    def features_of_uint8(self, arrays: list[np.ndarray], space: str = "fid") -> torch.Tensor:
        """Features [n, width] in `space` of uint8 RGB images [H, W, 3] of any sizes: the protocol's crop and resize
        (``centre_crop_resize``), then the space's network: clean-fid's resize and Inception (or a stand-in network's
        own input) for ``fid``, open_clip's preprocess and image tower for ``clip``, ``Dinov2Features`` for ``dinov2``."""
        if self.pre is not None:
            arrays = [centre_crop_resize(a, self.pre.size) for a in arrays]
        if space == "clip":
            return self.clip.embed(arrays, self.device)
        if space == "dinov2" and self.nets.dinov2 is not None:
            return self.nets.dinov2(arrays)
        if space != "fid":
            raise KeyError(f"{type(self).__name__} has no feature space {space!r}; it has {sorted(self.feature_spaces())}")
        if isinstance(self.fid_net, CleanResize):
            return self.fid_net.of_uint8(arrays)
        x = torch.from_numpy(np.stack(arrays).astype(np.float32) / 255.0).permute(0, 3, 1, 2)
        return self.fid_net(x.to(self.device))

    def _clip_score(self, images, texts):
        return self.clip(images, texts)

    def clip_truncated(self, texts):
        return self.clip.truncated(texts)

    def paired_files(self, prompts: list) -> list[Path]:
        """The reference image of each prompt of a COCO draw: its ``file_name`` under the images folder; UserError
        for a prompt that does not carry one (not drawn by this protocol)."""
        names = [dict(p.meta).get("file_name") for p in prompts]
        lacking = [p.id for p, f in zip(prompts, names) if f is None]
        if lacking:
            raise UserError(f"prompt {lacking[0]} has no COCO image (file_name); protocol {self.protocol.name!r} "
                            "measures the prompts it draws from its annotations")
        return [self.images / f for f in names]

    def check_paired(self, prompts: list) -> None:
        """Every drawn caption's image exists and opens, or a UserError names the first that does not."""
        for p, f in zip(prompts, self.paired_files(prompts)):
            if not f.is_file():
                raise UserError(f"image {f.name} of prompt {p.id} is not in images = {self.images}; give the folder "
                                f"that holds the annotations' images ({self.protocol.name})")
        check_images(self.paired_files(prompts))

    def reference(self, prompts, cache_dir) -> Reference:
        """The protocol's FID reference in every feature space, cached by content hash (of the images, the FID
        network, the preprocessing and the other spaces' networks): the folder's images (whatever the prompts), or
        the image of each prompt (paired), each through ``features_of_uint8``."""
        spaces = self.feature_spaces()
        others = {s: [d["network"], d["sha256"]] for s, d in spaces.items() if s != "fid"}
        if self.protocol.reference == "image-folder":
            files, root = self.reference_files, self.reference_dir
            key = f"{self.reference_hash}-{self.nets.feature_id.replace(':', '-')}-{io.content_hash(others)[:8]}"
            source = {"kind": "image folder", "folder_sha256": self.reference_hash, "images": len(files)}
        elif self.protocol.reference == "drawn-images":
            files, root = self.paired_files(prompts), self.images
            digest = folder_hash(files, root)
            pre = dataclasses.asdict(self.protocol.preprocess)
            key = io.content_hash({"images": digest, "feature": self.nets.feature_id, "preprocess": pre,
                                   "spaces": others})
            source = {"kind": "the drawn captions' images, one per prompt", "images_sha256": digest,
                      "images": len(files), "paired": True}
        else:
            raise RuntimeError(f"protocol {self.protocol.name}: its reference ({self.protocol.reference}) is not "
                               "made by the evaluators")

        def chunk(part):
            if self.pre is None and not isinstance(self.fid_net, CleanResize):  # a stand-in network of one input size
                return self.all_features(load_images(part).to(self.device))
            arrays = [read_rgb(f) for f in part]  # per image, whatever its size or mode
            return {s: self.features_of_uint8(arrays, s).float() for s in spaces}

        chunks = (chunk(files[i : i + 64]) for i in range(0, len(files), 64))
        return cached_reference(key, source, chunks, self.num_features, cache_dir, spaces)


def load_real_evaluators(inception_dir: Path | None, clip_model: str, clip_pretrained: str | None,
                         reference_dir: Path | None = None, device: str = "cpu", fid_net: nn.Module | None = None,
                         dtype: str = "fp32", protocol: Protocol | None = None, images_dir: Path | None = None,
                         dinov2_dir: Path | None = None) -> RealEvaluators:
    """Inception FID + open_clip score under `protocol` (default ``unpaired-folder`` on `reference_dir`;
    `images_dir` for a COCO protocol), and the ``dinov2`` feature space when `dinov2_dir` (a transformers
    Dinov2Model directory) is given. `fid_net` overrides the Inception network (tests use random weights)."""
    protocol = protocol or PRESETS["unpaired-folder"]
    if fid_net is None and inception_dir is None and not protocol.measures_fid:
        feature_id = feature_sha = None  # CLIP score only: no Inception to load
    elif fid_net is None:
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
    dinov2, dinov2_sha = load_dinov2(dinov2_dir, device) if dinov2_dir is not None else (None, None)
    nets = Networks(fid_net, feature_id, feature_sha, clip, clip_model, clip_sha, dinov2, dinov2_sha)
    return RealEvaluators(nets, protocol, reference_dir, images_dir, device, dtype)
