"""The regression gate: `flashbench baseline RUN` and `flashbench compare BASELINE RUN`.

A baseline is a run with two or more seeds (tier (b) of the gate; ``bench.results.gate`` adds the
per-device references, tier (a) and the latency history). Its tolerances come from the measured seed-to-seed
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


def ok_cells(rows: list[dict]) -> list[tuple[str, int]]:
    """The (label, NFE) cells with a finished row, in the run's order."""
    return list(dict.fromkeys((r["label"], r["nfe"]) for r in rows if r.get("status") == "ok"))


def tolerances(rows: list[dict]) -> dict:
    """Tier (b)'s windows: per cell and gated metric, max(K · std over seeds, FLOOR[metric]), in the metric's
    units; UserError when a cell has fewer than 2 finished seeds."""
    tol = {}
    for cell, rs in _cells(rows).items():
        ok = [r for r in rs if r.get("status") == "ok"]
        if len({r["seed"] for r in ok}) < 2:
            raise UserError(f"baseline cell {cell} has {len(ok)} finished seed(s); a baseline needs >= 2 seeds "
                            "(run the suite with --seeds 0,1,2)")
        tol[cell] = {m: max(K * float(np.std([r[m] for r in ok], ddof=1)), FLOOR[m]) for m in GATED if m in ok[0]}
    return {"k": K, "floors": FLOOR, "cells": tol, "protocol_ids": sorted(i for i in _protocol_id(rows) if i)}


def make_baseline(run: Path) -> dict:
    """Write RUN/tolerances.json (``tolerances``) and return it; UserError for a run without results."""
    rows = load_rows(run)
    if not rows:
        raise UserError(f"{run} has no results; give a finished run directory")
    out = tolerances(rows)
    io.write_json(Path(run) / TOLERANCES, out)
    return out


def read_tolerances(baseline: Path) -> dict:
    tpath = Path(baseline) / TOLERANCES
    if not tpath.exists():
        raise UserError(f"{baseline} has no {TOLERANCES}; make it with `flashbench baseline {baseline}`")
    return json.loads(tpath.read_text())


def check_protocol(tol: dict, new_rows: list[dict], baseline: Path, run: Path) -> None:
    """UserError when `run` has no rows or was measured under a protocol the baseline was not."""
    if not new_rows:
        raise UserError(f"{run} has no results; give a finished run directory")
    if _protocol_id(new_rows) - set(tol["protocol_ids"]):
        raise UserError(f"{run} was measured under another protocol than {baseline} (prompts, evaluators, reference "
                        "or sample count differ); its numbers are not comparable")


def tier_b(tol: dict, base_rows: list[dict], new_rows: list[dict]) -> tuple[list[str], bool]:
    """(Markdown table lines, regressed?): per cell and metric, the change of the mean over seeds and whether
    it is worse than the cell's tolerance; a cell missing or failed in the new run regresses."""
    base, new = _cells(base_rows), _cells(new_rows)
    lines = ["| cell | metric | baseline | new | change | tolerance | verdict |", "|---|---|---|---|---|---|---|"]
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
    return lines, regressed


def window_note(tol: dict) -> str:
    return f"Tolerance per cell = max({tol['k']:g} × seed-to-seed std of the baseline, floor {tol['floors']})."


def compare(baseline: Path, run: Path) -> tuple[str, bool]:
    """(Markdown report, regressed?) of RUN against a baseline made by `flashbench baseline` (tier (b) only);
    also written to RUN/compare.md. UserError when the baseline has no tolerances or the protocols differ."""
    tol = read_tolerances(baseline)
    base_rows, new_rows = load_rows(baseline), load_rows(run)
    check_protocol(tol, new_rows, baseline, run)
    lines, regressed = tier_b(tol, base_rows, new_rows)
    lines = [f"# Regression gate: {Path(run).name} vs baseline {Path(baseline).name}", "", window_note(tol), "",
             *lines, "", "**FAIL: regression**" if regressed else "**PASS**", ""]
    report = "\n".join(lines)
    io.write_text(Path(run) / "compare.md", report)
    return report, regressed
