"""The runner: a suite -> trained or loaded methods -> samples -> metrics -> results/<run>/.

Reading order, top to bottom:

1. ``run`` checks everything that can be checked (device, prompts, budgets) before anything is
   written, loads the teacher and the evaluators, and opens the run directory (process 0 creates
   and locks it);
2. ``start`` writes config.json, builds the FID reference and the real-vs-real floor, and fixes the
   protocol every row carries;
3. ``run_cell`` makes one results row per cell (method entry × budget × seed): train or load the
   method, sample this process's shard batch by batch into the metric accumulators
   (``sample_and_measure``), check the counted NFE against the budget, gather the metrics, time the
   sampler, save a sample grid;
4. ``finish`` writes the summary and derives tables, plots and grids from the rows
   (``bench.results.tables``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path


import torch
import torchvision
from tqdm import tqdm

from bench import components, geneval, latency, protocols, provenance
from bench.dist import Dist
from bench.metrics import registry as metric_registry
from bench.metrics.cell import CellMetrics, to_8bit
from bench.metrics.fid import cached_reference, reference_cached
from bench.metrics.preference import reward_flags
from bench.results import tables
from bench.rundir import RunDir
from bench.source import source_hash
from bench.suite import Entry, Suite
from core import faults, io
from core.io import sha256_file
from core.errors import UserError
from methods import base, registry
from methods.training import DivergenceError
from prompts import prompt_sets
from prompts.loaders import prompts_sha256


def default_cache() -> Path:
    return Path(os.environ.get("FLASHBENCH_CACHE", Path.home() / ".cache" / "flashbench"))


@dataclasses.dataclass
class Options:
    out: Path | None = None
    device: str = "cpu"
    cache: Path | None = None
    resume: bool = False
    progress: bool = True
    dry_run: bool = False
    command: str | None = None  # the command line that started the run (recorded in config.json)
    study: str | None = None  # the study this run serves (bench/study.py), recorded in config.json
    shard: tuple[int, int] | None = None  # (i, n): sample only the i-th of n balanced prompt shards (merge later)
    save_samples: bool = False  # write every sample losslessly (PNG, GenEval layout) under samples/
    device_memory: str | None = None  # the device's memory for the plan ("80GB"); default the CUDA device's total
    threads: int | None = None  # torch CPU threads (None: torch's default)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One results row to make: a method entry at one budget and one sampling seed."""

    index: int
    entry: Entry
    budget: base.Budget
    seed: int

    @property
    def key(self) -> str:
        return cell_key(self.entry.label, self.budget.nfe, self.seed, self.entry.train_seed)


def cell_key(label: str, nfe: int, seed: int, train_seed: int | None = None) -> str:
    key = f"{label}|nfe={nfe}|seed={seed}"
    return key if train_seed is None else f"{key}|train_seed={train_seed}"


def plan(suite: Suite) -> list[Cell]:
    cells = [(e, b, seed) for e in suite.entries for b in e.budgets for seed in suite.seeds]
    return [Cell(i, e, b, seed) for i, (e, b, seed) in enumerate(cells)]


@dataclasses.dataclass
class RunContext:
    """Everything the cells of one run share, built once."""

    suite: Suite
    opts: Options
    rundir: RunDir
    prompts: list
    backbone: object
    evaluators: object
    dist: Dist
    cache: Path | None = None
    reference: object = None  # the FID reference (None when the suite does not measure FID)
    protocol: dict | None = None
    methods: dict = dataclasses.field(default_factory=dict)  # label -> Method, built once
    latency: dict = dataclasses.field(default_factory=dict)  # (label, nfe) -> latency fields
    failed_training: dict = dataclasses.field(default_factory=dict)  # (label, steps) -> failure fields
    stage: Callable[[str], None] = lambda what: None  # tells the progress bar what the current cell is doing

    @classmethod
    def scoring(cls, suite: Suite, rundir: RunDir, prompts: list, evaluators, out: Path, device: str,
                cache: Path | None) -> RunContext:
        """A context that only measures (no teacher, no sampling): `merge` and `evaluate`."""
        ctx = cls(suite, Options(out=out, device=device, cache=cache), rundir, prompts, None, evaluators, Dist(device))
        ctx.cache = Path(cache or default_cache())
        return ctx

    @property
    def sample_range(self) -> range:
        """The prompt indices this run samples: all of them, or its shard's."""
        return shard_range(len(self.prompts), self.opts.shard)

    @property
    def progress(self) -> bool:
        return self.opts.progress and self.dist.main

    def method(self, entry: Entry) -> base.Method:
        key = entry_key(entry)
        if key not in self.methods:
            ctx = base.Context(cache_dir=self.cache / "students", progress=self.progress, scale=self.suite.scale,
                               rank=self.dist.rank, world=self.dist.world,
                               keep_state=self.suite.curves is not None)  # a curve's next point continues it
            self.methods[key] = registry.get(entry.name)(self.backbone, entry.config, ctx)
        return self.methods[key]

    def config_block(self, teacher: dict, prompts: dict, **extra) -> dict:
        """The config.json fields that say what made a run directory's numbers — the suite, code, versions, device,
        teacher, evaluators and prompts — built here once for `run`, `merge` and `evaluate`; `extra` adds the rest."""
        device = str(self.opts.device)
        return {"suite": self.suite.to_dict(), "versions": provenance.versions(), "git": provenance.git_hash(),
                "source_sha256": source_hash(), "device": device,
                "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
                "threads": torch.get_num_threads(), "teacher": teacher, "evaluators": self.evaluators.identity(),
                "prompts": prompts, **extra}

    def protocol_of(self, config: dict) -> dict:
        """Every row's protocol (``provenance.protocol``) from a config block and this context's FID reference."""
        suite = self.suite
        return provenance.protocol(config["prompts"], config["evaluators"], self.reference, config["teacher"],
                                   config["device"], config["versions"].get("torchmetrics"),
                                   self.evaluators.num_features if metric_registry.needs(suite.metrics, "reference") else None,
                                   protocols.resolve(suite.evaluators))

    def release(self, entry: Entry) -> None:
        """Drop an entry's method and its networks (after its last cell): each row's memory is its own."""
        method = self.methods.pop(entry_key(entry), None)
        if method is None:
            return
        method.release()
        del method
        gc.collect()
        if str(self.opts.device).startswith("cuda"):
            torch.cuda.empty_cache()


def entry_key(entry: Entry) -> tuple[str, int | None]:
    """What identifies a suite entry's method: its label and training seed."""
    return (entry.label, entry.train_seed)


# --- 1. check, load, open ------------------------------------------------------------------------


@dataclasses.dataclass
class Checked:
    """What ``check`` found good: the prompts, the cells, the loaded teacher and evaluators, truncations."""

    prompts: list
    cells: list[Cell]
    backbone: object
    evaluators: object
    truncated: dict  # {"teacher": {encoder: [prompt ids]}, "clip_score": [prompt ids]}


def shard_range(n: int, shard: tuple[int, int] | None) -> range:
    """The i-th of n balanced contiguous shards of range(n) (the whole range without a shard)."""
    if shard is None:
        return range(n)
    i, k = shard
    return range(i * n // k, (i + 1) * n // k)


def check(suite: Suite, opts: Options) -> Checked:
    """Everything that can be checked before anything is written (``--dry-run`` runs exactly this):
    the device, the prompts and their ground truth against the metrics asked for, the sample count,
    the run directory, the teacher's and the evaluators' files (loaded), the reference folder."""
    if opts.shard is not None and not 0 <= opts.shard[0] < opts.shard[1]:
        raise UserError(f"--shard must be i/n with 0 <= i < n, got {opts.shard[0]}/{opts.shard[1]}")
    if opts.threads is not None and opts.threads < 1:
        raise UserError(f"--threads must be 1 or more, got {opts.threads}")
    components.check_device(opts.device)
    prompts = components.suite_prompts(suite.prompts, suite.samples, suite.evaluators)
    components.check_metrics(suite.metrics, prompts, suite.prompts, suite.evaluators["kind"], suite.metric_settings,
                             grouped=None if opts.shard is None else "a shard's samples are measured by `flashbench merge`")
    if opts.out is not None:
        RunDir(opts.out).check_new(opts.resume)
    cells = plan(suite)
    memory_plan(suite, opts)
    backbone = components.load_backbone(suite.backbone, opts.device)
    # each entry against this teacher (a setting that does not fit it is a UserError); construction trains,
    # loads and writes nothing
    probe = base.Context(cache_dir=Path(opts.cache or default_cache()) / "students", progress=False)
    for entry in suite.entries:
        registry.get(entry.name)(backbone, entry.config, probe)
    evaluators = components.load_evaluators(suite.evaluators, opts.device, prompts)
    texts = [p.text for p in prompts]
    truncated = {"teacher": {k: [prompts[i].id for i in v] for k, v in backbone.truncated(texts).items()},
                 "clip_score": [prompts[i].id for i in evaluators.clip_truncated(texts)]}
    return Checked(prompts, cells, backbone, evaluators, truncated)


def cell_work(suite: Suite, cell: Cell) -> int:
    """A cell's sampling work in network evaluations x samples: NFE x (its samples + the samples of the metrics that
    draw several seeds per prompt)."""
    extra = 0
    for name in suite.metrics:
        if name in metric_registry.declared() and "groups" in metric_registry.declared()[name]["needs"]:
            cls = metric_registry.get(name)
            cfg = cls.make_config(suite.metric_settings.get(name, {}), name)
            extra += cfg.prompts * cfg.seeds
    return cell.budget.nfe * (suite.samples + extra)


def student_plan(suite: Suite, opts: Options, checked: Checked) -> dict[tuple, tuple[str, str, str]]:
    """(label, train_seed, steps) -> ("loads" (its student is in the cache) or "trains", the student's cache stem, the
    method), for the distilled entries (a shared multi-step student has one stem for all its step counts)."""
    cache = Path(opts.cache or default_cache()) / "students"
    probe = base.Context(cache_dir=cache, progress=False)
    out = {}
    for entry in suite.entries:
        method = registry.get(entry.name)(checked.backbone, entry.config, probe)
        if not hasattr(method, "cache_stem"):
            continue
        for b in entry.budgets:
            stem = method.cache_stem(b.steps)
            out[(entry.label, entry.train_seed, b.steps)] = (
                "loads" if (cache / f"{stem}.safetensors").exists() else "trains", stem, entry.name)
    return out


def train_seconds_seen(cache: Path, method: str) -> float | None:
    """The median training wall time (s) of the students of `method` in the cache (their cards), None if none."""
    seen = []
    for card in cache.glob(f"{method}-*.json"):
        try:
            seen.append(float(json.loads(card.read_text())["info"]["wall_seconds"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return statistics.median(seen) if seen else None


def print_plan(suite: Suite, opts: Options, checked: Checked) -> None:
    """The dry run's plan: each cell (NFE, samples, whether its student trains or loads from the cache), then the
    totals and a time estimate: sampling from one timed teacher batch (embedded teachers only), training from the
    cache's earlier students of each method."""
    students = student_plan(suite, opts, checked)
    cache = Path(opts.cache or default_cache()) / "students"
    for c in checked.cells:
        ts = "" if c.entry.train_seed is None else f" train_seed={c.entry.train_seed}"
        st = students.get((c.entry.label, c.entry.train_seed, c.budget.steps))
        print(f"{c.entry.label:32s} method={c.entry.name:14s} steps={c.budget.steps:<3d} nfe={c.budget.nfe:<3d} "
              f"seed={c.seed} n={suite.samples}{ts}" + (f"  student: {st[0]}" if st else ""))
    work = sum(cell_work(suite, c) for c in checked.cells)
    to_train = sorted({(stem, name) for status, stem, name in students.values() if status == "trains"})
    loaded = {stem for status, stem, _ in students.values() if status == "loads"}
    per_nfe = sampling_seconds_per_nfe(suite, checked)
    estimate = [f"sampling ≈ {work * per_nfe / 60:.1f} min" if per_nfe is not None else
                "sampling not estimated (a diffusers teacher is not run in a dry run)"]
    if to_train:
        seen = [train_seconds_seen(cache, name) for _, name in to_train]
        known = [s for s in seen if s is not None]
        estimate.append(f"training ≈ {sum(known) / 60:.1f} min for {len(known)} of {len(to_train)} students (the median "
                        "of this cache's earlier students of each method)" if known else
                        f"training of {len(to_train)} students not estimated (none of their methods in this cache)")
    print(f"{len(checked.cells)} cells; {work:,} NFE x samples; students: {len(to_train)} to train, "
          f"{len(loaded)} loaded from the cache; estimate: {'; '.join(estimate)} "
          "(metrics and latency not included)")
    print(f"protocol {protocols.resolve(suite.evaluators).name}; prompts {suite.prompts!r} (first {suite.samples}); "
          "checks passed; nothing written (dry run)")


def sampling_seconds_per_nfe(suite: Suite, checked: Checked) -> float | None:
    """Seconds per network evaluation per sample of the embedded teacher, from one timed batch at 1 step (None for a
    diffusers teacher, which a dry run does not run)."""
    if suite.backbone.get("kind") == "diffusers":
        return None
    teacher = registry.get("teacher")
    method = teacher(checked.backbone, teacher.make_config({}), base.Context(cache_dir=None, progress=False))
    batch = checked.prompts[: suite.batch_size]
    budget = teacher.budget(method.config, steps=1)
    with torch.no_grad():
        method.sample([p.text for p in batch], [(p.id, 0) for p in batch], 1)  # warm-up
        t0 = time.perf_counter()
        method.sample([p.text for p in batch], [(p.id, 0) for p in batch], 1)
    return (time.perf_counter() - t0) / (budget.nfe * len(batch))


def memory_plan(suite: Suite, opts: Options) -> None:
    """A real-scale suite's memory plan (``bench.plan``: every entry's resident networks and phase activations per
    rank, from the directory's configs on the meta device, before any weight loads). A dry run prints it; a plan
    over the device's memory (the CUDA device's, or ``--device-memory``) is refused with the setting that fits."""
    if suite.backbone.get("kind") != "diffusers" or not (opts.dry_run or opts.device_memory
                                                          or str(opts.device).startswith("cuda")):
        return
    from bench import plan as memory
    from bench.footprints import Entry as PlanEntry

    spec = opts.device_memory
    size = memory.device_memory(spec) if spec or str(opts.device).startswith("cuda") else None
    setup = memory.setup_from_suite(suite.backbone, suite.evaluators, suite.batch_size, suite.samples)
    options = memory.options_from_suite(suite.backbone, ranks=int(os.environ.get("WORLD_SIZE", "1")), device_memory=size)
    entries = [PlanEntry(e.name, dataclasses.asdict(e.config), tuple(b.steps for b in e.budgets), e.label)
               for e in suite.entries]
    lab = memory.Lab(setup)
    plans = memory.plan_suite(setup, entries, options, lab)
    if opts.dry_run:
        print(memory.render(lab, plans))
    if size is not None:
        memory.check(lab, plans)


def run(suite: Suite, opts: Options) -> Path | None:
    """Run a suite; returns the run directory (None for a dry run). Bad input raises UserError before
    anything is written; a failure while the run is being set up removes the new run directory."""
    t_start = time.time()
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    dist = Dist(opts.device)  # before anything loads: under several CUDA processes each loads onto its own GPU
    opts = dataclasses.replace(opts, device=dist.run_device)
    checked = check(suite, opts)
    if opts.dry_run:
        print_plan(suite, opts, checked)
        return None
    stamp = dist.broadcast_object(dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    rd = RunDir(opts.out or Path("results") / f"{suite.name}-{stamp}")
    error = None
    if dist.main:  # one writer: process 0 creates and locks the run directory
        try:
            rd.create(opts.resume)
        except UserError as e:
            error = str(e)
    error = dist.broadcast_object(error)
    if error:
        raise UserError(error)
    try:
        ctx = RunContext(suite, opts, rd, checked.prompts, checked.backbone, checked.evaluators, dist)
        try:
            start(ctx, checked.truncated)
        except BaseException:
            if dist.main and not opts.resume:  # nothing of this run exists yet: leave nothing behind
                rd.unlock()
                shutil.rmtree(rd.path, ignore_errors=True)
            raise
        if dist.main:  # set up (config, reference, floor): named before the first cell, not only at the end
            print(f"run directory: {rd.path}", file=sys.stderr, flush=True)
        rows = rd.rows() if dist.main else []
        done = dist.broadcast_object({cell_key(r["label"], r["nfe"], r["seed"], r.get("train_seed")) for r in rows})
        t_cells = time.time()
        cells = checked.cells
        # the bar counts sampling network evaluations (NFE x samples, the diversity groups' included): its estimate
        # follows the cells' cost rather than their number; the postfix names the cell and its stage
        bar = tqdm(total=sum(cell_work(suite, c) for c in cells), desc=f"run {suite.name}", unit="NFE·sample",
                   unit_scale=True, disable=not ctx.progress)
        for k, cell in enumerate(cells):
            if cell.key not in done:
                ctx.stage = lambda what, key=cell.key: bar.set_postfix_str(f"{key}: {what}")
                row = run_cell(ctx, cell)
                if dist.main:
                    rows.append(row)
                    rd.write_rows(rows)
            if k + 1 == len(cells) or entry_key(cells[k + 1].entry) != entry_key(cell.entry):
                ctx.release(cell.entry)  # its last cell: free its networks before the next method loads
            bar.update(cell_work(suite, cell))
        bar.close()
        finish(ctx, len(checked.cells), t_start, t_cells)
        return rd.path
    finally:
        rd.unlock()


# --- 2. config, reference, protocol --------------------------------------------------------------


def start(ctx: RunContext, truncated: dict) -> None:
    """config.json (kept from the first session on --resume), the FID reference and floor, the protocol."""
    suite, opts, rd, d = ctx.suite, ctx.opts, ctx.rundir, ctx.dist
    old = rd.config() if opts.resume else None
    # the cache location is a machine path: kept in a hidden local file (never in results) for --resume
    ctx.cache = Path(opts.cache or (rd.remembered_cache() if opts.resume else None) or default_cache())
    config = ctx.config_block(ctx.backbone.identity(), prompt_identity(suite.prompts, ctx.prompts), truncated=truncated,
                              processes=d.world, study=opts.study, shard=list(opts.shard) if opts.shard else None,
                              save_samples=opts.save_samples)
    if old is not None:
        if old["suite"] != config["suite"]:
            raise UserError(f"cannot resume {rd.path}: its suite differs from the one given (run it with the original suite)")
        was = str(old.get("prompts", {}).get("sha256"))
        if was != config["prompts"]["sha256"]:
            raise UserError(f"cannot resume {rd.path}: its prompts {suite.prompts!r} have other contents now "
                            f"(sha256 {config['prompts']['sha256'][:12]}…, was {was[:12]}…); start a new run")
        if old.get("source_sha256", config["source_sha256"]) != config["source_sha256"]:
            raise UserError(f"cannot resume {rd.path}: the code that makes its numbers changed since it started "
                            f"(source {old['source_sha256']} then, {config['source_sha256']} now); start a new run")
        config.update(started=old.get("started"), command=old.get("command"),
                      resumed=old.get("resumed", []) + [dt.datetime.now().isoformat(timespec="seconds")])
    else:
        config.update(started=dt.datetime.now().isoformat(timespec="seconds"), command=opts.command)
    if d.main:
        rd.remember_cache(ctx.cache)
        rd.write_config(config)
        faults.maybe_raise("setup", 0)
        if opts.shard is None:  # a shard's values are measured by `flashbench merge`, against the reference there
            measurement(ctx)
        elif opts.shard[0] == 0 and teacher_referenced(suite):  # ... which finds the teacher's samples in the cache
            teacher_reference(ctx)
    if d.main:
        ctx.protocol = ctx.protocol_of(config)
    d.barrier()


def measurement(ctx: RunContext) -> None:
    """The FID reference (cached by content hash) and the real-vs-real floor, when the suite measures FID: the
    evaluators' (renders, an image folder, the drawn COCO images) or, for ``teacher-fid``, the teacher's samples."""
    if metric_registry.needs(ctx.suite.metrics, "reference"):
        if teacher_referenced(ctx.suite):
            ctx.reference = teacher_reference(ctx)
        else:
            ctx.reference = ctx.evaluators.reference(ctx.prompts, ctx.cache / "metrics")
        if not ctx.rundir.has_floor():
            floor = ctx.evaluators.floor(ctx.prompts, ctx.reference, ctx.suite.metrics, ctx.suite.metric_settings)
            if floor is not None:
                ctx.rundir.write_floor({"real_vs_real": floor, "n": len(ctx.prompts),
                                        "what": "renders of the same prompts with other nuisance draws vs the reference"})


def teacher_referenced(suite: Suite) -> bool:
    """Whether the suite's FID reference is the teacher's own samples (protocol ``teacher-fid``)."""
    return (metric_registry.needs(suite.metrics, "reference")
            and protocols.resolve(suite.evaluators).reference == "teacher-samples")


def reference_identity(evaluators) -> dict:
    """What a reference's features depend on: the evaluators' identity and every feature space's network and weights."""
    return {**evaluators.identity(), "spaces": evaluators.feature_spaces()}


def teacher_reference_key(spec: dict, teacher: dict, prompts: list, evaluators: dict) -> tuple[str, dict]:
    """(cache key, source) of a ``teacher-fid`` reference: a content hash of the teacher's identity, the reference
    entry's method and settings, its steps, the prompts' sha256, the noise seed and the evaluators' identity."""
    entry, steps = spec["reference_entry"], spec["reference_steps"]
    seed = spec.get("reference_seed", protocols.TEACHER_REFERENCE_SEED)
    source = {"kind": "the teacher's own samples of the prompts", "paired": True, "label": entry["label"],
              "method": entry["name"], "settings": entry["settings"], "steps": steps, "seed": seed,
              "teacher_sha256": io.content_hash(teacher), "prompts_sha256": prompts_sha256(prompts)}
    return io.content_hash({**source, "evaluators": evaluators}), source


def check_teacher_reference(suite: Suite, prompts: list, evaluators, teacher: dict, cache: Path | None) -> None:
    """For `merge` and `evaluate`, which have no teacher to sample: a ``teacher-fid`` suite's reference must be in
    the cache already, or a UserError says how to make it (checked before their run directory is created)."""
    if not teacher_referenced(suite):
        return
    key, source = teacher_reference_key(suite.evaluators, teacher, prompts, reference_identity(evaluators))
    if reference_cached(Path(cache or default_cache()) / "metrics", key, evaluators.feature_spaces()) is None:
        raise UserError(f"the teacher-fid reference ({source['label']} at {source['steps']} steps) is not in the "
                        f"cache {cache or default_cache()}; run the suite (or its shard 0) with this --cache first")


def teacher_reference(ctx: RunContext):
    """The ``teacher-fid`` reference: FID features of the reference entry's samples of every prompt at
    ``reference_steps`` (noise seed ``reference_seed``), sampled before the cells and cached by content
    (``teacher_reference_key``). Without a teacher (``merge``, ``evaluate``) it is read from the cache."""
    spec = ctx.suite.evaluators
    teacher = ctx.backbone.identity() if ctx.backbone is not None else ctx.rundir.config()["teacher"]
    key, source = teacher_reference_key(spec, teacher, ctx.prompts, reference_identity(ctx.evaluators))
    cache = ctx.cache / "metrics"
    if ctx.backbone is None:
        check_teacher_reference(ctx.suite, ctx.prompts, ctx.evaluators, teacher, ctx.cache)
    return cached_reference(key, source, teacher_features(ctx, spec, source), ctx.evaluators.num_features, cache,
                            ctx.evaluators.feature_spaces())


def teacher_features(ctx: RunContext, spec: dict, source: dict):
    """Features {space: [batch, width]} (``Evaluators.all_features``) of the reference entry's samples, batch by batch
    in prompt order (consumed only when the reference is not cached). UserError when a sample is not finite."""
    ref = spec["reference_entry"]
    cls = registry.get(ref["name"])
    config = cls.make_config(ref["settings"], ref["label"])
    entry = Entry(ref["name"], ref["label"], ref["settings"], [cls.budget(config, steps=source["steps"])], config=config)
    method = ctx.method(entry)
    method.prepare(source["steps"])
    for i in tqdm(range(0, len(ctx.prompts), ctx.suite.batch_size), desc="  teacher reference", leave=False,
                  disable=not ctx.progress):
        batch = ctx.prompts[i : i + ctx.suite.batch_size]
        images, finite = to_8bit(method.sample([p.text for p in batch], [(p.id, source["seed"]) for p in batch],
                                               source["steps"]).cpu())
        if not finite.all():
            raise UserError(f"the teacher-fid reference ({ref['label']} at {source['steps']} steps) has non-finite "
                            f"samples (prompt {batch[int((~finite).nonzero()[0])].id}); choose other reference_steps")
        yield ctx.evaluators.all_features(images.to(ctx.evaluators.device))


# --- 3. one cell ----------------------------------------------------------------------------------


def run_cell(ctx: RunContext, cell: Cell) -> dict | None:
    """One results row. Every process trains and samples its shard; process 0 returns the row, others None."""
    entry, budget = cell.entry, cell.budget
    method = ctx.method(entry)
    row = {
        "suite": ctx.suite.name, "method": entry.name, "label": entry.label, "variant": entry.variant,
        "settings": method.settings(), "steps": budget.steps, "nfe": budget.nfe, "seed": cell.seed,
        "train_seed": entry.train_seed, **({"curve": entry.curve} if entry.curve is not None else {}),
        "n_samples": len(ctx.prompts), "protocol": ctx.protocol, "status": "ok", "error": None,
    }
    failed = ctx.failed_training.get((entry.label, entry.train_seed, budget.steps))
    if failed:  # training already diverged in this run: do not retry
        return {**row, **failed}
    try:
        # 1. train or load (cached by a hash of what makes the student)
        try:
            ctx.stage("training or loading the student")
            row["train"] = method.prepare(budget.steps).to_dict()
        except DivergenceError as e:
            failed = {"status": "failed", "error": f"training diverged: {e}", "failed_step": e.step}
            ctx.failed_training[(entry.label, entry.train_seed, budget.steps)] = failed
            return {**row, **failed}
        # 2. sample this process's shard into the metric accumulators, counting network evaluations
        ctx.stage("sampling")
        with latency.cell_memory(ctx.opts.device) as memory:
            sampled = sample_and_measure(ctx, cell, method)
        row.update(memory)
        faults.maybe_kill("metrics", cell.index)
        t0 = time.time()
        values = sampled["meter"].gather(lambda t: ctx.dist.gather(t, len(ctx.sample_range)))
        grid = gather_grid(ctx, sampled["grid"])
        if not ctx.dist.main:
            return None
        row.update(nfe_counted=sampled["nfe_counted"], sample_seconds=sampled["sample_seconds"],
                   n_sampled=len(ctx.sample_range), non_finite=sampled["bad"])
        if row["nfe_counted"] is not None and row["nfe_counted"] != budget.nfe:
            raise RuntimeError(f"{entry.label}: counted {row['nfe_counted']} NFE per sample, budget was {budget.nfe}")
        if ctx.opts.shard is not None:  # 3'. a shard keeps every sample's values; `flashbench merge` measures them
            ctx.rundir.write_values(cell.key, values, grid, ctx.sample_range.start)
            row["status"] = "shard"
        elif sampled["bad"]:
            return {**row, "status": "failed",
                    "error": f"{sampled['bad']} of {len(ctx.prompts)} samples are not finite (NaN/Inf)"}
        else:  # 3. metrics, from every sample's values in sample order
            ctx.stage("metrics and their CIs")
            row.update(sampled["meter"].row(values, row["protocol"]))
            row.update(reward_flags(row["settings"], ctx.suite.metrics))  # trained on the reward it is measured with?
        row["eval_seconds"] = round(sampled["eval_seconds"] + time.time() - t0, 2)
        # 4. latency (process 0 of the first shard; once per method and budget, the same for every seed)
        if "latency" in ctx.suite.metrics and (ctx.opts.shard is None or ctx.opts.shard[0] == 0):
            key = (entry.label, budget.nfe)  # the same network sizes for every seed: timed once
            if key not in ctx.latency:
                ctx.stage("latency")
                lat = ctx.suite.latency
                ctx.latency[key] = latency.measure(method, ctx.prompts, budget.steps, lat["throughput_batch"],
                                                   ctx.opts.device, lat["warmup"], lat["repeats"])
            row.update(ctx.latency[key])
        # 5. a sample grid of the first prompts
        if grid is not None and ctx.opts.shard is None:
            save_grid(grid, ctx.rundir.path / "grids" / f"{entry.label}_nfe{budget.nfe}.png")
    except DivergenceError as e:
        row.update(status="failed", error=f"diverged: {e}", failed_step=e.step)
    return row


def sample_and_measure(ctx: RunContext, cell: Cell, method) -> dict:
    """Sample this process's shard batch by batch; each batch goes into the metric accumulators and is dropped.

    Returns the accumulators, the counted NFE per sample and the non-finite count (summed over
    processes), this process's images among the first ``suite.grid`` prompts, and timings (s).
    """
    suite, d = ctx.suite, ctx.dist
    meter = CellMetrics(ctx.evaluators, ctx.prompts, ctx.reference, suite.metrics, suite.metric_settings)
    part = d.shard(len(ctx.sample_range))
    mine = ctx.sample_range[part.start : part.stop]  # this process's prompt indices
    want_grid = cell.seed == suite.seeds[0] and cell.entry.train_seed in (None, suite_first_train_seed(suite))
    saver = SampleSaver(ctx, cell) if ctx.opts.save_samples else None
    grid, bad, t_sample, t_eval = [], 0, 0.0, 0.0
    method.reset_nfe()
    for i in tqdm(range(mine.start, mine.stop, suite.batch_size), desc="  sample", leave=False,
                  disable=not ctx.progress):
        faults.maybe_kill("sample", cell.index)
        batch = ctx.prompts[i : min(i + suite.batch_size, mine.stop)]
        t0 = time.time()
        out = method.sample([p.text for p in batch], [(p.id, cell.seed) for p in batch], cell.budget.steps).cpu()
        t1 = time.time()
        images, finite = to_8bit(out)
        if faults.hit("nan", "sample", cell.index) and i == 0:
            finite[0] = False
        bad += int((~finite).sum())
        meter.update(images, batch)
        if saver is not None:
            saver.save(i, batch, images)
        if want_grid:
            grid += [(i + j, images[j]) for j in range(len(batch)) if i + j < suite.grid]
        t_sample, t_eval = t_sample + t1 - t0, t_eval + time.time() - t1
    counted, n, bad = d.sum([method.counted_nfe(), len(mine), bad])
    if meter.groups and d.main and ctx.opts.shard is None:  # several seeds of some prompts (diversity), on process 0

        def sample(texts, keys):
            return to_8bit(method.sample(texts, keys, cell.budget.steps).cpu())[0]

        meter.sample_groups(sample, cell.seed)
    return {"meter": meter, "nfe_counted": counted / n if n else None, "bad": int(bad),
            "grid": grid if want_grid else None, "sample_seconds": round(t_sample, 2), "eval_seconds": t_eval}


def cell_folder(label: str, nfe: int, train_seed: int | None) -> str:
    return f"{label}_nfe{nfe}" + ("" if train_seed is None else f"_train{train_seed}")


class SampleSaver:
    """Every sample of a cell as a lossless PNG, in GenEval's folder layout (``bench.geneval.write_sample``), which
    `flashbench evaluate` and GenEval's official scorer read: samples/<label>_nfe<NFE>[_train<seed>]/ is an image
    folder, <index:05d>/metadata.jsonl and .../samples/<seed:04d>.png."""

    def __init__(self, ctx: RunContext, cell: Cell):
        e = cell.entry
        self.root = ctx.rundir.path / "samples" / cell_folder(e.label, cell.budget.nfe, e.train_seed)
        self.seed = cell.seed
        io.write_json(self.root / "cell.json", {"label": e.label, "method": e.name, "variant": e.variant,
                                                "steps": cell.budget.steps, "nfe": cell.budget.nfe,
                                                "train_seed": e.train_seed, "settings": e.settings,
                                                "teacher": ctx.backbone.identity()})

    def save(self, start: int, prompts: list, images: torch.Tensor) -> None:
        for j, (p, img) in enumerate(zip(prompts, images)):
            png = (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            geneval.write_sample(self.root, start + j, self.seed, png, prompt_record(p))


def prompt_record(p) -> dict:
    """A prompt as one GenEval-style metadata line: its own fields first, flashbench's under "flashbench"."""
    rec = {k: geneval.json_or_str(v) for k, v in p.meta}
    rec.update(prompt=p.text, flashbench={"id": p.id, "scene_seed": p.scene_seed, "meta": [list(m) for m in p.meta],
                                          "objects": None if p.objects is None else [dataclasses.asdict(o) for o in p.objects]})
    return rec


def suite_first_train_seed(suite: Suite) -> int | None:
    seeds = [e.train_seed for e in suite.entries if e.train_seed is not None]
    return min(seeds) if seeds else None


def gather_grid(ctx: RunContext, local: list | None) -> torch.Tensor | None:
    """The first ``suite.grid`` samples [k, 3, H, W] in prompt order, on process 0 (None when no grid is due)."""
    if local is None:
        return None
    parts = ctx.dist.gather_objects(local)
    if not ctx.dist.main:
        return None
    pairs = sorted((pair for part in parts for pair in part), key=lambda pair: pair[0])
    return torch.stack([img for _, img in pairs]) if pairs else None


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8, upscale: int = 4) -> None:
    """A PNG grid of images [k, 3, H, W] in [0, 1], each upscaled (nearest) `upscale` times; written atomically."""
    big = torch.nn.functional.interpolate(images.float(), scale_factor=upscale, mode="nearest")
    grid = torchvision.utils.make_grid(big, nrow=nrow, padding=2, pad_value=1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    torchvision.utils.save_image(grid, tmp)
    tmp.replace(path)


# --- 4. finish -------------------------------------------------------------------------------------


def prompt_identity(spec: str, prompts: list) -> dict:
    """The prompt set by content: the selected prompts' sha256 (ids, texts, ground truth) and the file's."""
    shipped = prompt_sets().get(spec)
    path = Path(spec)
    return {"set": spec, "n": len(prompts), "sha256": prompts_sha256(prompts),
            "file_sha256": shipped["sha256"] if shipped else (sha256_file(path) if path.is_file() else None)}


def finish(ctx: RunContext, n_cells: int, t_start: float, t_cells: float) -> None:
    if ctx.dist.main:
        ctx.rundir.write_summary({"wall_seconds_this_session": round(time.time() - t_start, 1),
                                  "wall_seconds_cells": round(time.time() - t_cells, 1), "cells": n_cells,
                                  "processes": ctx.dist.world,
                                  "finished": dt.datetime.now().isoformat(timespec="seconds")})
        if ctx.opts.shard is None:  # a shard's tables are the merged run's
            tables.write_all(ctx.rundir.path)
    ctx.dist.barrier()
