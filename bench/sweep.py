"""`flashbench sweep`: the SRL settings the paper leaves open (γ(t) = ρ·t and k teacher steps).

Trains one 3-step Imagine Flash student per (ρ, k), evaluates it on the *validation* prompts (never
the evaluation set the tables report), and writes ``tables/sweep.md``: FID, CLIP and accuracy per
(ρ, k), with the chosen setting (lowest FID, then highest CLIP) marked. The defaults in
``methods/imagine_flash.py`` are the choice of the sweep cited in the README.
"""

from __future__ import annotations

from pathlib import Path

from bench import suite as suite_mod
from bench.results import tables
from core import io


def build(rhos: list[float], ks: list[int], samples: int, updates: int | None, steps: int = 3) -> suite_mod.Suite:
    methods = []
    for rho in rhos:
        for k in ks:
            settings = {"rho": rho, "teacher_steps": k}
            if updates is not None:
                settings["student_updates"] = updates
            methods.append({"name": "imagine-flash", "label": f"rho={rho:g},k={k}", "variant": "full",
                            "steps": [steps], "settings": settings})
    raw = {"name": "sweep", "description": "SRL rho x k sweep on validation prompts", "prompts": "shapes-val",
           "samples": samples, "metrics": ["fid", "clip_score", "accuracy"], "methods": methods}
    return suite_mod.parse(raw, "sweep")


def write_table(run: Path) -> str:
    agg = tables.aggregate(tables.load(run)[0])
    ok = agg[agg["status"] == "ok"].copy()
    ok["rho"] = ok["label"].str.extract(r"rho=([0-9.]+)")[0].astype(float)
    ok["k"] = ok["label"].str.extract(r"k=(\d+)")[0].astype(int)
    best = ok.sort_values(["fid", "clip_score"], ascending=[True, False]).iloc[0]
    lines = ["# SRL sweep (3-step Imagine Flash students, validation prompts)", "",
             "| ρ | k | FID ↓ | CLIP ↑ | Acc ↑ |", "|---|---|---|---|---|"]
    for r in ok.sort_values(["rho", "k"]).to_dict("records"):
        mark = " **(chosen)**" if r["label"] == best["label"] else ""
        lines.append(f"| {r['rho']:g} | {r['k']} | {r['fid']:.2f} [{r['fid_ci_low']:.2f}, {r['fid_ci_high']:.2f}]{mark} "
                     f"| {r['clip_score']:.2f} | {r['accuracy']:.3f} |")
    lines += ["", f"Chosen: ρ = {best['rho']:g}, k = {int(best['k'])} (lowest FID on the validation prompts).", ""]
    text = "\n".join(lines)
    io.write_text(Path(run) / "tables" / "sweep.md", text)
    return text
