"""GenEval (Ghosh et al. 2023): its folder layout, its rules over detections, and the detector it needs.

Three parts, each following the official repository (github.com/djghosh13/geneval) line by line:

1. The folder layout its scorer reads (README "Image generation"; ``generation/diffusers_generate.py`` writes it,
   ``evaluation/evaluate_images.py`` ``main`` reads it): ``<out>/<index:05d>/metadata.jsonl`` holding the prompt's
   line of ``evaluation_metadata.jsonl`` and ``<out>/<index:05d>/samples/<k:04d>.png``. The scorer takes every
   digit-named folder and every ``\\d+.png`` in its ``samples/``; anything else beside them (``cell.json``) is skipped.
2. Its rules, as pure functions over detections (``evaluate_images.py``: ``evaluate_image``'s per-class filtering,
   ``evaluate``, ``relative_position``, ``compute_iou``) and ``summary_scores.py``'s per-tag and overall means.
3. What the rules need from models, behind two small interfaces: a ``Detector`` (uint8 image -> detections, labels
   in GenEval's COCO class names) and a ``ColourJudge`` (object crops -> one of ``COLORS``), with one
   implementation of each from local weights only: ``TransformersDetector`` (any transformers
   ``AutoModelForObjectDetection``: DETR, Deformable/Conditional DETR, RT-DETR, YOLOS) and ``OpenClipColourJudge``
   (open_clip zero-shot over GenEval's colour prompts, as the official scorer does with ViT-L-14/OpenAI).

The official detector is mmdet's Mask2Former (Swin-S, COCO instance segmentation, mmdet 2.27) and ours is not it:
box-only detectors give no mask, so colour crops keep their background, and any other detector moves the numbers.
Numbers from this module are for comparing cells of one run; for paper numbers run the official scorer on the
folder this layout writes (docs/metrics-geneval.md says how).
"""

from __future__ import annotations

import abc
import dataclasses
import json
from collections.abc import Callable, Sequence
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from core import io
from core.errors import UserError

# --- GenEval's constants (evaluate_images.py: `__main__` defaults of --options, COLORS; summary_scores.py) ----------
THRESHOLD = 0.3  # `threshold`: detection confidence kept for every tag but counting
COUNTING_THRESHOLD = 0.9  # `counting_threshold`: confidence kept for the counting tag
MAX_OBJECTS = 16  # `max_objects`: most detections kept per class
NMS_THRESHOLD = 1.0  # `max_overlap`: IoU above which a lower-scored box of a class is dropped (1.0: never)
POSITION_THRESHOLD = 0.1  # `position_threshold`: share of the two boxes' summed sizes an offset must exceed
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_TEMPLATES = ("a photo of a {c} {classname}", "a photo of a {c}-colored {classname}", "a photo of a {c} object")
BGCOLOR = "#999"  # `bgcolor`: what a mask leaves of a crop is painted this grey before colour classification
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")  # the six tasks, in order

# --- 1. the folder layout ------------------------------------------------------------------------------------------


def prompt_folder(out: Path, index: int) -> Path:
    """The folder of the prompt on line `index` (0-based) of the metadata file: ``<out>/<index:05d>``."""
    return Path(out) / f"{index:05d}"


def sample_path(out: Path, index: int, k: int) -> Path:
    """The k-th sample of prompt `index`: ``<out>/<index:05d>/samples/<k:04d>.png`` (the README's layout)."""
    return prompt_folder(out, index) / "samples" / f"{k:04d}.png"


def record(prompt) -> dict:
    """A GenEval prompt's metadata record (its line of ``evaluation_metadata.jsonl``) from a loaded Prompt:
    ``load_geneval`` keeps every field but ``prompt`` in ``meta``, non-strings as JSON."""
    meta = dict(prompt.meta)
    if "tag" not in meta or "include" not in meta:
        raise UserError(f"prompt {prompt.id!r} is not a GenEval prompt (no tag/include in its metadata); load the "
                        "prompts from GenEval's evaluation_metadata.jsonl")
    rec = {k: meta[k] if k == "tag" else json.loads(meta[k]) for k in ("tag", "include", "exclude") if k in meta}
    rec.update({k: json_or_str(v) for k, v in meta.items() if k not in rec})
    rec["prompt"] = prompt.text
    return rec


def json_or_str(v: str):
    """A metadata value as it was written: the JSON it holds (GenEval's include/exclude clauses), else the string."""
    try:
        return json.loads(v)
    except (json.JSONDecodeError, TypeError):
        return v


def png_bytes(image: np.ndarray) -> bytes:
    """Lossless PNG of a uint8 [H, W, 3] image."""
    buf = BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_sample(out: Path, index: int, k: int, image: np.ndarray, metadata: dict) -> Path:
    """Sample `k` of prompt `index` (uint8 [H, W, 3]) and, once per prompt, its metadata as one JSON line; atomic."""
    meta = prompt_folder(out, index) / "metadata.jsonl"
    if not meta.exists():
        io.write_text(meta, json.dumps(metadata) + "\n")
    path = sample_path(out, index, k)
    io.write_bytes(path, png_bytes(image))
    return path


def read_layout(folder: Path) -> list[tuple[Path, dict]]:
    """(image path, metadata) for every sample the official scorer would read under `folder`, in sorted order:
    digit-named subfolders with a ``metadata.jsonl`` (one JSON object) and their ``samples/<digits>.png``."""
    out = []
    for sub in sorted(p for p in Path(folder).iterdir() if p.is_dir() and p.name.isdigit()):
        metadata = json.loads((sub / "metadata.jsonl").read_text())
        for img in sorted((sub / "samples").iterdir()):
            if img.is_file() and img.suffix == ".png" and img.stem.isdigit():
                out.append((img, metadata))
    return out


# --- 2. the rules --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Detection:
    """One detected object: its GenEval (COCO) class name, box (x0, y0, x1, y1) in pixels, confidence, and its
    instance mask (bool [H, W]) when the detector segments."""

    label: str
    box: tuple[float, float, float, float]
    score: float
    mask: np.ndarray | None = dataclasses.field(default=None, compare=False)


def compute_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two xyxy boxes with GenEval's inclusive-pixel areas ((x1 - x0 + 1)·(y1 - y0 + 1); ``compute_iou``)."""
    def area(box):
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0


def kept(detections: list[Detection], tag: str, threshold: float = THRESHOLD,
         counting_threshold: float = COUNTING_THRESHOLD) -> dict[str, list[Detection]]:
    """Class name -> the detections the rules see, most confident first (``evaluate_image``): confidence above the
    tag's threshold, at most MAX_OBJECTS per class, then greedy NMS at NMS_THRESHOLD (off at 1.0)."""
    cut = counting_threshold if tag == "counting" else threshold
    out: dict[str, list[Detection]] = {}
    for label in dict.fromkeys(d.label for d in detections):
        order = sorted((d for d in detections if d.label == label and d.score > cut), key=lambda d: -d.score)
        order = order[:MAX_OBJECTS]
        chosen = []
        while order:
            best = order.pop(0)
            chosen.append(best)
            order = [d for d in order if NMS_THRESHOLD == 1 or compute_iou(best.box, d.box) < NMS_THRESHOLD]
        if chosen:
            out[label] = chosen
    return out


def relative_position(a: Sequence[float], b: Sequence[float], threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Where box `a` lies relative to box `b` (``relative_position``): the centres' offset, each axis shrunk by
    `threshold`·(sum of the two boxes' sizes on it), over the offset's length; beyond ±0.5 on x "left of"/"right of",
    on y "above"/"below" (image y grows downwards); empty when both shrunk offsets vanish."""
    boxes = np.array([a[:4], b[:4]], dtype=np.float64).reshape(2, 2, 2)
    centre_a, centre_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = centre_a - centre_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


ColourFn = Callable[[list[Detection], str], list[str]]  # (a class's kept detections, class name) -> their colours


def evaluate(objects: dict[str, list[Detection]], metadata: dict, colours: ColourFn) -> tuple[bool, str]:
    """GenEval's verdict on one image (``evaluate``): every ``include`` clause holds (enough objects of the class;
    the `count` most confident of them in the asked colour; each of them in the asked relation to every object of
    the clause it names) and no ``exclude`` clause does (fewer than `count` of the class). Returns (correct, the
    reasons it is not, one per line, worded as the official scorer words them)."""
    correct, reason, matched_groups = True, [], []
    # 1. expected objects
    for req in metadata.get("include", []):
        classname, matched = req["class"], True
        found = objects.get(classname, [])[: req["count"]]
        if len(found) < req["count"]:
            correct = matched = False
            reason.append(f"expected {classname}>={req['count']}, found {len(found)}")
        else:
            if "color" in req:  # 2. colour of the most confident `count` objects
                got = colours(found, classname)
                if got.count(req["color"]) < req["count"]:
                    correct = matched = False
                    reason.append(f"expected {req['color']} {classname}>={req['count']}, found "
                                  f"{got.count(req['color'])} {req['color']}; and "
                                  + ", ".join(f"{got.count(c)} {c}" for c in COLORS if c in got))
            if "position" in req and matched:  # 3. relative position to the clause it names
                expected_rel, target_group = req["position"]
                if matched_groups[target_group] is None:
                    correct = matched = False
                    reason.append(f"no target for {classname} to be {expected_rel}")
                else:
                    for obj in found:
                        for target in matched_groups[target_group]:
                            true_rels = relative_position(obj.box, target.box)
                            if expected_rel not in true_rels:
                                correct = matched = False
                                reason.append(f"expected {classname} {expected_rel} target, found "
                                              f"{' and '.join(true_rels)} target")
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
    # 4. objects that must not be there (counting: one more than asked)
    for req in metadata.get("exclude", []):
        classname = req["class"]
        if len(objects.get(classname, [])) >= req["count"]:
            correct = False
            reason.append(f"expected {classname}<{req['count']}, found {len(objects[classname])}")
    return correct, "\n".join(reason)


def summary(tags: Sequence[str], correct: Sequence[bool]) -> dict[str, float]:
    """``summary_scores.py``: each tag's share of correct images, and ``overall`` the mean over the tags present
    (every task weighs the same, whatever its number of prompts)."""
    tags, correct = np.asarray(tags), np.asarray(correct, dtype=np.float64)
    out = {t: float(correct[tags == t].mean()) for t in dict.fromkeys(tags.tolist())}
    return {"overall": float(np.mean(list(out.values()))), **out}


# --- 3. the models the rules need ----------------------------------------------------------------------------------


class Detector(abc.ABC):
    """uint8 [H, W, 3] image -> every detection (labels in GenEval's COCO class names; no threshold applied: the
    rules apply GenEval's)."""

    @abc.abstractmethod
    def __call__(self, image: np.ndarray) -> list[Detection]:
        ...

    def identity(self) -> dict:
        """What moves its detections (stored beside the numbers)."""
        return {"kind": type(self).__name__}


class ColourJudge(abc.ABC):
    """Object crops (PIL RGB images, background painted BGCOLOR where a mask leaves it) of one class -> one of
    COLORS each."""

    @abc.abstractmethod
    def __call__(self, crops: list[Image.Image], classname: str) -> list[str]:
        ...

    def identity(self) -> dict:
        return {"kind": type(self).__name__}


def crop(image: Image.Image, det: Detection, bgcolor: str = BGCOLOR) -> Image.Image:
    """The crop the colour classifier sees (``ImageCrops``): the image inside the mask over a `bgcolor` canvas
    (no mask: the image as it is), cut to the box."""
    image = image.convert("RGB")
    if det.mask is not None:
        if tuple(det.mask.shape) != image.size[::-1]:
            raise ValueError(f"mask {det.mask.shape} does not match the image {image.size[::-1]}")
        blank = Image.new("RGB", image.size, color=bgcolor)
        image = Image.composite(image, blank, Image.fromarray(det.mask.astype(np.uint8) * 255))
    return image.crop(tuple(det.box[:4]))


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One image's result, as a line of the official scorer's results.jsonl carries it."""

    tag: str
    correct: bool
    reason: str
    detected: dict  # class -> boxes kept


def score_image(image: np.ndarray, metadata: dict, detector: Detector, judge: ColourJudge) -> Verdict:
    """GenEval's verdict on a uint8 [H, W, 3] image (``evaluate_image``): detect, keep, evaluate."""
    objects = kept(detector(image), metadata["tag"])
    pil = Image.fromarray(image)
    verdict, reason = evaluate(objects, metadata, lambda found, cls: judge([crop(pil, d) for d in found], cls))
    return Verdict(metadata["tag"], verdict, reason, {k: [list(d.box) for d in v] for k, v in objects.items()})


def weights_hash(folder: Path) -> str:
    """sha256 over a local model folder's files (names and contents), the detector's identity beside its numbers."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    return io.content_hash([[str(p.relative_to(folder)), io.sha256_file(p)] for p in files])


class TransformersDetector(Detector):
    """A transformers object detector (``AutoModelForObjectDetection`` and its ``AutoImageProcessor``) from a local
    folder as ``save_pretrained`` writes it; boxes from ``post_process_object_detection`` at threshold 0, labels from
    the model's ``id2label`` (COCO models use GenEval's class names). Not GenEval's Mask2Former: no masks."""

    def __init__(self, folder: Path, device: str = "cpu"):
        import torch
        from transformers import AutoImageProcessor, AutoModelForObjectDetection

        self.folder, self.device, self._torch = Path(folder), device, torch
        self.processor = AutoImageProcessor.from_pretrained(self.folder, local_files_only=True)
        self.model = AutoModelForObjectDetection.from_pretrained(self.folder, local_files_only=True)
        self.model.to(device).eval().requires_grad_(False)
        self.labels = self.model.config.id2label

    def __call__(self, image):
        torch = self._torch
        inputs = self.processor(images=[image], return_tensors="pt").to(self.device)
        with torch.no_grad():
            out = self.model(**inputs)
        res = self.processor.post_process_object_detection(out, threshold=0.0, target_sizes=[image.shape[:2]])[0]
        return [Detection(self.labels[int(k)], tuple(float(x) for x in box), float(s))
                for s, k, box in zip(res["scores"].cpu(), res["labels"].cpu(), res["boxes"].cpu())]

    def identity(self):
        return {"kind": "transformers", "model": type(self.model).__name__, "sha256": weights_hash(self.folder)}


class OpenClipColourJudge(ColourJudge):
    """GenEval's colour classifier: open_clip zero-shot over COLORS with COLOR_TEMPLATES (clip_benchmark's
    ``zero_shot_classifier``: per colour the normalised mean of the normalised template embeddings), each crop
    through the model's own preprocess. `model`: an open_clip architecture with `weights` a local file (GenEval:
    ViT-L-14 with OpenAI's weights), or ``local-dir:<folder>`` (open_clip_config.json, open_clip_model.safetensors)."""

    def __init__(self, model: str, weights: str | None = None, device: str = "cpu"):
        import open_clip
        import torch

        self.model_name, self.weights, self.device, self._torch = model, weights, device, torch
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model, pretrained=weights or None,
                                                                                device=device)
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model)
        self._classifiers: dict[str, object] = {}

    def classifier(self, classname: str):
        """[d, len(COLORS)] zero-shot weights for `classname` (built once per class, as the official scorer does)."""
        torch = self._torch
        if classname not in self._classifiers:
            cols = []
            with torch.no_grad():
                for c in COLORS:
                    texts = [t.format(c=c, classname=classname) for t in COLOR_TEMPLATES]
                    emb = self.model.encode_text(self.tokenizer(texts).to(self.device))
                    emb = torch.nn.functional.normalize(emb, dim=-1).mean(0)
                    cols.append(emb / emb.norm())
            self._classifiers[classname] = torch.stack(cols, 1)
        return self._classifiers[classname]

    def __call__(self, crops, classname):
        torch = self._torch
        if not crops:
            return []
        x = torch.stack([self.preprocess(c) for c in crops]).to(self.device)
        with torch.no_grad():
            img = torch.nn.functional.normalize(self.model.encode_image(x), dim=-1)
        return [COLORS[int(i)] for i in (img @ self.classifier(classname)).argmax(1).cpu()]

    def identity(self):
        path = Path(self.model_name[len("local-dir:"):]) / "open_clip_model.safetensors" \
            if self.model_name.startswith("local-dir:") else Path(self.weights) if self.weights else None
        return {"kind": "open_clip", "model": self.model_name,
                "sha256": io.sha256_file(path) if path is not None and path.is_file() else None}


# kind -> how a suite's [metrics.geneval] names the implementation; tests add stubs here
DETECTORS: dict[str, Callable[..., Detector]] = {"transformers": TransformersDetector}
COLOUR_JUDGES: dict[str, Callable[..., ColourJudge]] = {"open_clip": OpenClipColourJudge}
