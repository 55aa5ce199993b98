"""The runner: suite -> trained/loaded methods -> samples -> metrics -> results/<run>/.

Reading order: ``run()`` validates, opens the run directory, loads the teacher, evaluators and
prompts, then ``_run_cell`` produces one results row per (method entry, NFE, seed). Rows are data
(``results.jsonl``); tables, plots and grids are derived from them (``bench.tables``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from bench import io
from bench.errors import UserError
from bench.suite import Suite

RESULTS_FILE = "results.jsonl"
CONFIG_FILE = "config.json"


def default_cache() -> Path:
    return Path(os.environ.get("FLASHBENCH_CACHE", Path.home() / ".cache" / "flashbench"))


def git_hash() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("flashbench", "torch", "diffusers", "torchmetrics", "open_clip_torch", "numpy", "pandas"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def check_device(device: str) -> str:
    import torch

    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"--device must be cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available here; use --device cpu")
    return device


def load_backbone(spec: dict, device: str):
    """The teacher a suite names: the embedded shapes teacher, or an SD/SDXL directory."""
    if spec["kind"] == "diffusers":
        from methods.diffusers_backbone import DiffusersBackbone

        if "path" not in spec:
            raise UserError("[backbone] kind = 'diffusers' needs path = a local SD/SDXL diffusers directory")
        data = spec.get("train_data")
        return DiffusersBackbone.load(Path(spec["path"]), device, Path(data) if data else None)
    from methods.shapes import ShapesBackbone

    return ShapesBackbone.load(device)


def load_evaluators_for(spec: dict, device: str):
    if spec["kind"] == "real":
        from bench.real_metrics import load_real_evaluators

        for key in ("clip_model", "reference"):
            if key not in spec:
                raise UserError(f"[evaluators] kind = 'real' needs {key} = ...")
        inc = spec.get("inception_dir")
        return load_real_evaluators(Path(inc) if inc else None, spec["clip_model"], spec.get("clip_pretrained"),
                                    Path(spec["reference"]), device)
    from bench.evaluators import load_evaluators

    return load_evaluators(device)


class RunDir:
    """results/<run>/: a lock against a second writer, atomic rows, derived tables."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = None

    @property
    def results(self) -> Path:
        return self.path / RESULTS_FILE

    def create(self, resume: bool) -> None:
        if self.path.exists() and not resume and any(self.path.iterdir()):
            raise UserError(f"run directory {self.path} already exists; choose a new --out, or --resume it")
        if resume and not (self.path / CONFIG_FILE).exists():
            raise UserError(f"cannot resume {self.path}: it has no {CONFIG_FILE} (not a flashbench run)")
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock()

    def lock(self) -> None:
        f = open(self.path / ".lock", "a+")  # noqa: SIM115 - held for the life of the run
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise UserError(f"run {self.path} is in use by another flashbench process; "
                            "wait for it or use another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lock = f

    def unlock(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def rows(self) -> list[dict]:
        return load_rows(self.path)

    def write_rows(self, rows: list[dict]) -> None:
        io.write_text(self.results, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def load_rows(run: Path) -> list[dict]:
    path = Path(run) / RESULTS_FILE
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{path}:{n}: corrupt results row; the file was not written by flashbench") from None
    return rows


def cell_key(label: str, nfe: int, seed: int) -> str:
    return f"{label}|nfe={nfe}|seed={seed}"


@dataclasses.dataclass
class Options:
    out: Path | None = None
    device: str = "cpu"
    cache: Path | None = None
    resume: bool = False
    progress: bool = True
    dry_run: bool = False
    command: str | None = None  # the command line that started the run (recorded in config.json)


def plan(suite: Suite) -> list[tuple]:
    return [(e, n, s, seed) for e in suite.entries for n, s in zip(e.nfe, e.steps) for seed in suite.seeds]


def run(suite: Suite, opts: Options) -> Path | None:
    """Run a suite; returns the run directory (None for a dry run)."""
    from prompts import load_prompts

    t_start = time.time()
    # 1. validate everything before anything is written
    check_device(opts.device)
    prompts = load_prompts(suite.prompts)
    if suite.samples > len(prompts):
        raise UserError(f"samples = {suite.samples} but prompts {suite.prompts!r} has only {len(prompts)}")
    prompts = prompts[: suite.samples]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if len(prompts) < world:
        raise UserError(f"samples = {len(prompts)} is fewer than the {world} processes; use at least one per process")
    cells = plan(suite)
    if opts.dry_run:
        for e, nfe, steps, seed in cells:
            print(f"{e.label:32s} method={e.name:14s} steps={steps:<3d} nfe={nfe:<3d} seed={seed} n={suite.samples}")
        print(f"{len(cells)} cells; prompts {suite.prompts!r} (first {suite.samples}); nothing written (dry run)")
        return None
    from bench.dist import Dist

    d = Dist(opts.device)
    backbone = load_backbone(suite.backbone, opts.device)
    evaluators = load_evaluators_for(suite.evaluators, opts.device)
    stamp = d.broadcast_object(dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    rd = RunDir(opts.out or Path("results") / f"{suite.name}-{stamp}")
    error = None
    if d.main:  # one writer: process 0 creates and locks the run directory
        try:
            rd.create(opts.resume)
        except UserError as e:
            error = str(e)
    error = d.broadcast_object(error)
    if error:
        raise UserError(error)
    try:
        return _run(suite, opts, rd, prompts, cells, backbone, evaluators, d, t_start)
    finally:
        rd.unlock()


def _run(suite, opts, rd: RunDir, prompts, cells, backbone, evaluators, d, t_start: float) -> Path:
    import torch

    from bench import tables
    from methods import base
    from prompts.loaders import prompt_sets

    cfg_path = rd.path / CONFIG_FILE
    old = json.loads(cfg_path.read_text()) if opts.resume and cfg_path.exists() else None
    # the cache location is a machine path: kept in a hidden local file (never in results) for --resume
    cache_file = rd.path / ".cache-path"
    remembered = cache_file.read_text().strip() if opts.resume and cache_file.exists() else None
    cache = Path(opts.cache or remembered or default_cache())
    if d.main:
        io.write_text(cache_file, str(cache.resolve()) + "\n")
    config = {
        "suite": suite.to_dict(),
        "versions": versions(),
        "git": git_hash(),
        "device": opts.device,
        "threads": torch.get_num_threads(),
        "teacher": backbone.identity(),
        "evaluators": evaluators.identity(),
        "prompt_set_sha256": prompt_sets().get(suite.prompts, {}).get("sha256"),
    }
    if old is not None:
        if old["suite"] != config["suite"]:
            raise UserError(f"cannot resume {rd.path}: its suite differs from the one given (run it with the original suite)")
        config["started"] = old.get("started")
        config["command"] = old.get("command")
        config["resumed"] = old.get("resumed", []) + [dt.datetime.now().isoformat(timespec="seconds")]
    else:
        config["started"] = dt.datetime.now().isoformat(timespec="seconds")
        config["command"] = opts.command
    config["processes"] = d.world
    ref = None
    if d.main:
        io.write_json(cfg_path, config)
        # 2. reference statistics (cached by content hash) and the real-vs-real floor
        ref = evaluators.reference(prompts, cache / "metrics") if "fid" in suite.metrics else None
        floor_path = rd.path / "floor.json"
        if ref is not None and not floor_path.exists() and hasattr(evaluators, "floor"):
            io.write_json(floor_path, {"real_vs_real": evaluators.floor(prompts, ref), "n": len(prompts),
                                       "what": "renders of the same prompts with other nuisance draws vs the reference"})
    d.barrier()

    rows = rd.rows() if d.main else []
    done = d.broadcast_object({cell_key(r["label"], r["nfe"], r["seed"]) for r in rows})
    progress = opts.progress and d.main
    ctx = base.Context(cache_dir=cache / "students", device=opts.device, progress=progress, scale=suite.scale,
                       rank=d.rank, world=d.world)
    protocol = _protocol(suite, config, ref, len(prompts)) if d.main else None
    t_run = time.time()
    bar = tqdm(total=len(cells), desc=f"run {suite.name}", disable=not progress)
    methods_by_label: dict[str, object] = {}
    latency_by_cell: dict[tuple, dict] = {}
    failed_training: dict[str, dict] = {}
    for index, (entry, nfe, steps, seed) in enumerate(cells):
        if cell_key(entry.label, nfe, seed) in done:
            bar.update(1)
            continue
        if entry.label not in methods_by_label:
            cls = base.get(entry.name)
            methods_by_label[entry.label] = cls(backbone, cls.make_config(entry.settings, entry.label), ctx)
        method = methods_by_label[entry.label]
        bar.set_postfix_str(f"{entry.label} nfe={nfe} seed={seed}")
        row = _run_cell(suite, rd, method, entry, nfe, steps, seed, prompts, evaluators, ref, protocol,
                        latency_by_cell, opts, index, failed_training, d)
        if d.main:
            rows.append(row)
            rd.write_rows(rows)
        bar.update(1)
    bar.close()
    if d.main:
        summary = {"wall_seconds_this_session": round(time.time() - t_start, 1),
                   "wall_seconds_cells": round(time.time() - t_run, 1), "cells": len(cells),
                   "processes": d.world, "finished": dt.datetime.now().isoformat(timespec="seconds")}
        io.write_json(rd.path / "summary.json", summary)
        tables.write_all(rd.path)
    d.barrier()
    return rd.path


def _protocol(suite: Suite, config: dict, ref, n: int) -> dict:
    """Everything that moves a number, stored beside it. `id` hashes the fields that define comparability."""
    from bench.metrics import BOOTSTRAP, CI_LEVEL, FID_BOOTSTRAP_WIDE

    ev = config["evaluators"]
    prot = {
        "prompts": {"set": suite.prompts, "sha256": config["prompt_set_sha256"], "n": n},
        "evaluators": ev,
        "fid": None if ref is None else {
            "library": f"torchmetrics {config['versions'].get('torchmetrics')} FrechetInceptionDistance",
            "feature": ev.get("feature") or ev.get("fid_feature_id"),
            "feature_sha256": ev.get("attribute_net_sha256"),
            "reference": {"key": ref.key, "n": ref.n},
            "resize": ev.get("fid_library", "none (native resolution)"), "accumulation": "float64",
            "bootstrap_resamples": BOOTSTRAP if ref.features.shape[1] <= 256 else FID_BOOTSTRAP_WIDE,
        },
        "clip_score": {"model": ev.get("clip_model"), "sha256": ev.get("clip_sha256") or ev.get("clip_pretrained_sha256"),
                       "score": "100*max(cos,0)"},
        "accuracy": {"evaluator": "attribute_net", "sha256": ev["attribute_net_sha256"]}
        if "attribute_net_sha256" in ev else None,
        "bootstrap": {"resamples": BOOTSTRAP, "level": CI_LEVEL, "seed": 1234},
        "teacher": config["teacher"],
        "device": config["device"],
        "dtype": "float32",
    }
    prot["id"] = io.content_hash({k: prot[k] for k in ("prompts", "evaluators", "fid", "clip_score", "accuracy",
                                                        "bootstrap")})
    return prot


def _run_cell(suite, rd, method, entry, nfe, steps, seed, prompts, evaluators, ref, protocol, latency_by_cell,
              opts, index: int, failed_training: dict, d) -> dict | None:
    """One (method, NFE, seed) cell. Every process trains and samples its shard; process 0 gathers the
    samples, measures and returns the row (other processes return None)."""
    import torch

    from bench import faults, latency, metrics, tables
    from methods.training import DivergenceError

    row = {
        "suite": suite.name, "method": entry.name, "label": entry.label, "variant": entry.variant,
        "settings": method.settings(), "steps": steps, "nfe": nfe, "seed": seed, "n_samples": len(prompts),
        "protocol": protocol, "status": "ok", "error": None,
    }
    if (entry.label, steps) in failed_training:  # training already diverged in this run: do not retry
        row.update(failed_training[(entry.label, steps)])
        return row
    try:
        # 1. train or load (cached by config hash)
        try:
            info = method.prepare(nfe)
        except DivergenceError as e:
            failed = {"status": "failed", "error": f"training diverged: {e}", "failed_step": e.step}
            failed_training[(entry.label, steps)] = failed
            row.update(failed)
            return row
        row["train"] = info.to_dict()
        # 2. sample this process's shard of the prompts, counting network evaluations
        t0 = time.time()
        method.reset_nfe()
        shard = [prompts[i] for i in d.shard(len(prompts))]
        chunks = []
        for i in tqdm(range(0, len(shard), suite.batch_size), desc="  sample", leave=False,
                      disable=not (opts.progress and d.main)):
            faults.maybe_kill("sample", index)
            batch = shard[i : i + suite.batch_size]
            out = method.sample([p.text for p in batch], [(p.id, seed) for p in batch], nfe).cpu()
            # images leave the sampler as 8-bit, as they would be saved; NaN/Inf is marked out of band (256)
            finite = torch.isfinite(out).flatten(1).all(1)
            if faults.hit("nan", "sample", index) and i == 0 and d.main:
                finite[0] = False
            chunks.append(torch.where(finite[:, None, None, None], (out.nan_to_num(0).clamp(0, 1) * 255).round(),
                                      torch.full_like(out, 256.0)).to(torch.int32))
        local = torch.cat(chunks)
        counted = torch.tensor([method.counted_nfe(), len(shard)], dtype=torch.float64)
        if d.world > 1:
            torch.distributed.all_reduce(counted)
        gathered = d.gather(local, len(prompts))
        if not d.main:
            return None
        row["nfe_counted"] = float(counted[0] / counted[1])
        row["sample_seconds"] = round(time.time() - t0, 2)
        if row["nfe_counted"] != nfe:
            raise RuntimeError(f"{entry.label}: counted {row['nfe_counted']} NFE per sample, budget was {nfe}")
        bad = int((gathered > 255).flatten(1).any(1).sum())
        if bad:
            row.update(status="failed", error=f"{bad} of {len(gathered)} samples are not finite (NaN/Inf)")
            return row
        images = gathered.float() / 255.0
        # 3. metrics
        faults.maybe_kill("metrics", index)
        t0 = time.time()
        row.update(metrics.evaluate(images, prompts, evaluators, ref))
        row["eval_seconds"] = round(time.time() - t0, 2)
        # 4. latency (process 0; once per method and budget, the same for every seed)
        if "latency" in suite.metrics:
            key = (entry.label, nfe)
            if key not in latency_by_cell:
                latency_by_cell[key] = latency.measure(method, prompts, nfe, suite.latency["throughput_batch"],
                                                       opts.device, suite.latency["warmup"], suite.latency["repeats"])
            row.update(latency_by_cell[key])
        # 5. a sample grid of the first prompts
        if seed == suite.seeds[0]:
            tables.save_grid(images[: suite.grid], rd.path / "grids" / f"{entry.label}_nfe{nfe}.png")
    except DivergenceError as e:
        row.update(status="failed", error=f"diverged: {e}", failed_step=e.step)
    return row


def table_only(run_dir: Path) -> Path:
    from bench import tables

    run_dir = Path(run_dir)
    if not (run_dir / RESULTS_FILE).exists():
        raise UserError(f"{run_dir} has no {RESULTS_FILE}; give a run directory written by `flashbench run`")
    tables.write_all(run_dir)
    return run_dir


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `flashbench run`")
