"""What a suite names, loaded and checked: the device, the prompts, the teacher, the evaluators.

The real-scale parts (diffusers pipelines, Inception, open_clip) are imported only when a suite names them.
"""

from __future__ import annotations

from pathlib import Path

from bench.shapes import world
from bench.shapes.evaluators import load_evaluators as load_shapes_evaluators
from bench.shapes.teacher import ShapesBackbone
from bench.suite import check_device_name
from core.errors import UserError
from prompts import load_prompts


def check_device(device: str) -> str:
    """`device` when it is cpu or an available cuda[:N]; UserError otherwise."""
    import torch

    check_device_name(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available here; use --device cpu")
    return device


def suite_prompts(spec: str, samples: int) -> list:
    """The first `samples` prompts of a suite's set; captions of the shapes grammar get their ground truth."""
    prompts = load_prompts(spec, parse_caption=world.parse_caption)
    if samples > len(prompts):
        raise UserError(f"samples = {samples} but prompts {spec!r} has only {len(prompts)}")
    return prompts[:samples]


def _ids(prompts: list, k: int = 5) -> str:
    ids = [p.id for p in prompts]
    return ", ".join(ids[:k]) + (f" and {len(ids) - k} more" if len(ids) > k else "")


def check_metrics(metrics: list[str], prompts: list, spec: str, evaluators: str) -> None:
    """Every metric the suite asks for can be measured on these prompts, or a UserError says why not.

    FID needs >= 2 samples, and in the embedded world a ground-truth scene per prompt (its real
    renders are the reference); accuracy needs the embedded world's attribute evaluator and each
    prompt's ground-truth objects. A metric is never dropped silently.
    """
    n = len(prompts)
    if "fid" in metrics:
        if n < 2:
            raise UserError(f"FID needs at least 2 samples (a covariance); samples = {n}: give --samples 2 or more, "
                            "or remove \"fid\" from metrics")
        lacking = [p for p in prompts if p.scene_seed is None or p.objects is None]
        if evaluators == "shapes" and lacking:
            raise UserError(f"fid in the embedded world compares with real renders of each prompt's scene, and "
                            f"{len(lacking)} of {n} prompts of {spec!r} have no ground-truth scene ({_ids(lacking)}); "
                            "use a shapes prompt set (shapes-eval, shapes-val) or remove \"fid\" from metrics")
    if "accuracy" in metrics:
        if evaluators != "shapes":
            raise UserError("accuracy needs the embedded world's attribute evaluator ([evaluators] kind = \"shapes\"); "
                            "remove \"accuracy\" from metrics at real scale")
        lacking = [p for p in prompts if p.objects is None]
        if lacking:
            raise UserError(f"accuracy needs each prompt's ground-truth objects, and {len(lacking)} of {n} prompts of "
                            f"{spec!r} have none ({_ids(lacking)}): write them in the shapes grammar (\"a large red "
                            "circle at the top left\") or remove \"accuracy\" from metrics")


def quiet_libraries() -> None:
    """No library progress bars or info logs while loading: a run's stderr holds its own messages only."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.disable_progress_bar()
        lib.utils.logging.set_verbosity_error()


def load_backbone(spec: dict, device: str):
    """The teacher a suite names: an embedded shapes teacher ("vp" or "flow"), or a diffusers directory of one of the
    families in ``methods.backbones`` (chosen by its model_index.json; settings checked against that family's)."""
    quiet_libraries()
    if spec["kind"] == "diffusers":
        from methods import backbones

        return backbones.load(spec, device)
    return ShapesBackbone.load(device, kind=spec.get("teacher", "vp"))


def load_evaluators(spec: dict, device: str):
    """The evaluators a suite names: the shipped shapes evaluators, or Inception + open_clip + a reference folder."""
    if spec["kind"] == "real":
        from bench.real import load_real_evaluators

        for key in ("clip_model", "reference"):
            if key not in spec:
                raise UserError(f"[evaluators] kind = 'real' needs {key} = ...")
        inc = spec.get("inception_dir")
        return load_real_evaluators(Path(inc) if inc else None, spec["clip_model"], spec.get("clip_pretrained"),
                                    Path(spec["reference"]), device, dtype=spec.get("dtype", "fp32"))
    return load_shapes_evaluators(device)
