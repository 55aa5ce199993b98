"""The regression gate: `flashbench baseline RUN` and `flashbench compare BASELINE RUN`.

A baseline is a run with two or more seeds. Its tolerances come from the measured seed-to-seed
spread of every (method, NFE) cell: tol = max(K · std over seeds, FLOOR[metric]), written to
``tolerances.json`` in the baseline. ``compare`` reports, per cell and metric, the change and
whether it is worse than its tolerance; any such regression (or a cell missing or failed in the
new run) exits 1. Runs measured under different protocols (prompt set, evaluators, reference,
sample count) are refused: their numbers are not comparable.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench.rundir import load_rows
from bench.specs import GATED, SPECS
from core import io
from core.errors import UserError

K = 3.0
FLOOR = {m: SPECS[m].gate_floor for m in GATED}  # absolute minimum tolerances
TOLERANCES = "tolerances.json"


def _cells(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(f"{r['label']}|nfe={r['nfe']}", []).append(r)
    return out


def _protocol_id(rows: list[dict]) -> set[str]:
    return {r.get("protocol", {}).get("id") for r in rows if r.get("status") == "ok"}


def make_baseline(run: Path) -> dict:
    rows = load_rows(run)
    if not rows:
        raise UserError(f"{run} has no results; give a finished run directory")
    tol = {}
    for cell, rs in _cells(rows).items():
        ok = [r for r in rs if r.get("status") == "ok"]
        if len({r["seed"] for r in ok}) < 2:
            raise UserError(f"baseline cell {cell} has {len(ok)} finished seed(s); a baseline needs >= 2 seeds "
                            "(run the suite with --seeds 0,1,2)")
        tol[cell] = {m: max(K * float(np.std([r[m] for r in ok], ddof=1)), FLOOR[m]) for m in GATED if m in ok[0]}
    out = {"k": K, "floors": FLOOR, "cells": tol, "protocol_ids": sorted(i for i in _protocol_id(rows) if i)}
    io.write_json(Path(run) / TOLERANCES, out)
    return out


def compare(baseline: Path, run: Path) -> tuple[str, bool]:
    """(Markdown report, regressed?)."""
    tpath = Path(baseline) / TOLERANCES
    if not tpath.exists():
        raise UserError(f"{baseline} has no {TOLERANCES}; make it with `flashbench baseline {baseline}`")
    tol = json.loads(tpath.read_text())
    base_rows, new_rows = load_rows(baseline), load_rows(run)
    if not new_rows:
        raise UserError(f"{run} has no results; give a finished run directory")
    if _protocol_id(new_rows) - set(tol["protocol_ids"]):
        raise UserError(f"{run} was measured under another protocol than {baseline} (prompts, evaluators, reference "
                        "or sample count differ); its numbers are not comparable")
    base, new = _cells(base_rows), _cells(new_rows)
    lines = [f"# Regression gate: {Path(run).name} vs baseline {Path(baseline).name}", "",
             f"Tolerance per cell = max({tol['k']:g} × seed-to-seed std of the baseline, floor {tol['floors']}).", "",
             "| cell | metric | baseline | new | change | tolerance | verdict |", "|---|---|---|---|---|---|---|"]
    regressed = False
    for cell, brs in base.items():
        if cell not in tol["cells"]:
            continue
        nrs = [r for r in new.get(cell, []) if r.get("status") == "ok"]
        if not nrs:
            lines.append(f"| {cell} | — | — | — | — | — | **missing or failed** |")
            regressed = True
            continue
        for m, t in tol["cells"][cell].items():
            b = float(np.mean([r[m] for r in brs if r.get("status") == "ok"]))
            n = float(np.mean([r[m] for r in nrs]))
            worse = (n - b) if SPECS[m].lower_is_better else (b - n)
            verdict = "**regression**" if worse > t else ("better" if worse < -t else "ok")
            regressed |= worse > t
            lines.append(f"| {cell} | {m} | {b:.3f} | {n:.3f} | {n - b:+.3f} | {t:.3f} | {verdict} |")
    lines += ["", "**FAIL: regression**" if regressed else "**PASS**", ""]
    report = "\n".join(lines)
    io.write_text(Path(run) / "compare.md", report)
    return report, regressed
