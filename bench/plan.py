"""A memory plan before a real-scale run: per method entry and rank, the bytes of every resident network, the
activations of each phase at the batch size, the peak, and a refusal naming the setting that would make it fit.

    python -m bench.plan --arch sdxl --device-memory 80GB --ranks 1,8 --batch-size 16 --methods teacher,lcm,dmd2

No weights are read: the networks are built from their config.json on the meta device (``bench.networks``) and
every phase is run there under ``bench.memtrack`` (live tensor bytes, CUDA's fused attention and autocast).

Reading order:

1. ``Setup`` (what the suite fixes: arch, dtype, batch, samples, evaluators) and ``Options`` (what may change to
   make a plan fit: ranks, offload, VAE slicing / tiling, the device's bytes);
2. ``bench.footprints.footprint``: per method, the networks an entry keeps and trains, keyed by method name and
   taking the method's settings (one function per method, each citing the code it follows);
3. ``Lab``: the meta networks, and the measured activations of each phase (memoised);
4. ``plan_entry`` / ``plan_suite``: resident bytes + phase activations per phase, the peak over phases;
5. ``verdict`` / ``check``: a plan over the device's memory is one line naming the fix (``changes`` lists them,
   each re-planned), raised as a ``UserError`` by ``check``;
6. ``render`` and ``main``: the Markdown table and the command.

For ``flashbench run --dry-run`` (plain inputs: the suite's tables and entries):

    setup = setup_from_suite(suite.backbone, suite.evaluators, suite.batch_size, suite.samples)
    options = options_from_suite(suite.backbone, ranks=world, device_memory=device_memory(spec))
    entries = [Entry(e.name, dataclasses.asdict(e.config), tuple(b.steps for b in e.budgets), e.label)
               for e in suite.entries]  # the settings as the method sees them (the family's conventions filled)
    lab = Lab(setup)
    plans = plan_suite(setup, entries, options, lab)
    print(render(lab, plans)); check(lab, plans)  # check: UserError (one line) naming the fix

Bytes are bytes; tables print GiB (2**30). Data parallel: every rank holds full copies of every network; each rank
samples its own shard of the prompts in batches of the suite's ``batch_size`` (``bench.runner.sample_and_measure``),
so ranks shrink the per-rank sampling batch only when a shard is smaller than a batch; a distilled method trains
on its own ``batch_size`` per rank. An entry's plan holds only what it loads: the runner releases each method after
its last cell.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import re
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch

from bench import networks as N
from bench.footprints import BYTES, LORA_RANK, Entry, Training, footprint
from bench.memtrack import backward, measure
from core.errors import UserError
from core.io import write_text

GiB = 2**30
RESERVE = 2 * GiB  # per rank, outside PyTorch's tensors: CUDA context, cuBLAS/cuDNN workspaces, fragmentation (assumed)
PHASES = ("text", "sample", "decode", "eval", "train")
OFFLOAD = ("none", "model")
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
         "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """'80GB' -> 80·10⁹, '79.6GiB' -> 79.6·2³⁰, '85899345920' -> bytes; UserError on anything else."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*", text or "", re.I)
    if not m or float(m[1]) <= 0:
        raise UserError(f"device memory must be a positive size like 80GB (10^9 bytes) or 79.6GiB (2^30), got {text!r}")
    return int(float(m[1]) * UNITS[(m[2] or "").upper()])


# --- 1. what is fixed, what may change --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the suite fixes. `dtype`: the backbone's (fp32 | bf16 | fp16); `batch_size`: the suite's sampling batch;
    `samples`: the suite's sample count (None: enough for every rank to fill whole batches); `clip_model`: the
    open_clip evaluator (None: no CLIP score); `inception`: FID's Inception; `eval_dtype`: the evaluators' dtype."""

    arch: N.Arch
    dtype: str = "bf16"
    batch_size: int = 16
    samples: int | None = None
    clip_model: str | None = "ViT-B-32"
    inception: bool = True
    eval_dtype: str = "fp32"
    vae: str | None = None  # [backbone] vae_dtype; None: the family's rule

    def __post_init__(self):
        for name in ("dtype", "eval_dtype"):
            if getattr(self, name) not in BYTES:
                raise UserError(f"{name} must be one of {', '.join(BYTES)}, got {getattr(self, name)!r}")
        if self.batch_size < 1 or (self.samples is not None and self.samples < 1):
            raise UserError(f"batch_size and samples must be >= 1, got {self.batch_size} and {self.samples}")

    @property
    def vae_dtype(self) -> str:
        """The VAE's: `vae` when set, else the family's rule (SDXL: fp32 where an fp16 VAE would overflow, its config's
        force_upcast; every other family: the backbone dtype; methods/backbones/*.default_vae_dtype)."""
        if self.vae:
            return self.vae
        upcast = self.arch.pipeline == "StableDiffusionXLPipeline" and self.dtype == "fp16" and \
            self.arch.vae.config.get("force_upcast")
        return "fp32" if upcast else self.dtype


@dataclasses.dataclass(frozen=True)
class Options:
    """What may change to make a plan fit: data-parallel `ranks`, and the ``[backbone]`` settings ``offload`` ("model":
    text encoders and VAE on the CPU until their phase, the denoiser resident), ``vae_slicing`` / ``vae_tiling``
    (diffusers' AutoencoderKL switches); `device_memory` and `reserve`: bytes."""

    ranks: int = 1
    offload: str = "none"
    vae_slicing: bool = False
    vae_tiling: bool = False
    device_memory: int | None = None
    reserve: int = RESERVE

    def __post_init__(self):
        if self.ranks < 1:
            raise UserError(f"ranks must be >= 1, got {self.ranks}")
        if self.offload not in OFFLOAD:
            raise UserError(f"offload must be one of {', '.join(OFFLOAD)}, got {self.offload!r}")
        if self.device_memory is not None and self.device_memory <= self.reserve:
            raise UserError(f"device memory {self.device_memory / GiB:.1f} GiB leaves nothing beside the "
                            f"{self.reserve / GiB:.1f} GiB reserve for CUDA's context and workspaces; give the device's "
                            "size, e.g. 80GB")


# --- 3. the meta networks and their measured activations (2. is bench.footprints) ------------------------------------


class Lab:
    """The setup's networks on the meta device (built once) and the activations of each phase (measured once per
    batch and option): bytes, as ``bench.memtrack.measure`` counts them."""

    def __init__(self, setup: Setup):
        _quiet()
        self.setup = setup
        self.arch = setup.arch
        self.dtype, self.layout = setup.dtype, setup.arch.layout  # bench.footprints.Sizes
        self._nets: dict = {}
        self._memo: dict = {}

    @classmethod
    def sharing(cls, other: Lab, setup: Setup) -> Lab:
        """A Lab for `setup` (the same arch and dtypes, another batch size) sharing `other`'s networks and measures."""
        lab = cls(setup)
        lab._nets, lab._memo = other._nets, other._memo
        return lab

    # networks
    def net(self, component: str, dtype: str) -> torch.nn.Module:
        key = (component, dtype)
        if key not in self._nets:
            comp = self.arch.denoiser if component == "denoiser" else self.arch.components[component]
            self._nets[key] = N.build(comp, N.DTYPES[dtype])
        return self._nets[key]

    def params(self, component: str) -> int:
        """Parameters of "denoiser" or a component (counted on its meta network)."""
        return self._cached(("params", component), lambda: N.param_count(self.net(component, self.setup.dtype)))

    def lora_params(self, rank: int) -> int:
        return N.lora_param_count(self.net("denoiser", self.setup.dtype), rank)

    def w_params(self, w_dim: int) -> int:
        """The w-embedding's parameters: UNet time_embedding.cond_proj (no bias), FlowNet.cond_proj (bias)."""
        cfg = self.arch.denoiser.config
        if self.arch.layout == "unet":
            return w_dim * cfg["block_out_channels"][0]
        d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        return w_dim * d + d

    def disc_params(self) -> int:
        """methods.discriminator heads: per feature level Conv3×3(C→w), GroupNorm, Conv1×1, Linear(w→1), Linear(D→w)."""
        cfg, w = self.arch.denoiser.config, _disc_width()
        if self.arch.layout == "unet":
            chans, text = [*cfg["block_out_channels"], cfg["block_out_channels"][-1]], cfg["cross_attention_dim"]
        else:
            levels = min(4, cfg["num_layers"])
            chans, text = [cfg["num_attention_heads"] * cfg["attention_head_dim"]] * levels, cfg["joint_attention_dim"]
        return sum(9 * c * w + w + 2 * w + w * w + w + w + 1 + text * w + w for c in chans)

    def evaluator_params(self) -> dict[str, int]:
        return self._cached(("eval-params",), lambda: {k: N.param_count(m) for k, m in self._evaluators().items()})

    def _cached(self, key, fn):
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    # phases, no grad
    def text(self, batch: int) -> int:
        """The largest text-encoder forward at `batch` prompts (the encoders run one after another)."""
        def run(_):
            with torch.no_grad():
                for comp in self.arch.text_encoders:
                    N.text_call(self.arch, comp, self.net(comp.name, self.setup.dtype), batch)
        return self._cached(("text", batch), lambda: measure(run).peak)

    def sample(self, batch: int, resolution: int | None = None) -> int:
        """One denoiser evaluation at `batch` (a sampler's state and conditioning included: created in the call), at
        `resolution` pixels (None: the arch's)."""
        def run(_):
            with torch.no_grad():
                N.denoiser_call(self.arch, self.net("denoiser", self.setup.dtype), batch, resolution)
        return self._cached(("sample", batch, resolution), lambda: measure(run).peak)

    def decode(self, batch: int, slicing: bool, tiling: bool, resolution: int | None = None) -> int:
        """The VAE decode of `batch` latents to float32 images, whole, sliced or tiled, at `resolution` pixels."""
        def run(_):
            vae = self.net("vae", self.setup.vae_dtype)
            N.vae_modes(vae, slicing, tiling)
            try:
                with torch.no_grad():
                    N.decode_call(self.arch, vae, batch, resolution)
            finally:
                N.vae_modes(vae, False, False)
        return self._cached(("decode", batch, slicing, tiling, resolution), lambda: measure(run).peak)

    def evaluate(self, batch: int) -> int:
        """Inception at 299² and the CLIP image and text towers at `batch` (the evaluators' dtype), one at a time."""
        def run(_):
            dt = N.DTYPES[self.setup.eval_dtype]
            with torch.no_grad():
                for name, m in self._evaluators().items():
                    if name == "inception":
                        m(torch.randn(batch, 3, 299, 299, device="meta", dtype=dt))
                    else:
                        size = m.visual.image_size
                        size = size if isinstance(size, int) else size[0]
                        m.encode_image(torch.randn(batch, 3, size, size, device="meta", dtype=dt))
                        m.encode_text(torch.zeros(batch, 77, device="meta", dtype=torch.long))
        return self._cached(("eval", batch), lambda: measure(run).peak)

    def _evaluators(self) -> dict[str, torch.nn.Module]:
        def build():
            nets, dt = {}, N.DTYPES[self.setup.eval_dtype]
            with torch.device("meta"):
                if self.setup.inception:  # clean-fid's InceptionV3W: torchvision's Inception3, 1008 classes, no aux
                    import torchvision

                    nets["inception"] = torchvision.models.Inception3(num_classes=1008, aux_logits=False,
                                                                      transform_input=False, init_weights=False)
                if self.setup.clip_model:
                    nets["clip"] = _clip_on_meta(self.setup.clip_model)
            return {k: m.to(dt).eval().requires_grad_(False) for k, m in nets.items()}
        return self._cached(("evaluators",), build)

    # training: one update under autocast to the backbone dtype, as DistilledMethod.prepare
    @property
    def autocast(self) -> torch.dtype | None:
        return None if self.setup.dtype == "fp32" else N.DTYPES[self.setup.dtype]

    def student(self, rank: int) -> torch.nn.Module:
        """The student being trained, as methods.student.prepare makes it: all of it a trainable fp32 copy of the
        denoiser (rank 0), or rank-`rank` LoRA adapters (peft) in fp32 on a frozen base in the backbone dtype. Built
        once per rank."""
        def build():
            if not rank:
                return N.build(self.arch.denoiser, torch.float32).requires_grad_(True)
            net = N.build(self.arch.denoiser, N.DTYPES[self.setup.dtype])
            N.add_lora(net, rank)
            for param in net.parameters():
                if param.requires_grad:
                    param.data = param.data.float()
            return net
        return self._cached(("student", rank), build)

    def fake(self) -> torch.nn.Module:
        """DMD2's fake score: a trainable copy of the teacher in the backbone dtype (new_unet())."""
        import copy

        return self._cached(("fake",), lambda: copy.deepcopy(self.net("denoiser", self.setup.dtype)).requires_grad_(True))

    def nograd(self, role: str, batch: int, rank: int = 0) -> int:
        """Peak bytes of one no-grad denoiser call at `batch` inside an update (under autocast): `role` "teacher" (the
        frozen teacher, also the fake score's shapes) or "student" (the fp32 student, weights cast on every use)."""
        def run(_):
            net = self.student(rank) if role == "student" else self.net("denoiser", self.setup.dtype)
            with torch.no_grad(), _mixed_dtype_quiet():
                N.denoiser_call(self.arch, net, batch)
        return self._cached(("nograd", role, batch, rank), lambda: measure(run, autocast=self.autocast).peak)

    def encodings(self, batch: int) -> dict[str, int]:
        """Peak bytes of an update's caption encoding ("text") and real-image VAE encoding ("vae") at `batch`."""
        def text(_):
            with torch.no_grad():
                for comp in self.arch.text_encoders:
                    N.text_call(self.arch, comp, self.net(comp.name, self.setup.dtype), batch)

        def vae(_):
            with torch.no_grad():
                N.encode_call(self.arch, self.net("vae", self.setup.vae_dtype), batch)
        return self._cached(("encodings", batch), lambda: {"text": measure(text, autocast=self.autocast).peak,
                                                           "vae": measure(vae, autocast=self.autocast).peak})

    def train(self, t: Training) -> dict[str, int]:
        """Peak bytes of one update ("train"), and of its caption ("text") and image ("vae") encodings with what the
        update holds then (``_measure_update``)."""
        key = ("train", t.step, t.batch, t.student, t.rank, t.checkpointing, t.fake, t.real_images, t.teacher_calls,
               t.adversarial, t.r1)
        return self._cached(key, lambda: _measure_update(self, t))


def _clip_on_meta(name: str) -> torch.nn.Module:
    """The open_clip model `name` (a registered name, or "local-dir:FOLDER" with its open_clip_config.json) on the
    meta device, without weights. UserError for a name open_clip does not know."""
    import json

    import open_clip

    if name.startswith("local-dir:"):
        cfg_path = Path(name[len("local-dir:"):]) / "open_clip_config.json"
        try:
            cfg = json.loads(cfg_path.read_text())["model_cfg"]
        except (OSError, ValueError, KeyError):
            raise UserError(f"clip_model {name!r}: {cfg_path} is not an open_clip_config.json with model_cfg") from None
        return open_clip.CLIP(**cfg)
    if name not in open_clip.list_models():
        raise UserError(f"unknown open_clip model {name!r} (e.g. ViT-B-32, ViT-L-14)")
    with _root_log(logging.ERROR):  # "No pretrained weights loaded": none are wanted
        return open_clip.create_model(name, pretrained=None, device="meta")


def _disc_width() -> int:
    """The width of each discriminator head (TeacherFeatureDiscriminator's default)."""
    import inspect

    from methods.discriminator import TeacherFeatureDiscriminator

    return inspect.signature(TeacherFeatureDiscriminator).parameters["width"].default


def _quiet() -> None:
    """No library info logs (as bench.components.quiet_libraries): a plan's output is its table."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()


@contextlib.contextmanager
def _mixed_dtype_quiet():
    """Without torch's warning that rms_norm got a bf16 input and fp32 (master) weights: the student does, on the
    device too; the plan's output is its table."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
        yield


@contextlib.contextmanager
def _root_log(level: int):
    root = logging.getLogger()
    saved = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(saved)


class _Update:
    """The calls an update is made of, measured by one LiveBytes `tracker`. Calls with grad run on the meta networks;
    a no-grad call adds its memoised peak on top of what is live (``Lab.nograd``: a no-grad forward allocates only
    its own transients) and leaves its float32 output; the caption and image encodings likewise (``windows``)."""

    def __init__(self, lab: Lab, t: Training, tracker):
        self.lab, self.t, self.tracker, self.b = lab, t, tracker, t.batch
        self.windows: dict[str, int] = {}

    def _encode(self, name: str) -> None:
        transient = self.lab.encodings(self.b)[name]
        self.windows[name] = self.tracker.live + transient
        self.tracker.bump(transient)

    def captions(self) -> None:
        self._encode("text")

    def images(self) -> None:
        if self.t.real_images:
            self._encode("vae")

    def nograd(self, role: str, batch: int | None = None) -> torch.Tensor:
        b = batch or self.b
        self.tracker.bump(self.lab.nograd(role, b, self.t.rank if self.t.student == "lora" else 0))
        c, s = self.lab.arch.latent()
        return torch.empty(b, c, s, s, device="meta")

    def grad(self, net, x=None) -> torch.Tensor:
        with torch.enable_grad():
            return N.denoiser_call(self.lab.arch, net, self.b, x=x)

    def features(self, teacher, x) -> torch.Tensor:
        """The frozen teacher on a sample that carries gradient (the GAN term's generator side; a whole forward, an
        upper bound for a UNet, whose discriminator reads only the down and mid blocks)."""
        return self.grad(teacher, x=x)

    def r1(self, teacher) -> None:
        """The discriminator's R1 at a noised real sample: the teacher's features under the math attention kernel, their
        input gradient with create_graph, and its square backpropagated (methods.discriminator.d_loss)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        c, s = self.lab.arch.latent()
        x = torch.randn(self.b, c, s, s, device="meta", requires_grad=True)
        with sdpa_kernel(SDPBackend.MATH), torch.enable_grad():
            out = N.denoiser_call(self.lab.arch, teacher, self.b, x=x)
            (g,) = backward(out.square().mean(), inputs=(x,), create_graph=True)
            backward(g.square().sum())

    def update(self, loss, opt) -> None:
        """methods.training.optimizer_step: zero the gradients, backward, clip, AdamW's (foreach) step."""
        opt.zero_grad(set_to_none=True)
        backward(loss)
        params = [p for g in opt.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # per-tensor norms (scalars) and an in-place scale
        opt.step()


def _adamw(params):
    """AdamW (foreach, as on CUDA) whose states exist already (made outside the tracker: they are Training.state),
    in the parameters' dtype as torch makes them."""
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, foreach=True)
    for p in params:
        opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    return opt


def _measure_update(lab: Lab, t: Training) -> dict[str, int]:
    """One update of `t.step` on meta, in the method's order of calls (each footprint's docstring), with the previous
    update's gradients alive at its start (optimizer_step frees them only at its zero_grad)."""
    student = lab.student(t.rank if t.student == "lora" else 0)
    if t.checkpointing:
        student.enable_gradient_checkpointing()
    teacher = lab.net("denoiser", lab.setup.dtype)
    fake = lab.fake() if t.fake else None
    opts = [_adamw(student.parameters())] + ([_adamw(fake.parameters())] if fake is not None else [])
    windows = {}

    def run(tracker):
        u = _Update(lab, t, tracker)
        for o in opts:
            for p in o.state:
                p.grad = torch.empty_like(p)
        u.captions()
        u.images()
        if t.step == "dmd2":
            # 1. a fake-score update on the generator's no-grad (backward-simulated) samples
            u.nograd("student")
            u.update(u.grad(fake).square().mean(), opts[1])
            # 2. the generator: backward-simulated input, x̂_0 with grad, the guided teacher on [uncond; cond] and the
            #    fake score at a noised x̂_0, the GAN term through teacher features
            u.nograd("student")
            x0 = u.grad(student)
            u.nograd("teacher", 2 * u.b)
            u.nograd("teacher")
        else:
            if t.step == "imagine-flash":  # the student's own no-grad rollout to the training time
                u.nograd("student")
            x0 = u.grad(student)
            for _ in range(t.teacher_calls):  # the guided teacher on [uncond; cond]
                u.nograd("teacher", 2 * u.b)
            if t.step == "lcm":  # the EMA target (a copy of the student)
                u.nograd("student")
        loss = x0.square().mean() + (u.features(teacher, x0).square().mean() if t.adversarial else 0)
        u.update(loss, opts[0])
        del x0, loss
        # 3. the discriminator's heads on real and fake samples (frozen teacher features), with R1 if any
        if t.adversarial:
            u.nograd("teacher")
            u.nograd("teacher")
            if t.r1:
                u.r1(teacher)
        windows.update(u.windows)

    try:
        with _mixed_dtype_quiet():
            usage = measure(run, autocast=lab.autocast)
    finally:
        if t.checkpointing:
            student.disable_gradient_checkpointing()
        for net in (student, fake):
            for p in [] if net is None else net.parameters():
                p.grad = None
    return {"train": usage.peak, **windows}


# --- 4. the plan ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Phase:
    """One phase's bytes: `resident` (networks and training state on the device then) and `activations`."""

    name: str
    resident: int
    activations: int
    detail: str = ""  # the sub-step that peaks, when it is not the whole phase (an update's caption encoding)

    @property
    def total(self) -> int:
        return self.resident + self.activations

    @property
    def label(self) -> str:
        return f"{self.name}: {self.detail}" if self.detail else self.name


@dataclasses.dataclass
class EntryPlan:
    """A method entry's plan on one rank: `networks` (what, bytes: the backbone, the evaluators, the copies kept by this
    and earlier entries) on the device through the run (text encoders and VAE only in their phases when offloaded),
    `training` (what, bytes) on it while the entry trains, its phases (bytes), the per-rank sampling / training
    batches (samples, None without training)."""

    entry: Entry
    ranks: int
    sample_batch: int
    train_batch: int | None
    networks: list[tuple[str, int]]
    training: list[tuple[str, int]]
    phases: list[Phase]
    options: Options
    kept: tuple[tuple[str, int], ...] = ()  # the copies of the denoiser this entry keeps (students, a checkpoint)

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda p: p.total)


def setup_from_suite(backbone: dict, evaluators: dict, batch_size: int, samples: int | None = None) -> Setup:
    """The Setup of a suite's [backbone] table (kind "diffusers": path, dtype (default fp32, as the backbones),
    vae_dtype, resolution, max_sequence_length) and [evaluators] table (kind "real": clip_model, dtype), read from the
    directory's config.json files only. UserError for an embedded (shapes) backbone: nothing at real scale to plan."""
    if backbone.get("kind") != "diffusers" or "path" not in backbone:
        raise UserError("a memory plan needs [backbone] kind = 'diffusers' with path = a local diffusers directory")
    arch = N.arch_from_directory(backbone["path"], backbone.get("resolution"), backbone.get("max_sequence_length"))
    real = evaluators.get("kind") == "real"
    return Setup(arch, backbone.get("dtype", "fp32"), batch_size, samples,
                 clip_model=evaluators.get("clip_model") if real else None, inception=real,
                 eval_dtype=evaluators.get("dtype", "fp32") if real else "fp32", vae=backbone.get("vae_dtype"))


def options_from_suite(backbone: dict, ranks: int = 1, device_memory: int | None = None) -> Options:
    """The Options a suite's [backbone] table sets (offload, vae_slicing, vae_tiling) for `ranks` processes and a
    device of `device_memory` bytes."""
    return Options(ranks=ranks, offload=backbone.get("offload", "none"), vae_slicing=bool(backbone.get("vae_slicing")),
                   vae_tiling=bool(backbone.get("vae_tiling")), device_memory=device_memory)


def sample_batch_per_rank(setup: Setup, ranks: int) -> int:
    """The batch one rank samples at (bench.runner.sample_and_measure: its shard of `samples`, in suite batches)."""
    if setup.samples is None:
        return setup.batch_size
    return max(1, min(setup.batch_size, math.ceil(setup.samples / ranks)))


def _gib(n: int) -> float:
    return n / GiB


def plan_entry(lab: Lab, entry: Entry, options: Options) -> EntryPlan:
    """The entry's phases on one rank. Nothing of an earlier entry remains: the runner releases each method after its
    last cell (bench.runner.RunContext.release), so an entry holds the backbone, the evaluators and its own copies."""
    setup, arch = lab.setup, lab.arch
    fp = footprint(lab, entry)
    b = BYTES[setup.dtype]
    p_den = lab.params("denoiser")
    text = [(f"{c.name} ({setup.dtype})", b * lab.params(c.name)) for c in arch.text_encoders]
    vae = [(f"vae ({setup.vae_dtype})", BYTES[setup.vae_dtype] * lab.params("vae"))]
    evals = [(f"{k} ({setup.eval_dtype})", BYTES[setup.eval_dtype] * n) for k, n in lab.evaluator_params().items()]
    kept = [(f"{c.role} ({c.dtype})", BYTES[c.dtype] * (p_den + c.extra)) for c in fp.kept]
    always = [(f"teacher {arch.denoiser.name} ({setup.dtype})", b * p_den), *evals, *kept]
    networks = [*always, *text, *vae]
    offload = options.offload == "model"
    sum_ = lambda items: sum(n for _, n in items)  # noqa: E731
    held = lambda items: 0 if offload else sum_(items)  # noqa: E731  (offloaded: on the device in their own phase only)

    bs = sample_batch_per_rank(setup, options.ranks)
    base = sum_(always)
    phases = [
        Phase("text", base + sum_(text) + held(vae), lab.text(bs)),
        Phase("sample", base + held(text) + held(vae), lab.sample(fp.sample_batch * bs, fp.resolution)),
        Phase("decode", base + held(text) + sum_(vae), lab.decode(bs, options.vae_slicing, options.vae_tiling,
                                                                  fp.resolution)),
        Phase("eval", base + held(text) + held(vae), lab.evaluate(bs) if evals else 0),
    ]
    training = []
    if fp.training is not None:
        t = fp.training
        training = list(t.state)
        m = lab.train(t)
        # the student being trained is not yet kept: one kept copy fewer while it trains
        during = base - (kept[-1][1] if kept else 0) + sum_(training)
        phases.append(Phase("train", during + held(text) + held(vae), m["train"]))
        if offload:  # the encoders come on only for their own sub-step of the update
            phases[-1] = max(phases[-1], Phase("train", during + sum_(text), m.get("text", 0), "caption encoding"),
                             Phase("train", during + sum_(vae), m.get("vae", 0), "image encoding"),
                             key=lambda p: p.total)
    return EntryPlan(entry, options.ranks, bs, fp.training.batch if fp.training else None, networks, training, phases,
                     options, tuple(kept))


def plan_suite(setup: Setup, entries: list[Entry], options: Options, lab: Lab | None = None) -> list[EntryPlan]:
    """Every entry's plan, in suite order."""
    lab = lab or Lab(setup)
    return [plan_entry(lab, e, options) for e in entries]


def device_memory(spec: str | None) -> int:
    """Bytes: `spec` parsed (parse_bytes), else the CUDA device's total; UserError when neither is known."""
    if spec:
        return parse_bytes(spec)
    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory)
    raise UserError("no CUDA device to read the memory of: give --device-memory, e.g. 80GB")


# --- 5. refuse what does not fit, naming the fix -------------------------------------------------------------------------


def budget(options: Options) -> int:
    return options.device_memory - options.reserve


Change = tuple[str, Entry, Options, Setup]  # (the setting as the message names it, and what it changes)


def changes(lab: Lab, plan: EntryPlan, over: set[str]) -> tuple[list[Change], list[list[Change]]]:
    """The changes that lower the phases in `over` (their names): switches, cheapest in run time first (VAE slicing /
    tiling, gradient checkpointing, offload, LoRA for a full student), and lists of halved batches down to 1 (the
    training batch for "train", the suite's for the sampling phases), largest first."""
    e, o, s = plan.entry, plan.options, lab.setup
    switches, batches = [], []
    if "decode" in over:
        if not o.vae_slicing:
            switches.append(("[backbone] vae_slicing = true", e, dataclasses.replace(o, vae_slicing=True), s))
        if not o.vae_tiling:
            switches.append(("[backbone] vae_tiling = true", e, dataclasses.replace(o, vae_tiling=True), s))
    t = footprint(lab, e).training if "train" in over else None
    if t is not None and not t.checkpointing:
        switches.append((f"{e.title} settings: gradient_checkpointing = true", _with(e, gradient_checkpointing=True),
                         o, s))
    if o.offload == "none":
        switches.append(("[backbone] offload = \"model\"", e, dataclasses.replace(o, offload="model"), s))
    if t is not None and t.student == "full":
        switches.append((f"{e.title} settings: lora_rank = {LORA_RANK}", _with(e, lora_rank=LORA_RANK), o, s))
    if t is not None:
        batches.append([(f"{e.title} settings: batch_size = {n}", _with(e, batch_size=n), o, s)
                        for n in _halves(t.batch)])
    if over - {"train"}:
        batches.append([(f"the suite's batch_size = {n}", e, o, dataclasses.replace(s, batch_size=n))
                        for n in _halves(plan.sample_batch)])
    return switches, [b for b in batches if b]


def _halves(n: int) -> list[int]:
    """n/2, n/4, ... 1."""
    out = []
    while n > 1:
        n //= 2
        out.append(n)
    return out


def _with(entry: Entry, **settings) -> Entry:
    return dataclasses.replace(entry, settings={**entry.settings, **settings})


def _combined(changes_: list[Change], plan: EntryPlan) -> Change:
    """Every change at once (the smallest batch among them)."""
    e, o, s = plan.entry, plan.options, None
    for _, e2, o2, s2 in changes_:
        e = _with(e, **e2.settings)
        o = dataclasses.replace(o, **{f.name: getattr(o2, f.name) for f in dataclasses.fields(o2)
                                      if getattr(o2, f.name) != getattr(plan.options, f.name)})
        s = s2 if s is None or s2.batch_size < s.batch_size else s
    return ", ".join(w for w, *_ in changes_), e, o, s


def _replan(lab: Lab, change: Change) -> EntryPlan:
    _, e, o, s = change
    return plan_entry(lab if s == lab.setup else Lab.sharing(lab, s), e, o)


def _largest_fitting(lab: Lab, batches: list[Change], limit: int) -> tuple[Change, EntryPlan] | None:
    """The largest of `batches` (largest first) whose plan fits under `limit` bytes, by bisection; None if none does."""
    lo, hi, best = 0, len(batches) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        q = _replan(lab, batches[mid])
        if q.peak.total <= limit:
            best, hi = (batches[mid], q), mid - 1
        else:
            lo = mid + 1
    return best


def verdict(lab: Lab, p: EntryPlan) -> str | None:
    """None when the plan fits the device's memory less the reserve; else one line: what it needs, and the first single
    change (``changes``) that makes it fit, else every change together, else the device it would need."""
    limit = budget(p.options)
    if p.peak.total <= limit:
        return None
    phase = p.peak.name + (f" ({p.peak.detail})" if p.peak.detail else "")
    where = (f"{p.entry.title} ({p.ranks} rank{'s' if p.ranks > 1 else ''}) needs {_gib(p.peak.total):.1f} GiB per rank "
             f"in its {phase} phase; the device has {_gib(p.options.device_memory):.1f} GiB less a "
             f"{_gib(p.options.reserve):.1f} GiB reserve")
    switches, batch_lists = changes(lab, p, {ph.name for ph in p.phases if ph.total > limit})
    for change in switches:
        q = _replan(lab, change)
        if q.peak.total <= limit:
            return f"{where}; set {change[0]} ({_gib(q.peak.total):.1f} GiB)"
    for batches in batch_lists:
        fits = _largest_fitting(lab, batches, limit)  # the peak grows with the batch: bisect
        if fits is not None:
            return f"{where}; set {fits[0][0]} ({_gib(fits[1].peak.total):.1f} GiB)"
    every = switches + [batches[-1] for batches in batch_lists]
    if not every:
        return f"{where}; use a device with at least {_gib(p.peak.total + p.options.reserve):.0f} GiB"
    together = _combined(every, p)
    q = _replan(lab, together)
    if q.peak.total <= limit:
        return f"{where}; no single setting is enough, together {together[0]} are ({_gib(q.peak.total):.1f} GiB)"
    return (f"{where}; even with {together[0]} it needs {_gib(q.peak.total):.1f} GiB: use a device with at least "
            f"{_gib(q.peak.total + p.options.reserve):.0f} GiB")


def check(lab: Lab, plans: list[EntryPlan]) -> None:
    """UserError (one line, ``verdict``) for the first of a suite's plans (in order, one rank count) that does not fit."""
    for p in plans:
        line = verdict(lab, p)
        if line:
            raise UserError(f"plan does not fit: {line}")


# --- 6. the table and the command -----------------------------------------------------------------------------------


def networks_table(lab: Lab) -> str:
    """Every network of the arch: class, parameters (meta count), the published figure and its source, bytes."""
    s = lab.setup
    rows = ["| network | class | parameters | published | Δ | dtype | GiB |", "|---|---|---|---|---|---|---|"]
    for c in lab.arch.components.values():
        n = lab.params("denoiser" if c is lab.arch.denoiser else c.name)
        dtype = s.vae_dtype if c.name == "vae" else s.dtype
        pub = c.published or {}
        delta = f"{100 * (n - pub['params']) / pub['params']:+.2f} %" if pub else "—"
        rows.append(f"| {c.name} | {c.class_name} | {n:,} | {pub.get('quoted', '—')} | {delta} | {dtype} | "
                    f"{_gib(BYTES[dtype] * n):.2f} |")
    for k, n in lab.evaluator_params().items():
        rows.append(f"| {k} (evaluator) | {'open_clip ' + s.clip_model if k == 'clip' else 'InceptionV3 (clean-fid)'} "
                    f"| {n:,} | — | — | {s.eval_dtype} | {_gib(BYTES[s.eval_dtype] * n):.2f} |")
    return "\n".join(rows) + "\n"


def plans_table(plans: list[EntryPlan]) -> str:
    """One row per (entry, ranks): batches, the backbone's bytes (teacher denoiser, text encoders, VAE, evaluators:
    the networks table), the copies the entry keeps, the training state, activations by phase, the peak and its
    phase, and whether it fits the device less the reserve."""
    rows = ["| entry | ranks | batch / rank (sample, train) | backbone, GiB | kept copies, GiB | training state, GiB | "
            "activations by phase, GiB | peak / rank, GiB | fits |", "|---|---|---|---|---|---|---|---|---|"]
    for p in plans:
        backbone = sum(b for _, b in p.networks) - sum(b for _, b in p.kept)
        cells = [" · ".join(f"{n} {_gib(b):.2f}" for n, b in items) or "—" for items in (p.kept, p.training)]
        acts = " · ".join(f"{ph.label} {_gib(ph.activations):.2f}" for ph in p.phases)
        peak = p.peak
        fits = "—" if p.options.device_memory is None else ("yes" if peak.total <= budget(p.options) else "**no**")
        rows.append(f"| {p.entry.title} | {p.ranks} | {p.sample_batch}, {p.train_batch or '—'} | {_gib(backbone):.2f} | "
                    f"{cells[0]} | {cells[1]} | {acts} | **{_gib(peak.total):.1f}** ({peak.label}) | {fits} |")
    return "\n".join(rows) + "\n"


def render(lab: Lab, plans: list[EntryPlan]) -> str:
    s, o = lab.setup, plans[0].options if plans else Options()
    mem = "—" if o.device_memory is None else f"{_gib(o.device_memory):.1f} GiB, less a {_gib(o.reserve):.1f} GiB reserve"
    head = (f"**{lab.arch.title}** ({lab.arch.name}): {s.dtype}, {s.arch.resolution} px, suite batch_size "
            f"{s.batch_size}, samples {s.samples or 'as many as the ranks fill'}, offload {o.offload}, VAE slicing "
            f"{'on' if o.vae_slicing else 'off'}, tiling {'on' if o.vae_tiling else 'off'}; device {mem}\n\n")
    return head + networks_table(lab) + "\n" + plans_table(plans)


def _entries(methods: str, args) -> list[Entry]:
    out = []
    for name in [m.strip() for m in methods.split(",") if m.strip()]:
        settings = {}
        if name == "pretrained":
            settings["path"] = "planned-checkpoint"  # a directory: a full copy of the denoiser
        elif name != "teacher":
            if args.train_batch is not None:
                settings["batch_size"] = args.train_batch
            if args.lora_rank is not None:
                settings["lora_rank"] = args.lora_rank
            if args.gradient_checkpointing:
                settings["gradient_checkpointing"] = True
        if name == "teacher" and args.guidance:
            settings["guidance"] = args.guidance
        out.append(Entry(name, settings, tuple(args.steps)))
    if not out:
        raise UserError("--methods names no method; e.g. --methods teacher,lcm,dmd2")
    return out


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UserError(f"{what} must be positive integers separated by commas, e.g. 1,8; got {text!r}")
    return values


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", help=f"one of {', '.join(N.arch_names())}, or a local diffusers directory")
    ap.add_argument("--device-memory", help="e.g. 80GB (10^9 bytes) or 79.6GiB; default: the CUDA device's total")
    ap.add_argument("--ranks", default="1", help="data-parallel ranks to plan, e.g. 1,8")
    ap.add_argument("--batch-size", type=int, default=16, help="the suite's sampling batch_size")
    ap.add_argument("--samples", type=int, help="the suite's samples (default: enough to fill every rank's batch)")
    ap.add_argument("--methods", default="teacher,pretrained,lcm,dmd2")
    ap.add_argument("--steps", default="4", help="the entries' step counts, e.g. 1,2,4")
    ap.add_argument("--dtype", default="bf16", choices=sorted(BYTES))
    ap.add_argument("--resolution", type=int, help="image side in pixels (default: the arch's)")
    ap.add_argument("--guidance", help="the teacher's guidance (default: the arch's: cfg, FLUX.1-dev embedded)")
    ap.add_argument("--train-batch", type=int, help="the distillation methods' batch_size (default: theirs, 32)")
    ap.add_argument("--lora-rank", type=int, help="the students' LoRA rank (0: full; default: the methods' rule)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--offload", default="none", choices=OFFLOAD)
    ap.add_argument("--vae-slicing", action="store_true")
    ap.add_argument("--vae-tiling", action="store_true")
    ap.add_argument("--clip-model", default="ViT-B-32", help="open_clip evaluator, or 'none'")
    ap.add_argument("--check", action="store_true", help="exit 2 with one line when a plan does not fit")
    ap.add_argument("--explain", action="store_true", help="after the table, one line per entry that does not fit")
    ap.add_argument("--doc", help="rewrite the '<!-- plan: ARGS -->' blocks of this Markdown file (and nothing else)")
    return ap


def command(args) -> tuple[str, Lab, list[EntryPlan]]:
    """The plans `args` (``parser()``'s) ask for, and their Markdown (with ``--explain``, the verdicts after it)."""
    if not args.arch:
        raise UserError(f"give --arch: one of {', '.join(N.arch_names())}, or a local diffusers directory")
    arch = N.arch_from_directory(args.arch) if Path(args.arch).is_dir() else N.load_arch(args.arch)
    if args.resolution:
        arch = arch.with_(resolution=args.resolution)
    args.guidance = args.guidance or arch.guidance
    args.steps = _int_list(args.steps, "--steps") if isinstance(args.steps, str) else args.steps
    setup = Setup(arch, args.dtype, args.batch_size, args.samples, None if args.clip_model == "none" else args.clip_model)
    memory = device_memory(args.device_memory) if (args.device_memory or args.check) else None
    lab, entries, plans = Lab(setup), _entries(args.methods, args), []
    for r in _int_list(args.ranks, "--ranks"):
        options = Options(ranks=r, offload=args.offload, vae_slicing=args.vae_slicing, vae_tiling=args.vae_tiling,
                          device_memory=memory)
        plans += plan_suite(setup, entries, options, lab)
    text = render(lab, plans)
    if args.explain and memory is not None:
        lines = [f"- {line}" for line in map(lambda p: verdict(lab, p), plans) if line]
        text += "\n" + ("\n".join(lines) if lines else "Every entry fits.") + "\n"
    return text, lab, plans


BLOCK = re.compile(r"(<!-- plan: (?P<args>[^>]*?) -->\n)(?P<body>.*?)(<!-- end plan -->)", re.S)


def refresh(path: str) -> int:
    """Rewrite each ``<!-- plan: ARGS -->`` ... ``<!-- end plan -->`` block of the Markdown file at `path` with the
    output of ``python -m bench.plan ARGS`` (the command is in the marker: the document is regenerable). Returns the
    number of blocks. UserError when the file is missing or holds no block."""
    doc = Path(path)
    if not doc.is_file():
        raise UserError(f"{path} does not exist")
    text = doc.read_text(encoding="utf-8")
    blocks = list(BLOCK.finditer(text))
    if not blocks:
        raise UserError(f"{path} holds no '<!-- plan: ARGS -->' ... '<!-- end plan -->' block")

    def body(m) -> str:
        out, _, _ = command(parser().parse_args(shlex.split(m["args"])))
        return m[1] + out + m[4]

    write_text(doc, BLOCK.sub(body, text))
    return len(blocks)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        t0 = time.time()
        if args.doc:
            n = refresh(args.doc)
            print(f"{args.doc}: {n} plan blocks rewritten in {time.time() - t0:.0f} s", file=sys.stderr)
            return 0
        text, lab, plans = command(args)
        print(text)
        print(f"planned in {time.time() - t0:.1f} s", file=sys.stderr)
        if args.check:
            for r in sorted({p.ranks for p in plans}):
                check(lab, [p for p in plans if p.ranks == r])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
