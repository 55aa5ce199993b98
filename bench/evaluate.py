"""`flashbench evaluate FOLDER [SUITE] --out RUN`: measure saved samples under a suite's protocol.

FOLDER is in the GenEval layout: ``<index:05d>/metadata.jsonl`` (the prompt: GenEval's fields, and
flashbench's under "flashbench") and ``<index:05d>/samples/<seed:04d>.png``; or a folder of such
folders (one per cell, as ``flashbench run --save-samples`` writes them under ``samples/``, each with a
``cell.json``). Samples from any tool can be scored, and metric environments isolated from sampling
ones: the rows carry the same protocol (prompts by content, evaluators, reference) as a run's, so
``flashbench compare`` accepts them against it.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import components, protocols, provenance, runner
from bench.metrics.cell import CellMetrics
from bench.results import tables
from bench.rundir import RunDir
from bench.suite import Suite
from core.errors import UserError
from prompts import Obj, Prompt
from prompts.loaders import prompts_sha256


def cell_folders(folder: Path) -> list[Path]:
    """The GenEval-layout folders under `folder` (itself, or its sub-folders); UserError when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of samples (GenEval layout: <index>/metadata.jsonl, <index>/samples/)")
    if (folder / "00000" / "metadata.jsonl").exists():
        return [folder]
    cells = sorted(p for p in folder.iterdir() if (p / "00000" / "metadata.jsonl").exists())
    if not cells:
        raise UserError(f"{folder} holds no samples in the GenEval layout (<index:05d>/metadata.jsonl and "
                        "<index:05d>/samples/<seed:04d>.png)")
    return cells


def read_prompts(cell: Path) -> list[Prompt]:
    """The prompts of a GenEval-layout folder, as flashbench loaded them when it saved them."""
    out = []
    indices = sorted(p for p in cell.iterdir() if p.is_dir() and p.name.isdigit())
    for i, d in enumerate(indices):
        if d.name != f"{i:05d}":
            raise UserError(f"{cell}: prompt folders must be 00000, 00001, ... without gaps; found {d.name} at {i}")
        try:
            rec = json.loads((d / "metadata.jsonl").read_text().splitlines()[0])
        except (OSError, IndexError, json.JSONDecodeError):
            raise UserError(f"{d / 'metadata.jsonl'}: expected one JSON object (a GenEval metadata line)") from None
        if not isinstance(rec.get("prompt"), str):
            raise UserError(f"{d / 'metadata.jsonl'}: expected a string 'prompt'")
        fb = rec.get("flashbench") or {}
        if fb:
            objects = None if fb.get("objects") is None else tuple(Obj(**o) for o in fb["objects"])
            meta = tuple(tuple(m) for m in fb.get("meta", []))
            out.append(Prompt(fb["id"], rec["prompt"], objects, fb.get("scene_seed"), meta))
        else:  # a folder another tool wrote: GenEval's own fields are the metadata
            meta = tuple((k, v if isinstance(v, str) else json.dumps(v, sort_keys=True))
                         for k, v in sorted(rec.items()) if k != "prompt")
            out.append(Prompt(f"{cell.name}-{i:05d}", rec["prompt"], meta=meta))
    return out


def read_images(cell: Path, indices: range, seed: int) -> torch.Tensor:
    """Samples [n, 3, H, W] float32 in [0, 1] (8-bit levels) of the prompts `indices` for one seed."""
    out = []
    for i in indices:
        path = cell / f"{i:05d}" / "samples" / f"{seed:04d}.png"
        if not path.is_file():
            raise UserError(f"{cell}: no sample for prompt {i:05d} and seed {seed} ({path.name})")
        with Image.open(path) as im:
            out.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255.0


def seeds_of(cell: Path) -> list[int]:
    return sorted(int(p.stem) for p in (cell / "00000" / "samples").glob("*.png"))


def evaluate(folder: Path, suite: Suite, out: Path, cache: Path | None = None, device: str = "cpu") -> Path:
    """Score every cell folder under `folder` with the suite's evaluators and metrics into the run `out`."""
    t0 = time.time()
    cells = cell_folders(folder)
    prompts = read_prompts(cells[0])
    for c in cells[1:]:
        if read_prompts(c) != prompts:
            raise UserError(f"{c} holds other prompts than {cells[0]}; evaluate them separately")
    components.check_device(device)
    components.check_metrics(suite.metrics, prompts, str(folder), suite.evaluators["kind"])
    evaluators = components.load_evaluators(suite.evaluators, device, prompts)
    info = [json.loads((c / "cell.json").read_text()) if (c / "cell.json").exists() else {} for c in cells]
    teacher = info[0].get("teacher", {"backbone": "unknown (samples from outside)"})
    runner.check_teacher_reference(suite, prompts, evaluators, teacher, cache)
    rd = RunDir(out)
    rd.create(resume=False)
    try:
        ctx = runner.RunContext.scoring(suite, rd, prompts, evaluators, out, device, cache)
        config = {"suite": suite.to_dict(), "evaluated": [str(c.name) for c in cells], "versions": provenance.versions(),
                  "git": provenance.git_hash(), "device": device, "teacher": teacher,
                  "evaluators": evaluators.identity(), "prompts": {"set": str(folder), "n": len(prompts),
                                                                   "sha256": prompts_sha256(prompts),
                                                                   "file_sha256": None},
                  "started": dt.datetime.now().isoformat(timespec="seconds"), "command": f"flashbench evaluate {folder}"}
        rd.write_config(config)
        runner.measurement(ctx)
        protocol = provenance.protocol(config["prompts"], config["evaluators"], ctx.reference, teacher, device,
                                       config["versions"].get("torchmetrics"),
                                       evaluators.num_features if "fid" in suite.metrics else None,
                                       protocols.resolve(suite.evaluators))
        rows = []
        for cell, meta in zip(cells, info):
            for seed in seeds_of(cell):
                meter = CellMetrics(evaluators, prompts, ctx.reference, fid="fid" in suite.metrics)
                for i in range(0, len(prompts), suite.batch_size):
                    idx = range(i, min(i + suite.batch_size, len(prompts)))
                    meter.update(read_images(cell, idx, seed), prompts[idx.start : idx.stop])
                row = {"suite": suite.name, "method": meta.get("method", "external"), "label": meta.get("label", cell.name),
                       "variant": meta.get("variant"), "settings": meta.get("settings"), "steps": meta.get("steps"),
                       "nfe": meta.get("nfe"), "seed": seed, "train_seed": meta.get("train_seed"),
                       "n_samples": len(prompts), "protocol": protocol, "status": "ok", "error": None,
                       "scored_from": cell.name}
                row.update(meter.compute())
                rows.append(row)
        rd.write_rows(rows)
        rd.write_summary({"wall_seconds_this_session": round(time.time() - t0, 1), "cells": len(rows),
                          "finished": dt.datetime.now().isoformat(timespec="seconds")})
        tables.write_all(rd.path)
    finally:
        rd.unlock()
    return rd.path
