"""What a suite names, loaded and checked: the device, the prompts, the teacher, the evaluators.

The prompts and the evaluators' reference follow the suite's protocol (``bench.protocols``): a COCO protocol
draws (caption, image) pairs from its annotations, and every input file is checked here, before anything is
written.

The real-scale parts (diffusers pipelines, Inception, open_clip) are imported only when a suite names them.
"""

from __future__ import annotations

from pathlib import Path

from bench import protocols
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


def suite_prompts(spec: str, samples: int, evaluators: dict | None = None) -> list:
    """The `samples` prompts a suite measures: its protocol's draw (``[evaluators]``; default: the first
    `samples` of the set). Captions of the shapes grammar get their ground truth; a COCO draw reads the
    annotations JSON `spec`. UserError when the set holds fewer, or is not the set the protocol needs."""
    preset = protocols.resolve(evaluators or {"kind": "shapes"})
    if preset.prompts == "coco-captions":
        from prompts.coco import draw_mlperf, draw_seeded, load_coco_captions

        draw = {"coco-seeded": draw_seeded, "mlperf": draw_mlperf}[preset.draw.kind]
        images = load_coco_captions(Path(spec))
        if samples > len(images):
            raise UserError(f"samples = {samples} but annotations {spec!r} hold only {len(images)} captioned images "
                            f"({preset.name} draws one caption per image); give samples <= {len(images)}")
        return draw(images, samples, preset.draw.seed, preset.id_prefix, Path(spec).name)
    prompts = load_prompts(spec, parse_caption=world.parse_caption)
    if samples > len(prompts):
        raise UserError(f"samples = {samples} but prompts {spec!r} has only {len(prompts)}")
    if preset.prompts == "partiprompts" and not all(p.id.startswith("parti-") for p in prompts):
        raise UserError(f"protocol {preset.name!r} needs the PartiPrompts TSV (header Prompt, Category, Challenge, "
                        f"Note); {spec!r} is another set")
    return prompts[:samples]



def check_metrics(metrics: list[str], prompts: list, spec: str, evaluators: str, settings: dict | None = None,
                  grouped: str | None = None) -> None:
    """Every metric the suite asks for can be measured on these prompts with its settings (each metric's own
    ``check``: `settings` are the suite's [metrics.<name>] tables), or a one-line UserError says why not and what
    would do. `grouped`: why this command cannot sample several seeds per prompt (None: it can), refusing the metrics
    that need them. A metric is never dropped silently."""
    from bench.metrics import registry

    for name in metrics:
        if name in registry.declared():
            cls = registry.get(name)
            if grouped is not None and "groups" in cls.needs:
                raise UserError(f"metric {name!r} samples several seeds per prompt within `flashbench run`, and "
                                f"{grouped}; remove {name!r} from metrics (or run without --shard)")
            cls.check(prompts, spec, evaluators, cls.make_config((settings or {}).get(name, {}), name))


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


def load_evaluators(spec: dict, device: str, prompts: list | None = None):
    """The evaluators a suite names: the shipped shapes evaluators, or Inception + open_clip under the suite's
    protocol. A COCO protocol's reference images are those of `prompts` (the draw), each checked here; a
    folder's images likewise. UserError naming what is missing or unreadable."""
    if spec["kind"] == "real":
        from bench.real import load_real_evaluators

        preset = protocols.resolve(spec)
        for key in ("clip_model", *preset.inputs):
            if key not in spec:
                raise UserError(f"[evaluators] kind = 'real' (protocol {preset.name!r}) needs {key} = ...")
        for key in ("reference", "images", "dinov2"):
            if key in spec and not Path(spec[key]).is_dir():
                raise UserError(f"[evaluators] {key} = {spec[key]!r} is not a folder; give the folder of its images")
        inc = spec.get("inception_dir")
        folder, images = (Path(spec[k]) if k in spec else None for k in ("reference", "images"))
        ev = load_real_evaluators(Path(inc) if inc else None, spec["clip_model"], spec.get("clip_pretrained"), folder,
                                  device, dtype=spec.get("dtype", "fp32"), protocol=preset, images_dir=images,
                                  dinov2_dir=Path(spec["dinov2"]) if "dinov2" in spec else None)
        if preset.reference == "drawn-images":
            ev.check_paired(prompts or [])
        return ev
    return load_shapes_evaluators(device)
