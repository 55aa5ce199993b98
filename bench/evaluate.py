"""`flashbench evaluate FOLDER [SUITE] --out RUN`: measure saved samples under a suite's protocol.

FOLDER is in the GenEval layout: ``<index:05d>/metadata.jsonl`` (the prompt: GenEval's fields, and
flashbench's under "flashbench") and ``<index:05d>/samples/<seed:04d>.png``; or a folder of such
folders (one per cell, as ``flashbench run --save-samples`` writes them under ``samples/``, each with a
``cell.json``). Samples from any tool can be scored, and metric environments isolated from sampling
ones: the rows carry the same protocol (prompts by content, evaluators, reference) as a run's, so
``flashbench compare`` accepts them against it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import shlex
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import components, runner
from bench.metrics.cell import CellMetrics
from bench.results import tables
from bench.rundir import RunDir
from bench.suite import Suite
from core.errors import UserError
from prompts import Obj, Prompt
from prompts.loaders import prompts_sha256


INDEX = re.compile(r"\d{5,}")


@dataclasses.dataclass
class Cell:
    """One cell's saved samples, from one or several folders (shards): its prompts in global index order, each
    prompt's folder, the seeds saved, and the cell.json flashbench wrote beside them ({} for another tool's)."""

    name: str
    prompts: list[Prompt]
    folders: list[Path]  # per prompt, its <index> folder
    seeds: list[int]
    info: dict


def _holds_samples(folder: Path) -> bool:
    return any(INDEX.fullmatch(p.name) and (p / "metadata.jsonl").is_file() for p in folder.iterdir() if p.is_dir())


def cells_in(folders: list[Path]) -> list[Cell]:
    """The cells under `folders`, each a GenEval-layout folder or a folder of them (``samples/`` of a run, of one
    shard or several): a cell's prompts are the union of its folders' index folders, which must form one
    contiguous run of global indices (a shard's, or shards' that together leave no gap) with nothing twice.
    Every prompt's metadata and every sample PNG are checked here, before anything is written; UserError
    (one line) names the first folder or file that does not fit."""
    parts: dict[str, list[Path]] = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"{folder} is not a folder of samples (GenEval layout: <index>/metadata.jsonl, "
                            "<index>/samples/<seed:04d>.png)")
        found = [folder] if _holds_samples(folder) else sorted(p for p in folder.iterdir()
                                                                if p.is_dir() and _holds_samples(p))
        if not found:
            raise UserError(f"{folder} holds no samples in the GenEval layout (<index:05d>/metadata.jsonl and "
                            "<index:05d>/samples/<seed:04d>.png)")
        for f in found:
            parts.setdefault(f.name, []).append(f)
    cells = [read_cell(name, fs) for name, fs in sorted(parts.items())]
    for c in cells[1:]:
        if c.prompts != cells[0].prompts:
            raise UserError(f"cell {c.name} holds other prompts than {cells[0].name}; evaluate them separately")
    return cells


def read_cell(name: str, parts: list[Path]) -> Cell:
    """One cell from its folders (see ``cells_in``)."""
    by_index: dict[int, Path] = {}
    for part in parts:
        for d in sorted(p for p in part.iterdir() if p.is_dir() and INDEX.fullmatch(p.name)):
            i = int(d.name)
            if i in by_index:
                raise UserError(f"prompt {d.name} of cell {name} is in both {by_index[i].parent} and {part}; give each "
                                "shard's samples once")
            by_index[i] = d
    indices = sorted(by_index)
    gaps = sorted(set(range(indices[0], indices[-1] + 1)) - set(indices))
    if gaps:
        raise UserError(f"cell {name}: prompt folders {indices[0]:05d}..{indices[-1]:05d} miss {len(gaps)} (first "
                        f"{gaps[0]:05d}); give every shard's samples folder, or one shard's")
    folders = [by_index[i] for i in indices]
    prompts = [read_prompt(d, name, i) for d, i in zip(folders, indices)]
    seeds = sorted(int(png.stem) for png in (folders[0] / "samples").glob("*.png") if png.stem.isdigit())
    if not seeds:
        raise UserError(f"{folders[0] / 'samples'}: no <seed:04d>.png samples")
    sizes: dict[tuple[int, int], Path] = {}
    for d in folders:
        for seed in seeds:
            png = d / "samples" / f"{seed:04d}.png"
            sizes.setdefault(check_png(png), png)
    if len(sizes) > 1:
        (a, first), (b, other) = list(sizes.items())[:2]
        raise UserError(f"cell {name}: {other} is {b[0]}x{b[1]}, {first} is {a[0]}x{a[1]}; one cell's samples share a size")
    info_files = [part / "cell.json" for part in parts if (part / "cell.json").is_file()]
    info = json.loads(info_files[0].read_text()) if info_files else {}
    return Cell(name, prompts, folders, seeds, info)


def read_prompt(d: Path, cell: str, index: int) -> Prompt:
    """The prompt of one GenEval-layout prompt folder, as flashbench loaded it when it saved it (another tool's:
    its GenEval fields as the metadata, an id from the cell and index)."""
    try:
        rec = json.loads((d / "metadata.jsonl").read_text().splitlines()[0])
    except (OSError, IndexError, json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{d / 'metadata.jsonl'}: expected one JSON object (a GenEval metadata line)") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
        raise UserError(f"{d / 'metadata.jsonl'}: expected a string 'prompt'")
    fb = rec.get("flashbench") or {}
    if fb:
        objects = None if fb.get("objects") is None else tuple(Obj(**o) for o in fb["objects"])
        meta = tuple(tuple(m) for m in fb.get("meta", []))
        return Prompt(fb["id"], rec["prompt"], objects, fb.get("scene_seed"), meta)
    meta = tuple((k, v if isinstance(v, str) else json.dumps(v, sort_keys=True))
                 for k, v in sorted(rec.items()) if k != "prompt")
    return Prompt(f"{cell}-{index:05d}", rec["prompt"], meta=meta)


def check_png(path: Path) -> tuple[int, int]:
    """A sample that exists and decodes as an image; its (width, height). UserError naming it otherwise."""
    if not path.is_file():
        raise UserError(f"{path.parent.parent}: no sample {path.name} (every prompt needs every seed's PNG)")
    try:
        with Image.open(path) as im:
            im.load()  # decodes every byte: a cut file fails here, not while measuring
            return im.size
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: not a readable image ({type(e).__name__}); remove or re-save it") from None


def read_images(cell: Cell, indices: range, seed: int) -> torch.Tensor:
    """Samples [n, 3, H, W] float32 in [0, 1] (8-bit levels) of the cell's prompts `indices` for one seed."""
    out = []
    for i in indices:
        with Image.open(cell.folders[i] / "samples" / f"{seed:04d}.png") as im:
            out.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255.0


def evaluate(folders: list[Path] | Path, suite: Suite, out: Path, cache: Path | None = None,
             device: str = "cpu") -> Path:
    """Score every cell under `folders` (see ``cells_in``) with the suite's evaluators and metrics into the run `out`;
    every input is read and checked before `out` is created."""
    t0 = time.time()
    folders = [Path(folders)] if isinstance(folders, (str, Path)) else [Path(f) for f in folders]
    components.check_device(device)
    RunDir(out).check_new(False)
    cells = cells_in(folders)
    prompts = cells[0].prompts
    where = ", ".join(str(f) for f in folders)
    components.check_metrics(suite.metrics, prompts, where, suite.evaluators["kind"], suite.metric_settings,
                             grouped="`flashbench evaluate` scores one saved sample per prompt")
    evaluators = components.load_evaluators(suite.evaluators, device, prompts)
    teacher = cells[0].info.get("teacher", {"backbone": "unknown (samples from outside)"})
    runner.check_teacher_reference(suite, prompts, evaluators, teacher, cache)
    with RunDir(out).staged() as rd:
        ctx = runner.RunContext.scoring(suite, rd, prompts, evaluators, out, device, cache)
        identity = {"set": where, "n": len(prompts), "sha256": prompts_sha256(prompts), "file_sha256": None}
        config = ctx.config_block(teacher, identity, evaluated=[c.name for c in cells],
                                  started=dt.datetime.now().isoformat(timespec="seconds"),
                                  command=shlex.join(["flashbench", "evaluate", *map(str, folders)]))
        rd.write_config(config)
        runner.measurement(ctx)
        protocol = ctx.protocol_of(config)
        rows = []
        for cell in cells:
            meta = cell.info
            for seed in cell.seeds:
                meter = CellMetrics(evaluators, prompts, ctx.reference, suite.metrics, suite.metric_settings)
                for i in range(0, len(prompts), suite.batch_size):
                    idx = range(i, min(i + suite.batch_size, len(prompts)))
                    meter.update(read_images(cell, idx, seed), prompts[idx.start : idx.stop])
                row = {"suite": suite.name, "method": meta.get("method", "external"), "label": meta.get("label", cell.name),
                       "variant": meta.get("variant"), "settings": meta.get("settings"), "steps": meta.get("steps"),
                       "nfe": meta.get("nfe"), "seed": seed, "train_seed": meta.get("train_seed"),
                       "n_samples": len(prompts), "protocol": protocol, "status": "ok", "error": None,
                       "scored_from": cell.name}
                row.update(meter.row(None, protocol))
                rows.append(row)
        rd.write_rows(rows)
        rd.write_summary({"wall_seconds_this_session": round(time.time() - t0, 1), "cells": len(rows),
                          "finished": dt.datetime.now().isoformat(timespec="seconds")})
        tables.write_all(rd.path)
    return Path(out)
