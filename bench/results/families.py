"""The two families side by side: the same suite's rows on the VP (ε) teacher and on the rectified-flow teacher.

A pure function of two finished runs (``results.jsonl``), like every table: rows are matched by label and
steps, and each pair is judged by the claims' rule (``claims.compare``: 95% intervals that do not overlap).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench.results import claims, select
from bench.results.tables import aggregate, load
from bench.specs import SPECS, fmt

METRICS = ("fid", "accuracy")


def _runs(vp: Path, flow: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return select.ok(aggregate(load(vp)[0])), select.ok(aggregate(load(flow)[0]))


def _verdict(flow: dict, vp: dict, m: str) -> str:
    v = claims.compare(flow, vp, m)
    return "tied" if v == "tied" else f"flow {v}"


def side_by_side(vp: Path, flow: Path) -> str:
    """Markdown: one line per (label, steps) present in both runs, each metric on both teachers and the verdict
    (the NFE of both when they differ: an unguided flow teacher spends 1 per step where a guided one spends 2).

    A run without results gives a table without rows; a corrupt results row is a UserError (``load_rows``)."""
    a, b = _runs(vp, flow)
    rows = ["| row | steps | NFE (VP / flow) | " + " | ".join(f"{SPECS[m].header} VP | {SPECS[m].header} flow | flow vs VP"
                                                  for m in METRICS) + " |",
            "|---|---|---|" + "---|---|---|" * len(METRICS)]
    if a.empty or b.empty:
        return "\n".join(rows) + "\n"
    for r in b.to_dict("records"):
        match = a[(a["label"] == r["label"]) & (a["steps"] == r["steps"])]
        if match.empty:
            continue
        q = match.iloc[0].to_dict()
        cells = [f"{fmt(q, m)} | {fmt(r, m)} | {_verdict(r, q, m)}" for m in METRICS]
        nfe = str(r["nfe"]) if q["nfe"] == r["nfe"] else f"{q['nfe']} / {r['nfe']}"
        rows.append(f"| {r['label']} | {r['steps']} | {nfe} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def winners(vp: Path, flow: Path) -> str:
    """Markdown: at each step count, the distilled student with the lowest FID on each teacher, and whether it
    is significantly better than the runner-up (``claims.compare``); the full variant of each method only."""
    lines = ["| steps | VP: best student | FID | over runner-up | flow: best student | FID | over runner-up |",
             "|---|---|---|---|---|---|---|"]
    tables = _runs(vp, flow)
    if any(t.empty for t in tables):
        return "\n".join(lines) + "\n"
    for steps in sorted(set(tables[0]["steps"]) & set(tables[1]["steps"])):
        cells = []
        for t in tables:
            s = t[(t["steps"] == steps) & (t["method"] != "teacher") & (t["variant"].fillna("full") == "full")]
            s = s.sort_values("fid").to_dict("records")
            if not s:
                cells.append("— | — | —")
                continue
            edge = claims.compare(s[0], s[1], "fid") if len(s) > 1 else "only one"
            edge = {"better": f"better than {s[1]['label']}", "tied": f"tied with {s[1]['label']}"}.get(edge, edge)
            cells.append(f"{s[0]['label']} | {fmt(s[0], 'fid')} | {edge}")
        if any(c != "— | — | —" for c in cells):
            lines.append(f"| {steps} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
