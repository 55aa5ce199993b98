"""What every distilled method shares: settings, the student cache, per-step or shared students,
the optimizer step, the adversarial term, the training batch."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
import time
import math
from pathlib import Path
from typing import ClassVar

import torch

from core import io
from methods.base import Method, TrainInfo
from methods.registry import module_sources
from methods.discriminator import TeacherFeatureDiscriminator
from methods.sampling import Denoiser, per_sample_noise
from methods.training import TrainCompute, add_passes, balanced_step, cached_student, optimizer_step


@dataclasses.dataclass
class DistillConfig:
    """Training settings every distillation method has (equal footing: same student_updates and batch)."""

    student_updates: int = 150  # x batch 32: the ablation suite over 3 training seeds fits 45 min on 2 cores
    batch_size: int = 32
    lr: float = 5e-5  # each method sets its own (the `lr` study chose them; methods/<name>.py)
    guidance_scale: float = 1.5  # the teacher's CFG scale when it builds targets
    seed: int = 0
    # LoRA adapters (peft) on the attention projections instead of the full UNet: the rank, 0 for full fine-tuning,
    # None for the default (LoRA of rank LORA_RANK for teachers above LORA_THRESHOLD parameters, else full)
    lora_rank: int | None = None
    gradient_checkpointing: bool = False  # recompute the student's activations in backward (memory for time)
    grad_clip: float = 1.0  # the student's gradient-norm clip at every update
    max_steps: int = 4  # the largest step count a student samples at (students serve 1..max_steps)

    def __post_init__(self):
        if self.lora_rank is not None and self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        for name in ("student_updates", "batch_size", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclasses.dataclass
class AdversarialConfig(DistillConfig):
    """Settings of the adversarial term's discriminator (methods that have one).

    The base defaults (hinge, patch logits, no R1, no warm-up or ramp, one discriminator update per student
    update, the GAN gradient unbounded) are what ADD and DMD2 get unless their own config follows its paper
    further (ADD: R1 with gamma 1e-5); Imagine Flash, whose paper leaves the design open, takes the design
    compared in the ``imagine-flash-adversarial`` study.
    """

    # methods whose trainer can draw extra discriminator batches (disc_warmup, disc_steps > 1)
    EXTRA_DISC_UPDATES: ClassVar[bool] = False

    disc_lr: float = 2e-4
    disc_t_max: int = 500  # the discriminator sees its input re-noised to t in [0, disc_t_max]
    disc_loss: str = "hinge"  # "hinge" or "non-saturating"
    disc_patch: bool = True  # one logit per feature-map location (else one per image and level)
    r1_gamma: float = 0.0  # R1 penalty weight at the noised real input (0: off)
    adv_warmup: float = 0.0  # fraction of the updates in which only the discriminator trains
    adv_ramp: float = 0.0  # fraction of the updates over which the generator term's weight ramps up linearly
    disc_warmup: int = 0  # a head start: discriminator-only updates on the initial student's samples, before update 0
    disc_steps: int = 1  # discriminator updates per student update (each on its own batch)
    gan_loss: str | None = None  # the generator's loss: "hinge" (−D), "non-saturating" (softplus(−D)); None: disc_loss's
    # the generator's GAN gradient rescaled, per update, to at most this × the norm of the rest of its gradient
    # (two backward passes); None: unbounded (one backward pass of the summed loss)
    gan_grad_ratio: float | None = None
    gan_grad_stats: bool = False  # log both gradients' norms and cosine (two backward passes even without a ratio)

    def __post_init__(self):
        super().__post_init__()
        from methods.discriminator import LOSSES

        if self.disc_loss not in LOSSES:
            raise ValueError(f"disc_loss must be one of {LOSSES}, got {self.disc_loss!r}")
        if self.gan_loss is not None and self.gan_loss not in LOSSES:
            raise ValueError(f"gan_loss must be one of {LOSSES} (or unset: disc_loss's), got {self.gan_loss!r}")
        for name in ("adv_warmup", "adv_ramp"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be a fraction in [0, 1), got {getattr(self, name)}")
        if self.adv_warmup + self.adv_ramp >= 1:
            raise ValueError("adv_warmup + adv_ramp must leave some updates at the full weight")
        if self.r1_gamma < 0:
            raise ValueError(f"r1_gamma must be >= 0, got {self.r1_gamma}")
        if self.disc_warmup < 0 or self.disc_steps < 1:
            raise ValueError(f"disc_warmup must be >= 0 and disc_steps >= 1, got {self.disc_warmup}, {self.disc_steps}")
        if (self.disc_warmup or self.disc_steps > 1) and not self.EXTRA_DISC_UPDATES:
            raise ValueError("disc_warmup and disc_steps > 1 are not available for this method (add has them)")
        if self.gan_grad_ratio is not None and not self.gan_grad_ratio > 0:
            raise ValueError(f"gan_grad_ratio must be > 0 (or unset), got {self.gan_grad_ratio}")


LORA_THRESHOLD = 300_000_000  # teacher UNet parameters above which students train LoRA adapters by default
LORA_RANK = 64


def add_lora(net, rank: int) -> None:
    """LCM-LoRA style: rank-r adapters on the attention projections; only they (and a w-embedding) train."""
    from peft import LoraConfig

    net.requires_grad_(False)
    net.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for name, p in net.named_parameters():
        if "lora_" in name or "cond_proj" in name:
            p.requires_grad_(True)


ACTIVE_WINDOW = 30  # the student updates at the end of training whose discriminator accuracy decides "active"
ACTIVE_Z = 1.959964  # the Wilson interval's z (95%)


def wilson_interval(correct: int, seen: int, z: float = ACTIVE_Z) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion correct/seen ((0, 1) when nothing was seen)."""
    if seen == 0:
        return 0.0, 1.0
    p = correct / seen
    centre = (p + z * z / (2 * seen)) / (1 + z * z / seen)
    half = z / (1 + z * z / seen) * math.sqrt(p * (1 - p) / seen + z * z / (4 * seen * seen))
    return max(0.0, centre - half), min(1.0, centre + half)


class AdversarialTerm:
    """The discriminator on frozen teacher features and its heads' optimizer, as one helper.

    ``generator_loss`` is the student's side (heads frozen, gradients reach the student through the
    frozen teacher features), scaled by the schedule ``weight(step)``: 0 while only the discriminator
    trains (warm-up), then a linear ramp to 1. ``generator_step`` is the student's update with that term
    (its gradient bounded by ``gan_grad_ratio``). ``step`` is one discriminator update; it first scores its
    batch, which the heads have not trained on, so every update logs a held-out accuracy. ``verdict`` says
    whether the discriminator left chance (the rule there) and so whether the term was active at all.
    """

    def __init__(self, disc, opt: torch.optim.Optimizer, cfg: AdversarialConfig, total_updates: int):
        self.disc, self.opt, self.r1_gamma = disc, opt, cfg.r1_gamma
        self.gan_loss = cfg.gan_loss or cfg.disc_loss
        self.ratio, self.stats = cfg.gan_grad_ratio, cfg.gan_grad_stats or cfg.gan_grad_ratio is not None
        self.total = total_updates
        self.warmup = round(cfg.adv_warmup * total_updates)
        self.ramp = round(cfg.adv_ramp * total_updates)
        self.tally: dict[int, list[int]] = {}  # student update -> [correct, seen] of its discriminator scores
        self.generator_updates = 0  # student updates (in this process) whose loss held the GAN term

    def weight(self, step: int) -> float:
        """The generator term's multiplier at update `step`, in [0, 1]."""
        if step < self.warmup:
            return 0.0
        if step < self.warmup + self.ramp:
            return (step - self.warmup + 1) / self.ramp
        return 1.0

    def generator_loss(self, fake_x0: torch.Tensor, cond, gen: torch.Generator, step: int) -> torch.Tensor | None:
        """weight(step) · the generator loss; None (nothing computed) while the weight is 0 or there is no sample."""
        w = self.weight(step)
        if w == 0 or len(fake_x0) == 0:
            return None
        self.disc.heads.requires_grad_(False)
        loss = self.disc.g_loss(fake_x0, cond, gen, loss=self.gan_loss)
        self.disc.heads.requires_grad_(True)
        return w * loss

    def generator_step(self, opt: torch.optim.Optimizer, net: torch.nn.Module, main: torch.Tensor,
                       gan: torch.Tensor | None, grad_clip: float) -> dict[str, float]:
        """The student's update on main + gan (gan: the weighted GAN term, None when off). With ``gan_grad_ratio``
        the GAN gradient is first rescaled to at most ratio × ‖∇main‖; with it or ``gan_grad_stats``, both
        gradients' norms and cosine are returned (``g_norm_main``, ``g_norm_gan``, ``g_cos``, ``g_scale``)."""
        if gan is None:
            optimizer_step(opt, main, net.parameters(), grad_clip)
            return {}
        self.generator_updates += 1
        if not self.stats:
            optimizer_step(opt, main + gan, net.parameters(), grad_clip)
            return {}
        out = balanced_step(opt, main, gan, net.parameters(), grad_clip, self.ratio)
        return {"g_norm_main": out["grad_main"], "g_norm_gan": out["grad_extra"], "g_cos": out["grad_cos"],
                "g_scale": out["grad_scale"]}

    def step(self, real_x0: torch.Tensor, cond, fake_x0: torch.Tensor, gen: torch.Generator,
             at: int | None = None) -> dict[str, float]:
        """One discriminator update: {"d": its loss, "d_acc": the accuracy of its scores on this batch before the
        update (real: mean logit > 0, fake: < 0), "d_acc_real", "d_acc_fake": each side's}; {} without samples.
        `at`: the student update whose tally the scores join (None: a head-start update, logged, not tallied)."""
        if len(fake_x0) == 0:
            return {}
        loss, d_real, d_fake = self.disc.d_loss(real_x0, cond, fake_x0.detach(), cond, gen, r1_gamma=self.r1_gamma,
                                                with_logits=True)
        real_ok, fake_ok = int((d_real.detach().mean(1) > 0).sum()), int((d_fake.detach().mean(1) < 0).sum())
        correct, seen = real_ok + fake_ok, len(d_real) + len(d_fake)
        if at is not None:
            t = self.tally.setdefault(at, [0, 0])
            t[0] += correct
            t[1] += seen
        optimizer_step(self.opt, loss)
        return {"d": loss.item(), "d_acc": correct / seen, "d_acc_real": real_ok / len(d_real),
                "d_acc_fake": fake_ok / len(d_fake)}

    def verdict(self) -> dict:
        """Whether the discriminator left chance: over the last ACTIVE_WINDOW student updates, its held-out accuracy
        (the scores ``step`` takes before each update) has a 95% Wilson interval wholly above 0.5. The GAN term is
        *active* when that holds and the generator's loss held the term at some update; otherwise it was inactive
        (its discriminator, and so its gradient, carried no learned signal). Updates before a resume are not
        counted (``seen`` says how many scores were)."""
        window = [v for k, v in self.tally.items() if k >= self.total - ACTIVE_WINDOW]
        correct, seen = sum(c for c, _ in window), sum(n for _, n in window)
        lo, hi = wilson_interval(correct, seen)
        return {"active": bool(lo > 0.5 and self.generator_updates > 0), "disc_acc": correct / seen if seen else None,
                "ci": [round(lo, 4), round(hi, 4)], "seen": seen, "window": ACTIVE_WINDOW,
                "generator_updates": self.generator_updates}


def training_autocast(device_type: str, dtype: torch.dtype):
    """The autocast region a student trains in: fp32 master weights computed in the teacher's lower `dtype` (a no-op
    for fp32). Without autocast's weight cache: the cache keeps the first cast copy of each trainable weight for the
    whole region, so after an optimizer step every later update would run on the weights before it."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, cache_enabled=False)


def training_code_sha256(module: str, root: Path | None = None) -> str:
    """sha256 (16 hex) of the code that trains a method's students: its module and every ``methods.*`` module it
    imports (``registry.module_sources``), by content and path within methods/. In every student's cache key, so a
    change to that code retrains instead of loading a student the old code made. `root`: the methods/ folder."""
    root = Path(root or Path(__file__).parent)
    h = hashlib.sha256()
    for path in module_sources(module, root):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def _add_counts(a: dict | None, b: dict) -> dict:
    out = dict(a or {})
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return dict(sorted(out.items(), key=lambda kv: float(kv[0])))


# --- where a shared multi-step student trains: its grid draw -------------------------------------------

GRID_DRAWS = ("steps", "pairs")


def grid_weights(max_steps: int, rule: str) -> torch.Tensor:
    """P(k), k = 1..max_steps: the step count whose grid one update of a shared student trains on.

    "steps": uniform over step counts (DMD2's code); "pairs": P(k) ∝ k, so that, with each sample's grid index
    uniform within the grid, every (step count, grid index) pair a sampler at 1..max_steps steps evaluates the
    student at is equally likely (``grid_shares``)."""
    if rule not in GRID_DRAWS:
        raise ValueError(f"grid_draw must be one of {GRID_DRAWS}, got {rule!r}")
    k = torch.arange(1, max_steps + 1, dtype=torch.float64)
    w = torch.ones_like(k) if rule == "steps" else k
    return w / w.sum()


def draw_grid(max_steps: int, n: int, g: torch.Generator, rule: str = "steps") -> tuple[int, torch.Tensor]:
    """(k, i): the step count of this update's grid, drawn by `rule` (``grid_weights``), and each of the n samples'
    grid index i ~ U{0..k−1}. "steps" draws exactly as the bench did before the rule existed."""
    if rule == "steps":
        k = int(torch.randint(1, max_steps + 1, (1,), generator=g))
    else:
        k = int(torch.multinomial(grid_weights(max_steps, rule), 1, generator=g)) + 1
    return k, torch.randint(0, k, (n,), generator=g)


def grid_shares(max_steps: int, rule: str, grid) -> dict:
    """{t: expected share of a shared student's training samples at t} under `rule`, `grid(k)` the k-step grid.

    At max_steps = 4 on trailing grids: "steps" gives t = T (in every grid) Σ_k 1/(4k) = 52% and each later grid
    time 6–19%; "pairs" gives t = T 2/(K+1) = 40%, the share a sampler at each of 1..K steps evaluates there."""
    shares: dict = {}
    for k, p in zip(range(1, max_steps + 1), grid_weights(max_steps, rule).tolist()):
        for t in grid(k):
            shares[t] = shares.get(t, 0.0) + p / k
    return dict(sorted(shares.items(), reverse=True))


class DistilledMethod(Method):
    """A method whose sampler is a trained student UNet, cached by a hash of what made it."""

    # settings that change only inference, never the student (excluded from the cache key)
    INFERENCE_FIELDS: frozenset[str] = frozenset()
    # the guidance-scale embedding width of the student UNet (None: guidance distilled away)
    w_dim: int | None = None

    def __init__(self, backbone, config, ctx):
        super().__init__(backbone, config, ctx)
        self.students: dict[int, Denoiser] = {}  # grid -> the NFE-counted student
        self.nets: dict[int, torch.nn.Module] = {}  # grid -> the trained student network itself
        self.train_info: dict[int, TrainInfo] = {}
        self.compute = TrainCompute()  # the pass counters of the training in progress
        self._null_cond = None

    @classmethod
    def allowed_steps(cls, config) -> tuple[int, ...]:
        return tuple(range(1, config.max_steps + 1))

    def sampling_inputs(self, texts, noise_keys, steps: int):
        """(the student for `steps`, encoded prompts, x_T): the prologue of every student sampler."""
        bb = self.backbone
        return self.student(steps), bb.encode_text(texts), per_sample_noise(noise_keys, bb.sample_shape,
                                                                             device=bb.device)

    # --- which student serves a step count ---------------------------------------------------
    def student_steps(self, steps: int) -> int:
        """The grid a student is trained for, when it serves `steps` (per-step by default)."""
        return steps

    def updates(self) -> int:
        return max(1, round(self.config.student_updates * self.ctx.scale))

    def cache_stem(self, steps: int) -> str:
        """The student's cache name: method, grid, a hash of what makes it. A prefix-stable training's name is its
        lineage (that hash without the update count) and then the update count: ``{lineage}-{updates}u``."""
        training = {k: v for k, v in dataclasses.asdict(self.config).items() if k not in self.INFERENCE_FIELDS}
        ident = {"method": self.name, "training": training, "updates": self.updates(),
                 "teacher": self.backbone.identity(), "grid": self.student_steps(steps),
                 "device": self.backbone.device.type, "code": training_code_sha256(type(self).__module__)}
        if self.ctx.world > 1:  # data-parallel training sees world x the data: another student
            ident["processes"] = self.ctx.world
        if self.prefix_stable():
            del ident["updates"], training["student_updates"]
            return f"{self.lineage_prefix(steps, io.content_hash(ident))}{self.updates()}u"
        return f"{self.name}-{self.student_steps(steps)}step-{io.content_hash(ident)}"

    def lineage_prefix(self, steps: int, key: str) -> str:
        return f"{self.name}-{self.student_steps(steps)}step-{key}-"

    def prefix_stable(self) -> bool:
        """Whether the first s updates of this training are the same whatever its total, so that a longer training
        continues a shorter cached one (``Context.keep_state``; learning curves). Not where a schedule is a fraction
        of the total: the adversarial term's warm-up and ramp (``AdversarialTerm``), progressive's stages."""
        return getattr(self.config, "adv_warmup", 0) == 0 and getattr(self.config, "adv_ramp", 0) == 0

    def continuation(self, steps: int) -> tuple[int, object] | None:
        """(updates, state path) of the longest kept training state this student's training continues: the same
        lineage, fewer updates (None when there is none, the training is not prefix-stable, or it is data-parallel)."""
        if not self.prefix_stable() or self.ctx.world > 1:
            return None
        stem = self.cache_stem(steps)
        prefix = stem[: stem.rindex("-") + 1]
        pattern = re.compile(re.escape(prefix) + r"(\d+)u\.state\.safetensors")
        found = [(int(m.group(1)), p) for p in Path(self.ctx.cache_dir).glob(f"{prefix}*u.state.safetensors")
                 if (m := pattern.fullmatch(p.name)) and int(m.group(1)) < self.updates()]
        return max(found, key=lambda f: f[0]) if found else None

    def lora_rank(self) -> int:
        """The LoRA rank students train at (0: the full UNet): the setting, or the default for the teacher's size."""
        if self.config.lora_rank is not None:
            return self.config.lora_rank
        params = sum(p.numel() for p in self.backbone.net.parameters())
        return LORA_RANK if params > LORA_THRESHOLD else 0

    def prepare(self, steps: int) -> TrainInfo:
        grid = self.student_steps(steps)
        if grid in self.students:
            return self.train_info[grid]
        bb = self.backbone
        # a student trains in fp32 master weights, under autocast to the teacher's dtype when that is lower; with LoRA
        # only what trains is fp32 (the adapters, a w-embedding) and the frozen base stays in the teacher's dtype, as
        # diffusers' LCM-LoRA scripts keep it (a fp32 copy of a 12B base would not fit an 80 GB GPU)
        net = bb.new_net(self.w_dim)
        if self.lora_rank():
            add_lora(net.to(bb.dtype), self.lora_rank())
            for param in net.parameters():
                if param.requires_grad:
                    param.data = param.data.float()
        else:
            net = net.float()
        if self.config.gradient_checkpointing:
            net.enable_gradient_checkpointing()

        before = self.continuation(steps)

        def train(ckpt):
            t0 = time.time()
            net.train()
            outer, self.compute = self.compute, TrainCompute()  # a nested prepare (progressive) counts apart
            autocast = training_autocast(bb.device.type, bb.dtype)
            # prepare may be reached lazily from a no-grad sample(); any fresh weights (discriminator heads,
            # fake scores) draw from a generator seeded here, never from whatever ran before in the process
            try:
                with torch.enable_grad(), torch.random.fork_rng(devices=[]), autocast:
                    torch.manual_seed(self.config.seed * 1_000_003 + grid)
                    info = self.train_student(net, grid, ckpt)
            finally:
                self.compute = outer
            info.wall_seconds = round(time.time() - t0, 1)
            info.lora_rank = self.lora_rank()
            info.continued_from = before[0] if before else None
            return net.state_dict(), dataclasses.asdict(info)

        def load(state):
            net.load_state_dict(state)

        info = cached_student(self.ctx.cache_dir, self.cache_stem(steps), train, load, write=self.ctx.rank == 0,
                              keep_state=self.ctx.keep_state and self.prefix_stable(),
                              continue_from=before[1] if before else None)
        net = bb.prepare_net(net.eval().requires_grad_(False).to(bb.dtype))  # samples in the teacher's dtype, as it runs
        self.nets[grid] = net
        self.students[grid] = Denoiser(self.counted(net), self.backbone.schedule, self.student_prediction_type(),
                                       self.w_dim)
        self.train_info[grid] = TrainInfo(**{k: v for k, v in info.items() if k in TrainInfo.__dataclass_fields__})
        return self.train_info[grid]

    def release(self) -> None:
        super().release()
        self.students.clear()
        self.nets.clear()
        self.train_info.clear()

    def student_net(self, steps: int) -> torch.nn.Module:
        """The trained student network itself (not NFE-counted) that samples at `steps` steps."""
        self.student(steps)
        return self.nets[self.student_steps(steps)]

    def student(self, steps: int) -> Denoiser:
        """The NFE-counted student that samples at `steps` steps (trained or loaded on first use)."""
        grid = self.student_steps(steps)
        if grid not in self.students:
            self.prepare(steps)
        return self.students[grid]

    def train_student(self, net, grid: int, ckpt) -> TrainInfo:
        """Train `net` in place for a `grid`-step sampler; return what it cost (``self.trained``)."""
        raise NotImplementedError

    def student_prediction_type(self) -> str:
        """What the student network outputs (the teacher's parameterisation unless a method says otherwise)."""
        return self.backbone.prediction_type

    # --- the grids a student is trained and sampled on -------------------------------------------
    def training_timesteps(self, grid: int) -> set[int]:
        """Every timestep at which the student for `grid` sees inputs in training."""
        raise NotImplementedError

    def sampling_timesteps(self, steps: int) -> list[int]:
        """The timesteps at which the sampler evaluates the student, at `steps` steps."""
        raise NotImplementedError

    # --- helpers for trainers -------------------------------------------------------------------
    def counting(self, net: torch.nn.Module, role: str) -> torch.nn.Module:
        """`net` wrapped so its passes count towards this training's compute under `role`."""
        return self.compute.count(net, role)

    def teacher(self) -> Denoiser:
        """The frozen teacher behind the Denoiser interface, its passes counted as training compute."""
        return Denoiser(self.counting(self.backbone.net, "teacher"), self.backbone.schedule,
                        self.backbone.prediction_type)

    def optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in params if p.requires_grad], lr=self.config.lr, weight_decay=0.0)

    def step(self, opt: torch.optim.Optimizer, loss: torch.Tensor, module: torch.nn.Module) -> None:
        """One student update with the configured gradient clip."""
        optimizer_step(opt, loss, module.parameters(), self.config.grad_clip)

    def trained(self, losses: dict, updates: int | None = None, before: TrainInfo | None = None,
                adversarial: AdversarialTerm | None = None) -> TrainInfo:
        """What this training cost, as counted: `updates` student updates and every network's passes
        (``self.compute``), plus the cost of the training it continued (`before`, e.g. a previous round);
        with an `adversarial` term, its verdict (``AdversarialTerm.verdict``: did its discriminator leave chance)."""
        updates = self.updates() if updates is None else updates
        passes = add_passes(before.passes if before else None, self.compute.passes())
        return TrainInfo(student_updates=updates + (before.student_updates if before else 0),
                         teacher_nfe=passes.get("teacher", {}).get("forward", 0), losses=losses, passes=passes,
                         network_passes=sum(v["forward"] + v["backward"] for v in passes.values()),
                         adversarial=adversarial.verdict() if adversarial is not None else None,
                         train_seconds=round(self.compute.seconds + (before.train_seconds if before else 0.0), 1),
                         student_timesteps=_add_counts(before.student_timesteps if before else None,
                                                       self.compute.student_timesteps()))

    def captions_batch(self, step: int, stream: int = 0):
        """(real training images, captions, micro-conditioning or None) of update `step` (never evaluation data).

        With several processes each draws its own batch (data parallel); process 0 of a one-process
        run draws exactly what a single process would.
        """
        n = self.config.batch_size
        stream = stream * self.ctx.world + self.ctx.rank
        return self.backbone.training_batch(n, (self.config.seed * 7919 + stream) * 1_000_003 + step)

    def null_cond(self):
        """The teacher's encoding of the empty (CFG null) prompt, one row; encoded once."""
        if self._null_cond is None:
            self._null_cond = self.backbone.encode_text([""])
        return self._null_cond

    def conditioned_batch(self, step: int, gen_stream: int = 0, data_stream: int = 0):
        """(generator, real images, cond, uncond) for update `step`: the prologue of every trainer's update
        (another `data_stream`: another batch of the same update, e.g. for an extra discriminator update)."""
        real, captions, micro = self.captions_batch(step, data_stream)
        cond = self.backbone.encode_text(captions, micro)
        uncond = self.null_cond().repeat(len(captions))
        if cond.added is not None and "time_ids" in cond.added:  # SDXL: the null prompt at the same image size/crop
            uncond.added = {**uncond.added, "time_ids": cond.added["time_ids"]}
        return self.generator(step, gen_stream), real, cond, uncond

    def adversarial(self) -> AdversarialTerm:
        """The adversarial term (AdversarialConfig settings): a discriminator on frozen teacher features."""
        cfg, bb = self.config, self.backbone
        disc = TeacherFeatureDiscriminator(bb.net, bb.schedule, self.null_cond(), t_max=cfg.disc_t_max,
                                           patch=cfg.disc_patch, loss=cfg.disc_loss).to(bb.device)
        self.compute.add(disc, "discriminator")
        opt = torch.optim.AdamW(disc.heads.parameters(), lr=cfg.disc_lr, betas=(0.0, 0.99))
        return AdversarialTerm(disc, opt, cfg, self.updates())

    def generator(self, step: int, stream: int = 0) -> torch.Generator:
        stream = stream * self.ctx.world + self.ctx.rank
        return torch.Generator().manual_seed((self.config.seed * 1_000_003 + step) * 31 + stream)
