"""What a suite names, loaded and checked: the device, the prompts, the teacher, the evaluators.

The real-scale parts (diffusers pipelines, Inception, open_clip) are imported only when a suite names them.
"""

from __future__ import annotations

from pathlib import Path

from bench.shapes import world
from bench.shapes.evaluators import load_evaluators as load_shapes_evaluators
from bench.shapes.teacher import ShapesBackbone
from core.errors import UserError
from prompts import load_prompts


def check_device(device: str) -> str:
    """`device` when it is cpu or an available cuda[:N]; UserError otherwise."""
    import torch

    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"--device must be cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available here; use --device cpu")
    return device


def suite_prompts(spec: str, samples: int) -> list:
    """The first `samples` prompts of a suite's set; captions of the shapes grammar get their ground truth."""
    prompts = load_prompts(spec, parse_caption=world.parse_caption)
    if samples > len(prompts):
        raise UserError(f"samples = {samples} but prompts {spec!r} has only {len(prompts)}")
    return prompts[:samples]


def load_backbone(spec: dict, device: str):
    """The teacher a suite names: the embedded shapes teacher, or an SD/SDXL directory."""
    if spec["kind"] == "diffusers":
        from methods.diffusers_backbone import DiffusersBackbone

        if "path" not in spec:
            raise UserError("[backbone] kind = 'diffusers' needs path = a local SD/SDXL diffusers directory")
        data = spec.get("train_data")
        return DiffusersBackbone.load(Path(spec["path"]), device, Path(data) if data else None)
    return ShapesBackbone.load(device)


def load_evaluators(spec: dict, device: str):
    """The evaluators a suite names: the shipped shapes evaluators, or Inception + open_clip + a reference folder."""
    if spec["kind"] == "real":
        from bench.real import load_real_evaluators

        for key in ("clip_model", "reference"):
            if key not in spec:
                raise UserError(f"[evaluators] kind = 'real' needs {key} = ...")
        inc = spec.get("inception_dir")
        return load_real_evaluators(Path(inc) if inc else None, spec["clip_model"], spec.get("clip_pretrained"),
                                    Path(spec["reference"]), device)
    return load_shapes_evaluators(device)
