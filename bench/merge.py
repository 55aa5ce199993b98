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

from bench import components, protocols, provenance, runner
from bench.metrics.cell import CellMetrics
from bench.results import tables
from bench.rundir import RunDir, load_rows, read_config
from bench.source import source_hash
from bench.suite import Suite, from_dict
from core.errors import UserError

SAME = ("suite", "source_sha256", "prompts", "teacher", "evaluators")  # what makes shards one run


def check_shards(runs: list[Path]) -> tuple[list[dict], list[Path]]:
    """(configs, runs) in shard order; UserError naming the first thing that does not fit."""
    configs = [read_config(r) for r in runs]
    for r, c in zip(runs, configs):
        if not c.get("shard"):
            raise UserError(f"{r} is not a shard (run it with --shard i/n)")
    n = configs[0]["shard"][1]
    order = sorted(range(len(runs)), key=lambda k: configs[k]["shard"][0])
    got = [configs[k]["shard"] for k in order]
    if got != [[i, n] for i in range(n)]:
        raise UserError(f"merge needs shards 0..{n - 1} of {n} exactly once each; got {[f'{i}/{k}' for i, k in got]}")
    for k in order:
        for key in SAME:
            if configs[k].get(key) != configs[order[0]].get(key):
                raise UserError(f"{runs[k]} differs from {runs[order[0]]} in {key}; shards of one run share it")
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
    prompts = components.suite_prompts(suite.prompts, suite.samples, suite.evaluators)
    evaluators = components.load_evaluators(suite.evaluators, device, prompts)
    runner.check_teacher_reference(suite, prompts, evaluators, configs[0]["teacher"], cache)
    rd = RunDir(out)
    rd.create(resume=False)
    try:
        ctx = runner.RunContext.scoring(suite, rd, prompts, evaluators, out, device, cache)
        config = {k: v for k, v in configs[0].items() if k not in ("shard", "started", "command", "resumed")}
        config.update(merged_from=[r.name for r in runs], started=dt.datetime.now().isoformat(timespec="seconds"),
                      command=f"flashbench merge {' '.join(r.name for r in runs)}")
        rd.write_config(config)
        runner.measurement(ctx)
        protocol = provenance.protocol(config["prompts"], config["evaluators"], ctx.reference, config["teacher"],
                                       config["device"], config["versions"].get("torchmetrics"),
                                       evaluators.num_features if "fid" in suite.metrics else None,
                                       protocols.resolve(suite.evaluators))
        rows = [merge_cell(ctx, [rows[i] for rows in shard_rows], [RunDir(r) for r in runs], key, protocol)
                for i, key in enumerate(keys)]
        rd.write_rows(rows)
        rd.write_summary({"wall_seconds_this_session": round(time.time() - t0, 1), "cells": len(rows),
                          "merged_shards": len(runs), "finished": dt.datetime.now().isoformat(timespec="seconds")})
        tables.write_all(rd.path)
    finally:
        rd.unlock()
    return rd.path


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
    meter = CellMetrics(ctx.evaluators, ctx.prompts, ctx.reference, fid="fid" in ctx.suite.metrics)
    row.update(meter.compute(values))
    row["eval_seconds"] = round(time.time() - t0, 2)
    grids = [g for _, g in loaded if g is not None]
    if grids:
        runner.save_grid(torch.cat(grids)[: ctx.suite.grid], ctx.rundir.path / "grids" / f"{row['label']}_nfe{row['nfe']}.png")
    return row
