"""Measurement protocols as papers report them: named, versioned, declarative presets.

A protocol fixes what a number is measured against: the prompt set and how prompts are drawn from it, the FID
reference (none, the drawn COCO images, the teacher's own samples, an image folder, the shapes world's renders),
the preprocessing of real and generated images before the feature network, and the published sample count. It
is data, never code: its whole definition (``Protocol.definition()``) goes into every row's protocol and its
comparability hash (``bench.provenance``), so rows of different protocols, or of two versions of one, are never
compared. A suite chooses one in its ``[evaluators]`` table (``protocol = "coco2014-30k"`` plus the inputs it
names); without one, real scale is ``unpaired-folder`` (a plain ``reference`` folder) and the embedded world is
``shapes-renders``. docs/protocols.md gives each preset's source and the commands to run it.

Change a preset's behaviour only together with its ``version``.
"""

from __future__ import annotations

import dataclasses

from core.errors import UserError, unknown

# [evaluators] keys that name a protocol's inputs (the other keys choose networks: inception_dir, clip_model, ...)
INPUT_KEYS = ("reference", "annotations", "images", "reference_method", "reference_steps", "reference_seed")
TEACHER_REFERENCE_SEED = 1_000_003  # teacher-fid's default noise seed for the reference samples (no suite uses it)


@dataclasses.dataclass(frozen=True)
class Draw:
    """Which prompts of the set are measured, in which order.

    kind: ``first`` (the first N in file order), ``coco-seeded`` (``prompts.coco.draw_seeded``: N distinct images
    by a seeded permutation, one caption each) or ``mlperf`` (``prompts.coco.draw_mlperf``). seed: the draw's
    seed (None for ``first``).
    """

    kind: str
    seed: int | None = None


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """What happens to every image, real and generated alike, before the FID feature network.

    crop: ``centre-square`` (the largest centred square, torchvision ``center_crop(img, min(img.size))``: BigGAN's
    ``CenterCropLongEdge`` as GigaGAN and DMD2 use it) or None; size: then a PIL LANCZOS resize to size x size
    pixels (GigaGAN/DMD2 ``eval_res``), None for no resize; network_resize: the feature network's own resize, last.
    """

    crop: str | None = None
    size: int | None = None
    network_resize: str = "clean-fid mode=clean: PIL bicubic to 299x299 on float32 channels"


@dataclasses.dataclass(frozen=True)
class Protocol:
    """One named, versioned measurement protocol.

    evaluators: the ``[evaluators] kind`` it runs on (``real`` or ``shapes``). prompts: the prompt set it needs:
    ``coco-captions`` (the ``annotations`` JSON), ``partiprompts`` (a PartiPrompts TSV as ``prompts``), ``shapes``
    or ``any``. reference: ``drawn-images`` (the images of the drawn captions, in the ``images`` folder),
    ``teacher-samples``, ``image-folder`` (the ``reference`` folder), ``scene-renders`` or ``none``. paired: the
    reference's image i belongs to prompt i, so the FID bootstrap resamples (generated, reference) pairs together.
    samples: the published sample count (None: the suite's ``samples``). inputs: the ``[evaluators]`` keys it
    needs (``optional``: those it may take). source: the paper and code it follows, and how it differs.
    """

    name: str
    version: int
    evaluators: str
    prompts: str
    draw: Draw
    reference: str
    paired: bool
    preprocess: Preprocess | None
    samples: int | None
    inputs: tuple[str, ...]
    source: str
    optional: tuple[str, ...] = ()
    id_prefix: str | None = None  # prompt ids of a COCO draw: "<id_prefix>-<image_id>"

    def definition(self) -> dict:
        """Every field, as JSON-able data: what goes into a row's protocol and its comparability hash."""
        return dataclasses.asdict(self)

    @property
    def measures_fid(self) -> bool:
        return self.reference != "none"


GIGAGAN = ("GigaGAN (Kang et al., CVPR 2023) COCO-30k as released in mingukkang/GigaGAN evaluation/ (data_util.py "
           "CenterCropLongEdge + evaluation.py resize_and_center_crop, eval_res=256, clean-fid) and copied by DMD2 "
           "(tianweiy/DMD2 main/coco_eval/coco_evaluator.py, --eval_res 256, --total_eval_samples 30000). "
           "Differences: their FID reference is the whole val2014 folder (40,504 images); here it is the 30,000 drawn "
           "images, each paired with its caption. Their caption draw is unseeded; here it is seeded (seed 0). DMD2's "
           "CLIP score prepends 'A photo depicts' and uses OpenAI ViT-B/32 or open_clip ViT-g-14; here it is the "
           "suite's open_clip model with its own transform and no prefix.")
MLPERF = ("MLPerf Inference SDXL text-to-image (mlcommons/inference text_to_image/): 5,000 captions of COCO 2014 val, "
          "one per image, drawn by tools/coco.py (first caption per image, seed 2023). Differences: MLPerf's FID uses "
          "pytorch-fid's Inception and precomputed statistics (tools/val2014.npz) and images as generated (1024x1024, "
          "resized inside the network); here the reference is the 5,000 drawn images, centre-cropped, through "
          "clean-fid's Inception and resize. MLPerf's CLIP score is 100*cos with open_clip ViT-B-32 (openai); here "
          "100*max(cos, 0) with the suite's open_clip model. Its FID/CLIP figures are therefore not comparable.")

PRESETS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("coco2014-30k", 1, "real", "coco-captions", Draw("coco-seeded", 0), "drawn-images", True,
             Preprocess("centre-square", 256), 30_000, ("annotations", "images"), GIGAGAN, id_prefix="coco2014"),
    Protocol("mlperf-sdxl-coco2014-5k", 1, "real", "coco-captions", Draw("mlperf", 2023), "drawn-images", True,
             Preprocess("centre-square", None), 5_000, ("annotations", "images"), MLPERF, id_prefix="coco2014"),
    Protocol("partiprompts", 1, "real", "partiprompts", Draw("first"), "none", False, None, 1632, (),
             "PartiPrompts (Yu et al., 2022; google-research/parti PartiPrompts.tsv): 1,632 prompts without real "
             "images, so CLIP score only; for FID use protocol teacher-fid."),
    Protocol("teacher-fid", 1, "real", "any", Draw("first"), "teacher-samples", True, Preprocess(), None,
             ("reference_method", "reference_steps"),
             "FID against the teacher's own samples on the same prompts, as pi-Flow (Chen et al., 2025) reports it "
             "(Lakonik/piFlow configs/piflux/*_test.py: Inception features of FLUX.1-dev samples on 3,200 HPSv2 "
             "prompts, flux_hpsv2_inception.pkl). Not implemented: its 'patch FID' (centre 299 crop, no resize).",
             optional=("reference_seed",)),
    Protocol("unpaired-folder", 1, "real", "any", Draw("first"), "image-folder", False, Preprocess(), None,
             ("reference",),
             "FID against any image folder, unpaired with the prompts: every image squashed to 299x299 by clean-fid's "
             "clean resize, without a centre crop (Parmar et al., CVPR 2022). Not a published text-to-image protocol."),
    Protocol("shapes-renders", 1, "shapes", "shapes", Draw("first"), "scene-renders", True, None, None, (),
             "The embedded world: FID against exact renders of each prompt's scene (bench/shapes)."),
)}
DEFAULT = {"real": "unpaired-folder", "shapes": "shapes-renders"}


def resolve(spec: dict) -> Protocol:
    """The protocol an ``[evaluators]`` table names (``protocol = ...``), or its kind's default; UserError naming
    the known presets (and a "did you mean") for an unknown name."""
    name = spec.get("protocol", DEFAULT[spec.get("kind", "shapes")])
    if name not in PRESETS:
        raise unknown("protocol", name, PRESETS)
    return PRESETS[name]


def check_suite(spec: dict, prompts: str | None, metrics: list[str], labels: list[str], where: str) -> Protocol:
    """The protocol of a suite's ``[evaluators]`` when its inputs fit, else a one-line UserError saying what would.

    `prompts`: the suite's ``prompts`` as written (None when absent); `metrics`: its metrics that need a set of real
    images to compare with (FID, ...: ``bench.metrics.registry.needs``); `labels`: its method labels
    (``reference_method`` must name one). Files are checked later, when they are read (``bench.components``).
    """
    p = resolve(spec)
    at = f"{where}: [evaluators] protocol = {p.name!r}"
    if p.evaluators != spec["kind"]:
        raise UserError(f"{at} runs on kind = {p.evaluators!r}, not {spec['kind']!r}; "
                        f"{spec['kind']} protocols: {', '.join(n for n, q in PRESETS.items() if q.evaluators == spec['kind'])}")
    missing = [k for k in p.inputs if k not in spec]
    if missing:
        raise UserError(f"{at} needs {', '.join(f'{k} = ...' for k in missing)} (see docs/protocols.md)")
    extra = [k for k in INPUT_KEYS if k in spec and k not in p.inputs + p.optional]
    if extra:
        raise UserError(f"{at} does not take {', '.join(extra)}; its inputs: {', '.join(p.inputs + p.optional) or 'none'}")
    if p.prompts == "coco-captions" and prompts is not None:
        raise UserError(f"{at} draws its prompts from annotations = {spec['annotations']!r}, paired with their images; "
                        f"remove prompts = {prompts!r}")
    if p.prompts == "partiprompts" and not str(prompts or "").endswith(".tsv"):
        raise UserError(f"{at} needs prompts = a PartiPrompts .tsv file, got {prompts!r}")
    if metrics and not p.measures_fid:
        raise UserError(f"{at} has no FID reference (no real images for its prompts); remove "
                        f"{', '.join(repr(m) for m in metrics)} from metrics or use protocol = \"teacher-fid\"")
    if p.reference == "teacher-samples":
        if spec["reference_method"] not in labels:
            raise unknown(f"reference_method (a [[methods]] label) in {where}", spec["reference_method"], labels)
        if spec["reference_steps"] < 1:
            raise UserError(f"{at}: reference_steps must be >= 1, got {spec['reference_steps']}")
    return p
