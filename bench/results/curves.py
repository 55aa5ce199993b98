"""Learning curves: each trained method's validation metrics at several points of its training, against the
compute that training spent. A pure function of a run's rows (no model is imported).

A suite with a ``[curves]`` table (``bench/suite.py``) runs each trained entry once per update count, every
training continuing the cached shorter one, and its rows carry ``curve`` (the entry's label). From them
``write(run, df)`` makes

* ``curves.jsonl``: one line per point (curve, steps, NFE, updates), the counted training compute (network
  passes, forward/backward by role; seconds inside the updates, summed over the continued trainings) and the
  metrics with their bootstrap CIs, means over sampling and training seeds (and the spread over training seeds);
* ``plots/learning_curves.png``: each metric against network passes and against training seconds, one line per
  curve and step count, CI bands, the plateau point ringed;
* ``tables/curves.md``: each curve's plateau (``plateau``) and the methods at equal compute (``equal_compute``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from bench.results.plotstyle import pyplot, series_style
from bench.specs import SPECS, fmt, missing
from core import io

CURVES_FILE = "curves.jsonl"
METRICS = ("fid", "clip_score", "accuracy")


def points(df: pd.DataFrame) -> list[dict]:
    """One record per (curve, NFE, updates) from the finished rows: means over sampling seeds and training seeds
    (CI bounds averaged, as ``tables.aggregate``), the training compute of the point's students (mean over seeds)."""
    if df.empty or "curve" not in df:
        return []
    ok = df[df["curve"].notna() & (df["status"] == "ok")]
    out = []
    for (curve, nfe), g in ok.groupby(["curve", "nfe"], sort=False):
        by_updates: dict[int, list[dict]] = {}
        for r in g.to_dict("records"):
            by_updates.setdefault(int(r["train"]["student_updates"]), []).append(r)
        for updates, rows in sorted(by_updates.items()):
            trains = [r["train"] for r in rows]
            rec = {"curve": curve, "method": rows[0]["method"], "label": rows[0]["label"], "steps": int(rows[0]["steps"]),
                   "nfe": int(nfe), "updates": updates, "nominal_updates": nominal_updates(rows[0]["label"], updates),
                   "n_rows": len(rows),
                   "train_seeds": sorted({r["train_seed"] for r in rows if not missing(r.get("train_seed"))}),
                   "network_passes": _mean(t["network_passes"] for t in trains),
                   "train_seconds": _mean(t.get("train_seconds") for t in trains),
                   "passes": _mean_passes([t.get("passes") or {} for t in trains]),
                   "continued_from": sorted({t.get("continued_from") for t in trains if t.get("continued_from")})}
            for key in METRICS:
                for col in (key, f"{key}_ci_low", f"{key}_ci_high"):
                    rec[col] = _mean(r.get(col) for r in rows)
                seeds = {}
                for r in rows:
                    if not missing(r.get(key)):
                        seeds.setdefault(r.get("train_seed"), []).append(r[key])
                means = [sum(v) / len(v) for v in seeds.values()]
                rec[f"{key}_seed_sd"] = (float(pd.Series(means).std(ddof=1)) if len(means) > 1 else None)
            out.append(rec)
    return out


def nominal_updates(label: str, default: int | None = None) -> int | None:
    """The suite's update count of a curve point's row (its label ends ``" u=N"``, ``suite._per_curve_point``); a
    student of it may train fewer (progressive's per-step students). `default` for a label without one."""
    head, sep, tail = str(label).rpartition(" u=")
    return int(tail) if sep and head and tail.isdigit() else default


def _mean(values) -> float | None:
    vals = [float(v) for v in values if not missing(v)]
    return sum(vals) / len(vals) if vals else None


def _mean_passes(dicts: list[dict]) -> dict:
    roles = sorted({r for d in dicts for r in d})
    return {r: {k: _mean(d.get(r, {}).get(k) for d in dicts) for k in ("forward", "backward")} for r in roles}


def _curves(pts: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """(curve, steps) -> its points by increasing updates."""
    out: dict = {}
    for p in pts:
        out.setdefault((p["curve"], p["steps"]), []).append(p)
    return {k: sorted(v, key=lambda p: p["updates"]) for k, v in out.items()}


# --- the rules ------------------------------------------------------------------------------------


def plateau(curve: list[dict]) -> tuple[dict, bool]:
    """(the plateau point, whether a later point confirms it) of one curve's points by increasing updates.

    Rule: the first point whose validation FID is within the CI of the best (lowest-FID) point at or after it, i.e.
    FID ≤ that point's ``fid_ci_high`` (its bootstrap CI over prompts; with training seeds, widened by their spread).
    The plateau is *shown* only when a later point exists: a curve whose last point is its own plateau may still
    be falling, and is reported as not shown.
    """
    for j, p in enumerate(curve):
        later = [q for q in curve[j:] if not missing(q.get("fid"))]
        if missing(p.get("fid")) or not later:
            continue
        best = min(later, key=lambda q: q["fid"])
        if p["fid"] <= _upper(best):
            return p, j < len(curve) - 1
    return curve[-1], False


def _upper(p: dict) -> float:
    """The top of a point's FID CI: the bootstrap bound, or FID + the training seeds' spread if that is wider."""
    hi = p["fid"] if missing(p.get("fid_ci_high")) else p["fid_ci_high"]
    sd = p.get("fid_seed_sd")
    return max(hi, p["fid"] + (0.0 if missing(sd) else sd))


def equal_compute(curves: dict[tuple[str, int], list[dict]]) -> dict[int, dict]:
    """Per step count: a compute budget C past every curve's plateau, and each curve's point at C.

    Rule: C = the largest, over the curves at that step count, of the network passes at each curve's plateau point
    (``plateau``; a curve whose plateau is not shown contributes its last point), the least compute at which every
    curve has reached its plateau. Each curve is compared at its best point (lowest validation FID, the fewer
    passes on a tie) among those with at most C passes: the checkpoint early stopping on validation prompts keeps
    within the budget (no interpolation; never more compute than C). A curve whose points all spent less than C is
    marked as ending under C. The best point is at or after the plateau (an earlier point lower than every later
    one would itself be the plateau); whether that plateau is shown (a later point confirms it) is said per curve.
    """
    out: dict = {}
    for steps in sorted({s for _, s in curves}):
        group = {c: pts for (c, s), pts in curves.items() if s == steps}
        plateaus = {c: plateau(pts) for c, pts in group.items()}
        budget = max(plat["network_passes"] for plat, _ in plateaus.values())
        rows = {}
        for c, pts in group.items():
            within = [p for p in pts if p["network_passes"] <= budget]  # its plateau point is one of them
            point = min(within, key=lambda p: (math.inf if missing(p.get("fid")) else p["fid"], p["network_passes"]))
            plat, shown = plateaus[c]
            rows[c] = {"point": point, "plateau": plat, "plateau_shown": shown,
                       "under_budget": pts[-1]["network_passes"] < budget,
                       "past_plateau": shown and point["updates"] >= plat["updates"]}
        out[steps] = {"passes": budget, "curves": rows}
    return out


def equal_compute_updates(pts: list[dict]) -> dict[tuple[str, int], int]:
    """{(curve, steps): the suite's update count (``nominal_updates``) of the point ``equal_compute`` compares} for
    point records as ``points`` makes them (at least curve, steps, updates, nominal_updates, network_passes, fid)."""
    return {(c, steps): r["point"]["nominal_updates"]
            for steps, eq in equal_compute(_curves(pts)).items() for c, r in eq["curves"].items()}


# --- outputs --------------------------------------------------------------------------------------


def write(run: Path, df: pd.DataFrame) -> bool:
    """curves.jsonl, plots/learning_curves.png and tables/curves.md of a run with curve rows (False: none)."""
    pts = points(df)
    if not pts:
        return False
    run = Path(run)
    io.write_text(run / CURVES_FILE, "".join(json.dumps(p) + "\n" for p in pts))
    curves = _curves(pts)
    io.write_text(run / "tables" / "curves.md", report(curves))
    plot(curves, run / "plots" / "learning_curves.png")
    return True


def _m(p: dict, key: str) -> str:
    return "—" if missing(p.get(key)) else fmt(p, key, SPECS[key].show_ci)


def report(curves: dict[tuple[str, int], list[dict]]) -> str:
    lines = ["# Learning curves (validation prompts)", "",
             "Compute is counted: network passes per sample (forward + backward, every network of the training) and "
             "seconds inside the updates, summed over the trainings each point continued.", "",
             f"Plateau rule: {' '.join(plateau.__doc__.split())}", "",
             "| curve | steps | updates | passes | train s | FID ↓ | CLIP ↑ | Acc ↑ | plateau |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (c, steps), pts in curves.items():
        plat, shown = plateau(pts)
        for p in pts:
            mark = ("**plateau**" if shown else "last point (plateau not shown)") if p is plat else ""
            secs = "—" if missing(p.get("train_seconds")) else f"{p['train_seconds']:,.0f}"
            lines.append(f"| {c} | {steps} | {p['updates']} | {p['network_passes']:,.0f} | {secs} | {_m(p, 'fid')} | "
                         f"{_m(p, 'clip_score')} | {_m(p, 'accuracy')} | {mark} |")
    lines += ["", "## At equal compute", "", f"Rule: {' '.join(equal_compute.__doc__.split())}", ""]
    for steps, eq in equal_compute(curves).items():
        lines += [f"### {steps} step{'s' if steps > 1 else ''}: at most {eq['passes']:,.0f} network passes", "",
                  "| curve | updates | passes | FID ↓ | CLIP ↑ | Acc ↑ | its plateau (updates, passes) | past it |",
                  "|---|---|---|---|---|---|---|---|"]
        for c, r in eq["curves"].items():
            p, plat = r["point"], r["plateau"]
            where = f"{plat['updates']}, {plat['network_passes']:,.0f}" if r["plateau_shown"] else "not shown"
            past = "yes" if r["past_plateau"] else ("no" if r["plateau_shown"] else "unknown")
            over = " (the curve ends under C)" if r["under_budget"] else ""
            lines.append(f"| {c} | {p['updates']} | {p['network_passes']:,.0f}{over} | {_m(p, 'fid')} | "
                         f"{_m(p, 'clip_score')} | {_m(p, 'accuracy')} | {where} | {past} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(curves: dict[tuple[str, int], list[dict]], out: Path) -> None:
    """Each metric against network passes (top) and training seconds (bottom): one line per curve and step count,
    a band for the CI, distinct markers, the plateau point ringed when a later point shows it."""
    plt = pyplot()
    keys = [k for k in METRICS if any(not missing(p.get(k)) for pts in curves.values() for p in pts)]
    if not keys:
        return
    xs = (("network_passes", "network passes per sample (fwd + bwd, counted)"),
          ("train_seconds", "training seconds (in updates, counted)"))
    fig, axes = plt.subplots(len(xs), len(keys), figsize=(4.4 * len(keys), 3.4 * len(xs)), squeeze=False)
    for row, (x, xlabel) in enumerate(xs):
        for col, key in enumerate(keys):
            ax = axes[row][col]
            for i, ((c, steps), curve) in enumerate(curves.items()):
                plat, shown = plateau(curve)  # by FID; ringed on every panel
                pts = [p for p in curve if not missing(p.get(key)) and not missing(p.get(x))]
                if not pts:
                    continue
                xv, yv = [p[x] for p in pts], [p[key] for p in pts]
                line, = ax.plot(xv, yv, ms=4, **series_style(i), label=f"{c} ({steps} step{'s' if steps > 1 else ''})")
                lo = [p.get(f"{key}_ci_low") for p in pts]
                hi = [p.get(f"{key}_ci_high") for p in pts]
                if not any(missing(v) for v in lo + hi):
                    ax.fill_between(xv, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
                if shown and plat in pts and not missing(plat.get(x)):
                    ax.plot([plat[x]], [plat[key]], marker="o", ms=11, mfc="none", mec=line.get_color(), mew=1.5)
            if all(not missing(p.get(x)) and p[x] > 0 for pts in curves.values() for p in pts):
                ax.set_xscale("log")
            if key == "fid":  # FID spans 1-step (tens) and 4-step (below one) students: a log axis shows both
                ax.set_yscale("log")
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_title(SPECS[key].title + " (ringed: plateau by FID)", fontsize=9)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, max(1, len(labels))), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.04 * (1 + (len(labels) - 1) // 5), 1, 1))  # room for the legend below the panels
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
