"""`flashbench merge SHARD_RUN... --out RUN`: one run's results from the shards of a split run.

Each shard (``flashbench run SUITE --shard i/n``, e.g. one Slurm array task) samples its balanced
contiguous part of the prompts and keeps every sample's metric values (``values/``). Merging checks
that the shards are one run (the same suite, code, prompts, teacher and evaluators, shards 0..n-1 each
once, every cell finished), concatenates the values in prompt order and measures them as the runner
does, so the merged table is one run's table, bit for bit on the CPU.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import torch

from bench import components, runner
from bench.metrics.cell import CellMetrics
from bench.results import tables
from bench.rundir import RunDir, load_rows, read_config
from bench.source import source_hash
from bench.suite import Suite, from_dict
from core.errors import UserError

SAME = ("suite", "source_sha256", "prompts", "teacher", "evaluators")  # what makes shards one run
# the libraries whose versions move a number (the platform string and others may differ between nodes)
VERSIONS = ("python", "torch", "diffusers", "torchmetrics", "open_clip_torch", "numpy")


def device_class(config: dict) -> str:
    """A shard's device class: "cpu", or "cuda" with the GPU's name."""
    device = str(config.get("device", "cpu")).split(":")[0]
    return device if device == "cpu" else f"{device} ({config.get('gpu') or 'GPU not recorded'})"


def check_students(runs: list[Path], shard_rows: list[list[dict]]) -> None:
    """Every shard sampled each cell with the same student or checkpoint (sha256): shards that trained their own
    (another cache, kernels that are not deterministic) are not one run. UserError naming the first cell that
    differs."""
    for i, first in enumerate(shard_rows[0]):
        digests = {(rows[i].get("train") or {}).get("checkpoint_sha256") for rows in shard_rows}
        digests.discard(None)
        if len(digests) > 1:
            raise UserError(f"cell {first['label']} (NFE {first['nfe']}) was sampled with {len(digests)} different "
                            f"students across the shards ({', '.join(sorted(d[:12] for d in digests))}); run one shard "
                            "to the end first and give the others its --cache, so that every shard loads that student")


def check_shards(runs: list[Path]) -> tuple[list[dict], list[Path]]:
    """(configs, runs) in shard order; UserError naming the first thing that does not fit."""
    configs = [read_config(r, "merge") for r in runs]
    for r, c in zip(runs, configs):
        if not c.get("shard"):
            raise UserError(f"{r} is not a shard (run it with --shard i/n)")
    n = configs[0]["shard"][1]
    order = sorted(range(len(runs)), key=lambda k: configs[k]["shard"][0])
    got = [configs[k]["shard"] for k in order]
    if got != [[i, n] for i in range(n)]:
        raise UserError(f"merge needs shards 0..{n - 1} of {n} exactly once each; got {[f'{i}/{k}' for i, k in got]}")
    first = configs[order[0]]
    for k in order:
        for key in SAME:
            if configs[k].get(key) != first.get(key):
                raise UserError(f"{runs[k]} differs from {runs[order[0]]} in {key}; shards of one run share it")
        libs = [v for v in VERSIONS if configs[k].get("versions", {}).get(v) != first.get("versions", {}).get(v)]
        if libs:
            v = libs[0]
            raise UserError(f"{runs[k]} was made with {v} {configs[k]['versions'].get(v)}, {runs[order[0]]} with "
                            f"{first['versions'].get(v)}; shards of one run share the library versions")
        if device_class(configs[k]) != device_class(first):
            raise UserError(f"{runs[k]} ran on {device_class(configs[k])}, {runs[order[0]]} on {device_class(first)}; "
                            "shards of one run share the device class")
    if configs[order[0]]["source_sha256"] != source_hash():
        raise UserError("the shards were made by other code than this flashbench (numeric source "
                        f"{configs[order[0]]['source_sha256']}, here {source_hash()}); merge with the code that made them")
    return [configs[k] for k in order], [runs[k] for k in order]


def merge(runs: list[Path], out: Path, cache: Path | None = None, device: str = "cpu") -> Path:
    """Merge shard runs into the run directory `out`; returns it."""
    t0 = time.time()
    configs, runs = check_shards([Path(r) for r in runs])
    suite: Suite = from_dict(configs[0]["suite"])
    shard_rows = [load_rows(r) for r in runs]
    keys = [runner.cell_key(r["label"], r["nfe"], r["seed"], r.get("train_seed")) for r in shard_rows[0]]
    for r, rows in zip(runs, shard_rows):
        have = {runner.cell_key(x["label"], x["nfe"], x["seed"], x.get("train_seed")) for x in rows}
        if have != set(keys):
            raise UserError(f"{r} has other cells than {runs[0]} (an unfinished shard? resume it first)")
    check_students(runs, shard_rows)
    prompts = components.suite_prompts(suite.prompts, suite.samples, suite.evaluators)
    evaluators = components.load_evaluators(suite.evaluators, device, prompts)
    runner.check_teacher_reference(suite, prompts, evaluators, configs[0]["teacher"], cache)
    shard_dirs = [RunDir(r) for r in runs]
    for key in keys:  # every shard's values, read before anything is written (a cut or missing file is named)
        for d in shard_dirs:
            d.check_values(key)
    with RunDir(out).staged() as rd:
        ctx = runner.RunContext.scoring(suite, rd, prompts, evaluators, out, device, cache)
        config = {k: v for k, v in configs[0].items() if k not in ("shard", "started", "command", "resumed")}
        config.update(merged_from=[r.name for r in runs], started=dt.datetime.now().isoformat(timespec="seconds"),
                      command=f"flashbench merge {' '.join(r.name for r in runs)}",
                      shard_versions=[c["versions"] for c in configs])
        rd.write_config(config)
        runner.measurement(ctx)
        protocol = ctx.protocol_of(config)
        rows = [merge_cell(ctx, [rows[i] for rows in shard_rows], shard_dirs, key, protocol)
                for i, key in enumerate(keys)]
        rd.write_rows(rows)
        rd.write_summary({"wall_seconds_this_session": round(time.time() - t0, 1), "cells": len(rows),
                          "merged_shards": len(runs), "finished": dt.datetime.now().isoformat(timespec="seconds")})
        tables.write_all(rd.path)
    return Path(out)


def merge_cell(ctx: runner.RunContext, parts: list[dict], shard_dirs: list[RunDir], key: str, protocol: dict) -> dict:
    """One cell's row from its shards' rows and values."""
    first = parts[0]
    row = {k: v for k, v in first.items() if k not in ("status", "error", "eval_seconds", "sample_seconds", "nfe_counted",
                                                       "n_sampled", "non_finite")}
    row.update(protocol=protocol, status="ok", error=None)
    failed = [p for p in parts if p["status"] not in ("shard", "ok")]
    if failed:
        return {**row, "status": "failed", "error": failed[0].get("error"), "failed_step": failed[0].get("failed_step")}
    n = sum(p["n_sampled"] for p in parts)
    counted = [p["nfe_counted"] * p["n_sampled"] for p in parts if p["nfe_counted"] is not None]
    row.update(nfe_counted=sum(counted) / n if n else None, n_sampled=n, non_finite=sum(p["non_finite"] for p in parts),
               sample_seconds=round(sum(p["sample_seconds"] for p in parts), 2))
    if row["non_finite"]:
        return {**row, "status": "failed", "error": f"{row['non_finite']} of {n} samples are not finite (NaN/Inf)"}
    loaded = [d.read_values(key) for d in shard_dirs]
    values = [torch.cat([v[k] for v, _ in loaded]) for k in range(len(loaded[0][0]))]
    t0 = time.time()
    meter = CellMetrics(ctx.evaluators, ctx.prompts, ctx.reference, ctx.suite.metrics,
                        ctx.suite.metric_settings)
    row.update(meter.row(values, row["protocol"]))
    row["eval_seconds"] = round(time.time() - t0, 2)
    grids = [g for _, g in loaded if g is not None]
    if grids:
        runner.save_grid(torch.cat(grids)[: ctx.suite.grid], ctx.rundir.path / "grids" / f"{row['label']}_nfe{row['nfe']}.png")
    return row
