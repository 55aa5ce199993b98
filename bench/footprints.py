"""Per method: the networks a method entry keeps on the device and trains, and the update it runs, keyed by method
name and taking the method's settings (``FOOTPRINTS``). Each function cites the code it follows; ``bench.plan``
turns a footprint into bytes (its ``Lab`` gives the parameter counts, ``lab`` below) and runs the update on meta.

A planned method follows its own file: the student is a copy of the teacher's denoiser trained in fp32 master
weights (``methods.student.DistilledMethod.prepare``: ``.float()``, LoRA adapters of rank ``LORA_RANK`` on a frozen
fp32 base above ``LORA_THRESHOLD`` parameters unless ``lora_rank`` says otherwise), AdamW keeps two states per
trainable parameter in its dtype, and a trained student is kept in the backbone dtype until the runner releases the
method after its last cell.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

from core.errors import unknown
from methods import registry
from methods.student import LORA_RANK, LORA_THRESHOLD

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # per parameter or element, by dtype name


class Sizes(Protocol):
    """What a footprint needs to know about the planned pipeline (``bench.plan.Lab`` provides it): the backbone
    dtype (``dtype``), its layout ("unet", "sd3", "flux"), and parameter counts."""

    dtype: str
    layout: str

    def params(self, component: str) -> int: ...  # "denoiser", a text encoder, "vae"

    def lora_params(self, rank: int) -> int: ...  # rank-`rank` adapters on the denoiser's attention projections

    def w_params(self, w_dim: int) -> int: ...  # a guidance-scale embedding of width `w_dim`

    def disc_params(self) -> int: ...  # the discriminator's heads


@dataclasses.dataclass(frozen=True)
class Entry:
    """A suite's [[methods]] entry as plain data: the method's name, its row label, settings and step counts."""

    name: str
    settings: dict = dataclasses.field(default_factory=dict)
    steps: tuple[int, ...] = (4,)
    label: str = ""

    @property
    def title(self) -> str:
        return self.label or self.name


@dataclasses.dataclass(frozen=True)
class Copy:
    """A copy of the denoiser on the device: its role, dtype, and the parameters added to it (LoRA, w-embedding)."""

    role: str
    dtype: str
    extra: int = 0


@dataclasses.dataclass(frozen=True)
class Training:
    """One update of a distillation method. `student`: "full" or "lora" (rank `rank`); `state`: (what, bytes) the
    training holds beside its networks' activations (fp32 masters, AdamW states, EMA, fake score, discriminator);
    `step`: the update's calls, in the method's order, run on the meta device by ``Lab.train``."""

    batch: int
    student: str
    rank: int
    checkpointing: bool
    state: tuple[tuple[str, int], ...]
    step: str
    fake: bool = False
    real_images: bool = True
    teacher_calls: int = 1
    adversarial: bool = False
    r1: bool = False


@dataclasses.dataclass(frozen=True)
class Footprint:
    """What a method entry adds to the backbone: `kept` (copies it holds from creation until its last cell: students
    in the sampling dtype, a checkpoint), `sample_batch` (the denoiser's batch per sampled prompt: 2 for a batched
    [uncond; cond] call), `training` (None for training-free methods), `resolution` (pixels, None: the backbone's)."""

    kept: tuple[Copy, ...]
    sample_batch: int
    training: Training | None = None
    resolution: int | None = None  # the image side it samples at (pixels), None: the backbone's


def _config(entry: Entry):
    """The method's Config from the entry's settings (validated by the method itself: UserError on a bad setting)."""
    return registry.get(entry.name).make_config(dict(entry.settings), entry.title)


def _w_dim(entry: Entry) -> int:
    """The width of the method's guidance-scale embedding (its class's ``w_dim``: LCM, progressive), 0 without."""
    return registry.get(entry.name).w_dim or 0


def _lora_rank(cfg, denoiser_params: int) -> int:
    """methods.student.DistilledMethod.lora_rank: the setting, else LORA_RANK above LORA_THRESHOLD parameters."""
    if cfg.lora_rank is not None:
        return cfg.lora_rank
    return LORA_RANK if denoiser_params > LORA_THRESHOLD else 0


def _training(lab: Sizes, cfg, step: str, w_dim: int = 0, ema: bool = False, fake: bool = False, disc: bool = False,
              **kw) -> Training:
    """A Training whose state follows methods.student.prepare: the student a fp32 copy (`.float()`), or with LoRA a
    frozen base in the backbone dtype with fp32 adapters (and w-embedding); AdamW (two fp32 states) on what trains; an
    EMA is a deepcopy of the student (methods.training.EMA); a fake score a trainable copy in the backbone dtype with
    AdamW states in that dtype (methods.dmd2); the discriminator's heads fp32 with AdamW and gradients
    (methods.discriminator)."""
    p = lab.params("denoiser")
    rank = _lora_rank(cfg, p)
    w = lab.w_params(w_dim) if w_dim else 0
    lora = lab.lora_params(rank) if rank else 0
    trainable = (lora + w) if rank else (p + w)
    student_bytes = (BYTES[lab.dtype] * p + 4 * trainable) if rank else 4 * (p + w)
    name = f"student ({lab.dtype} base, fp32 adapters)" if rank else "student fp32 masters"
    state = [(name, student_bytes), ("AdamW states (2 × fp32)", 8 * trainable)]
    if ema:
        state.append(("EMA copy", student_bytes))
    if fake:
        b = BYTES[lab.dtype]
        state.append((f"fake score ({lab.dtype}) + AdamW states", 3 * b * p))
    if disc:
        state.append(("discriminator heads + AdamW + grads (fp32)", 16 * lab.disc_params()))
    return Training(cfg.batch_size, "lora" if rank else "full", rank, cfg.gradient_checkpointing, tuple(state), step,
                    fake=fake, adversarial=disc, **kw)


def _students(lab: Sizes, n: int, w_dim: int = 0, rank: int = 0) -> tuple[Copy, ...]:
    extra = (lab.lora_params(rank) if rank else 0) + (lab.w_params(w_dim) if w_dim else 0)
    return tuple(Copy(f"student {i + 1}/{n}" if n > 1 else "student", lab.dtype, extra) for i in range(n))


def teacher_footprint(lab: Sizes, entry: Entry) -> Footprint:
    """methods.teacher: nothing beyond the backbone; cfg is one batched call on [uncond; cond] (2B), true-cfg two
    sequential calls (B), embedded / none one call (B)."""
    cfg = _config(entry)
    return Footprint((), 2 if cfg.guidance == "cfg" else 1)


def pretrained_footprint(lab: Sizes, entry: Entry) -> Footprint:
    """methods.pretrained: the checkpoint (a directory, a single-file state dict, or a LoRA fused into new_net()) as a
    copy of the denoiser in the backbone's dtype beside the teacher, sampled at its recipe's resolution (`resolution`,
    None: the backbone's). Assumed: the checkpoint has the teacher's architecture (Lightning, Turbo, Hyper-SD, DMD2
    and LCM checkpoints do); an LCM UNet's guidance embedding is counted."""
    cfg = _config(entry)
    w = lab.w_params(registry.get("lcm").w_dim) if cfg.guidance == "embedded" and lab.layout == "unet" else 0
    return Footprint((Copy("checkpoint", lab.dtype, w),), 2 if cfg.guidance == "cfg" else 1,
                     resolution=getattr(cfg, "resolution", None))


def lcm_footprint(lab: Sizes, entry: Entry) -> Footprint:
    """methods.lcm: one student with a w-embedding for every step count; an update encodes captions and real images,
    runs the student (grad), the guided teacher on [uncond; cond] and the EMA target, and steps the student."""
    cfg = _config(entry)
    t = _training(lab, cfg, "lcm", w_dim=_w_dim(entry), ema=True)
    return Footprint(_students(lab, 1, _w_dim(entry), t.rank), 1, t)


def dmd2_footprint(lab: Sizes, entry: Entry) -> Footprint:
    """methods.dmd2: a fake-score copy trained online (fake_updates per generator update), the generator by backward
    simulation, the guided teacher and the fake score at a noised x̂_0, the GAN term through frozen teacher
    features; one shared student (else one per step count)."""
    cfg = _config(entry)
    t = _training(lab, cfg, "dmd2", fake=True, disc=True, r1=cfg.r1_gamma > 0)
    n = 1 if cfg.shared_student else len(set(entry.steps))
    return Footprint(_students(lab, n, 0, t.rank), 1, t)


def add_footprint(lab: Sizes, entry: Entry) -> Footprint:
    """methods.add: the student on noised real images, the guided teacher on its re-noised output, the GAN term
    through frozen teacher features, the discriminator with R1 (r1_gamma 1e-5 by default: a double backward with
    the math attention kernel); one student for every step count."""
    cfg = _config(entry)
    t = _training(lab, cfg, "add", disc=True, r1=cfg.r1_gamma > 0)
    return Footprint(_students(lab, 1, 0, t.rank), 1, t)


def imagine_flash_footprint(lab: Sizes, entry: Entry) -> Footprint:
    """methods.imagine_flash: backward distillation (the student's own no-grad rollout), the student (grad), k guided
    teacher steps for the SRL target; the GAN term and an R1 discriminator when adversarial; one student per step
    count unless shared_student."""
    cfg = _config(entry)
    real = cfg.adversarial or not cfg.backward_distillation
    t = _training(lab, cfg, "imagine-flash", disc=cfg.adversarial, r1=cfg.adversarial and cfg.r1_gamma > 0,
                  real_images=real, teacher_calls=cfg.teacher_steps)
    n = 1 if cfg.shared_student else len(set(entry.steps))
    return Footprint(_students(lab, n, 0, t.rank), 1, t)


def progressive_footprint(lab: Sizes, entry: Entry) -> Footprint:
    """methods.progressive: a w-embedded student per halving round from max_steps down to the fewest steps asked, all
    kept; the CFG stage (student + guided teacher on [uncond; cond]) is the largest update and is the one planned."""
    cfg = _config(entry)
    t = _training(lab, cfg, "progressive", w_dim=_w_dim(entry))
    rounds = max(1, cfg.max_steps.bit_length() - min(entry.steps).bit_length() + 1)
    return Footprint(_students(lab, rounds, _w_dim(entry), t.rank), 1, t)


FOOTPRINTS: dict[str, Callable[[Sizes, Entry], Footprint]] = {
    "teacher": teacher_footprint, "pretrained": pretrained_footprint, "lcm": lcm_footprint, "dmd2": dmd2_footprint,
    "add": add_footprint, "imagine-flash": imagine_flash_footprint, "progressive": progressive_footprint}


def footprint(lab: Sizes, entry: Entry) -> Footprint:
    """The entry's footprint; UserError for a method with no entry in FOOTPRINTS."""
    if entry.name not in FOOTPRINTS:
        raise unknown("method to plan", entry.name, FOOTPRINTS)
    return FOOTPRINTS[entry.name](lab, entry)
