"""Tables, plots and grids: pure functions of a run's results files (no model is imported).

``write_all(run)`` reads ``results.jsonl`` (+ ``floor.json``) and writes
``tables/main.{md,csv,tex}``, ``plots/quality_vs_nfe.png``, ``plots/quality_vs_latency.png`` and
``grids/overview.png`` (and a curves suite's learning curves: ``bench.results.curves``). ``flashbench table RUN`` calls it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from bench.results import claims, curves
from bench.results.plotstyle import pyplot, series_style
from bench.results.select import teacher_at_nfe, teacher_row
from bench.rundir import load_floor, load_rows
from bench.specs import LATENCY_COLUMNS, MAIN_COLUMNS, MORE_COLUMNS, PLOTTED, SPECS, TABLE_A_MORE, fmt, missing
from core import io


def load(run: Path) -> tuple[pd.DataFrame, dict | None]:
    """A run's rows as a DataFrame, and its real-vs-real floor (None when it has none)."""
    return pd.DataFrame(load_rows(run)), load_floor(run)


TRAIN_FIELDS = ("student_updates", "teacher_nfe", "network_passes", "train_seconds", "wall_seconds")


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (label, NFE): metric means over sampling and training seeds (CI bounds averaged),
    failures kept as failures. Rows over several training seeds also get, per metric, the standard
    deviation over the training seeds' means (``<metric>_seed_sd``) and ``n_train_seeds``."""
    if df.empty:
        return df
    out = []
    order = list(dict.fromkeys(df["label"]))
    if "train_seed" not in df:
        df = df.assign(train_seed=None)
    for (label, nfe), g in df.groupby(["label", "nfe"], sort=False, dropna=False):
        ok = g[g["status"] == "ok"]
        all_ok = len(ok) == len(g)
        r = {"label": label, "method": g["method"].iloc[0], "variant": g.get("variant", pd.Series([None])).iloc[0],
             "steps": _int(g["steps"].iloc[0]), "nfe": _int(nfe), "n_seeds": len(ok), "n_samples": int(g["n_samples"].iloc[0]),
             "status": "ok" if all_ok else "failed",
             "error": None if all_ok else "; ".join(str(e) for e in g["error"].dropna().unique())}
        trains = [t for t in g["train"] if isinstance(t, dict)] if "train" in g else []
        for k in TRAIN_FIELDS:  # per student: the mean over the training seeds' students
            vals = [t[k] for t in trains if t.get(k) is not None]
            r[f"train_{k}"] = sum(vals) / len(vals) if vals else None
        if "curve" in g and g["curve"].notna().any():  # a learning curve's point (only curves runs get the column)
            r["curve"] = g["curve"].iloc[0]
        gan, gan_acc = gan_status(trains)
        if gan is not None:  # only rows with an adversarial term get the columns (older results keep their CSV)
            r["gan"], r["gan_disc_acc"] = gan, gan_acc
        train_seeds = ok["train_seed"].dropna().unique()
        r["n_train_seeds"] = len(train_seeds)
        for key in (*MAIN_COLUMNS, "brightness", *MORE_COLUMNS, *LATENCY_COLUMNS):
            for suffix in ("", "_ci_low", "_ci_high", "_iqr_ms"):
                col = key + suffix
                if col in ok and all_ok and ok[col].notna().any():
                    r[col] = float(ok[col].mean())
            if len(train_seeds) > 1 and key in ok and all_ok and key not in LATENCY_COLUMNS:
                r[f"{key}_seed_sd"] = float(ok.groupby("train_seed")[key].mean().std(ddof=1))
        out.append(r)
    agg = pd.DataFrame(out)
    agg["_order"] = agg["label"].map({k: i for i, k in enumerate(order)})
    return agg.sort_values(["_order", "nfe"]).drop(columns="_order").reset_index(drop=True)


def gan_status(trains: list[dict]) -> tuple[str | None, float | None]:
    """Whether the students' adversarial terms learned (``TrainInfo.adversarial``, the rule of
    ``methods.student.AdversarialTerm.verdict``): "active", "inactive", "active in k/n" over the students, or None
    (no adversarial term); and the mean held-out discriminator accuracy at the end of training."""
    verdicts = [t["adversarial"] for t in trains if isinstance(t.get("adversarial"), dict)]
    if not verdicts:
        return None, None
    k = sum(bool(v.get("active")) for v in verdicts)
    accs = [v["disc_acc"] for v in verdicts if v.get("disc_acc") is not None]
    status = "active" if k == len(verdicts) else "inactive" if k == 0 else f"active in {k}/{len(verdicts)}"
    return status, (sum(accs) / len(accs) if accs else None)


def _int(v) -> int | None:
    return None if missing(v) else int(v)


def _cell(r: dict, key: str, with_ci: bool) -> str:
    return "failed" if r.get("status") == "failed" else fmt(r, key, with_ci and SPECS[key].show_ci)


def display_table(agg: pd.DataFrame, floor: dict | None = None, with_ci: bool = True,
                  columns=MAIN_COLUMNS, timing: bool = True) -> pd.DataFrame:
    """The human table: method, steps, NFE, each metric (with CI), latency and throughput (`timing`)."""
    recs = []
    for r in agg.to_dict("records"):
        rec = {"method": r["label"], "steps": r["steps"], "NFE": r["nfe"]}
        for key in (*columns, *(("latency_ms", "throughput") if timing else ())):
            rec[SPECS[key].header] = _cell(r, key, with_ci)
        recs.append(rec)
    if floor is not None:
        f = floor["real_vs_real"]
        rec = {"method": "real renders (floor)", "steps": "—", "NFE": "—"}
        for key in columns:
            rec[SPECS[key].header] = _cell(f, key, with_ci)
        if timing:
            rec[SPECS["latency_ms"].header] = rec[SPECS["throughput"].header] = "—"
        recs.append(rec)
    return pd.DataFrame(recs)


reference_row = teacher_row  # the reference of Table B and of the speedups: the 25-step teacher

# Table A: the quality columns, with the paper's name for position
TABLE_A_COLUMNS = ("fid", "clip_score", "accuracy", "acc_color", "acc_shape", "acc_size", "acc_position", "acc_count")
TABLE_A_HEADERS = {"acc_position": "spatial"}


def table_a(agg: pd.DataFrame) -> pd.DataFrame:
    """Table A: every method at each step count; best value per column at equal steps in bold; beside each student
    row, the teacher's FID at the most NFE not above the row's (``select.teacher_at_nfe``). Per-category
    compositional columns a run measured (GenEval's tasks) follow the paper's. The training columns are each row's
    students' means over training seeds: updates, teacher NFE, forward + backward network passes and seconds inside
    the updates (``TrainInfo.train_seconds``), all counted over every session a student took."""
    ref = reference_row(agg)
    ok = agg[agg["status"] == "ok"]
    columns = (*TABLE_A_COLUMNS, *(k for k in TABLE_A_MORE if k in agg and agg[k].notna().any()))
    best = {}
    for steps, g in ok.groupby("steps"):
        for key in columns:
            if key in g and g[key].notna().any():
                best[(steps, key)] = g[key].min() if SPECS[key].lower_is_better else g[key].max()
    recs = []
    for r in agg.to_dict("records"):
        rec = {"method": gan_marked(r), "steps": r["steps"], "NFE": r["nfe"]}
        for key in columns:
            head = TABLE_A_HEADERS.get(key, SPECS[key].header)
            cell = _cell(r, key, True)
            is_ref = ref is not None and r["label"] == ref["label"] and r["nfe"] == ref["nfe"]
            if r.get("status") == "ok" and not is_ref and best.get((r["steps"], key)) == r.get(key) \
                    and len(ok[ok["steps"] == r["steps"]]) > 1:
                cell = f"**{cell}**"
            rec[head] = cell
        teacher = teacher_at_nfe(agg, r["nfe"]) if r.get("method") != "teacher" else None
        rec["teacher at ≤ NFE: FID"] = "—" if teacher is None else f"{_cell(teacher, 'fid', True)} ({teacher['nfe']} NFE)"
        rec["latency ms"] = _cell(r, "latency_ms", False)
        lat = r.get("latency_ms")
        rec["speedup"] = (f"{ref['latency_ms'] / lat:.1f}×" if ref is not None and lat and ref.get("latency_ms")
                          and r.get("status") == "ok" else "—")
        rec["student updates"] = _train(r, "student_updates")
        rec["teacher NFE (train)"] = _train(r, "teacher_nfe")
        rec["fwd+bwd passes (train)"] = _train(r, "network_passes")
        # seconds inside the updates, summed over every session the student took (a continued or resumed training
        # too, like the passes beside it); a run from before the count existed shows its last session's wall time
        rec["train s"] = _train(r, "train_seconds" if not missing(r.get("train_train_seconds")) else "wall_seconds")
        recs.append(rec)
    return pd.DataFrame(recs)


def allocation_table(df: pd.DataFrame) -> pd.DataFrame | None:
    """Where each student trained: per label and student (the step counts one checkpoint serves; training seeds
    summed), the share of its gradient passes' inputs at each training time (``TrainInfo.student_timesteps``): how
    many distinct times, the share at the largest (t = T for a grid that starts there) and at the least-trained
    time. A shared multi-step student's grid draw (``methods.student.grid_weights``) shows as its share at t = T;
    a progressive student's counts include the rounds it continued. None when no row trained."""
    ok = df[df["status"] == "ok"] if "status" in df else df
    serves: dict[tuple, set] = {}  # (label, checkpoint) -> the step counts it served
    counts: dict[tuple, dict] = {}
    for r in ok.to_dict("records"):
        train = r.get("train")
        if isinstance(train, dict) and train.get("student_timesteps"):
            key = (r["label"], train.get("checkpoint"))
            serves.setdefault(key, set()).add(int(r["steps"]))
            counts[key] = train["student_timesteps"]
    if not counts:
        return None
    groups: dict[tuple, list] = {}
    for (label, ckpt), steps in serves.items():
        groups.setdefault((label, tuple(sorted(steps))), []).append(counts[(label, ckpt)])
    out = []
    for (label, steps), dicts in groups.items():
        total: dict[float, int] = {}
        for c in dicts:
            for t, n in c.items():
                total[float(t)] = total.get(float(t), 0) + int(n)
        n = sum(total.values())
        top, low = max(total), min(total, key=lambda t: (total[t], t))
        out.append({"method": label, "serves steps": ", ".join(map(str, steps)), "students": len(dicts),
                    "training times": len(total), "share at the largest t": f"{total[top] / n:.1%} (t = {top:g})",
                    "least-trained time": f"{total[low] / n:.1%} (t = {low:g})", "inputs": f"{n:,}"})
    return pd.DataFrame(out)


def gan_marked(r: dict) -> str:
    """A row's label, marked "(GAN inactive)" when its adversarial term did not learn (``gan_status``)."""
    status = r.get("gan")
    if missing(status) or status == "active":
        return r["label"]
    return f"{r['label']} (GAN {status})"


def _train(r: dict, key: str) -> str:
    v = r.get(f"train_{key}")
    return "—" if missing(v) or v == 0 else f"{v:,.0f}"


def table_b(agg: pd.DataFrame) -> pd.DataFrame | None:
    """Table B: each method relative to the teacher at 25 steps, in % (as the paper prints it)."""
    ref = reference_row(agg)
    if ref is None:
        return None
    recs = []
    for r in agg.to_dict("records"):
        if r["label"] == ref["label"] and r["nfe"] == ref["nfe"]:
            continue
        rec = {"method": r["label"], "steps": r["steps"], "NFE": r["nfe"]}
        for key, head in (("fid", "FID %"), ("clip_score", "CLIP %"), ("accuracy", "Acc %")):
            ok = r.get("status") == "ok" and r.get(key) is not None and ref.get(key)
            rec[head] = f"{100 * r[key] / ref[key]:.0f}%" if ok else ("failed" if r.get("status") != "ok" else "—")
        recs.append(rec)
    return pd.DataFrame(recs)


def latency_table(agg: pd.DataFrame) -> pd.DataFrame | None:
    """Per method and budget: latency at batch 1 by stage, throughput, peak memory (None without latency rows)."""
    if "latency_ms" not in agg or agg["latency_ms"].isna().all():
        return None
    cols = [k for k in LATENCY_COLUMNS if k in agg and agg[k].notna().any()]
    recs = []
    for r in agg.to_dict("records"):
        if missing(r.get("latency_ms")):
            continue
        recs.append({"method": r["label"], "steps": r["steps"], "NFE": r["nfe"],
                     **{SPECS[k].header: _cell(r, k, False) for k in cols}})
    return pd.DataFrame(recs)


def write_all(run: Path) -> None:
    run = Path(run)
    df, floor = load(run)
    agg = aggregate(df)
    tdir = run / "tables"
    disp = display_table(agg, floor)
    io.write_text(tdir / "main.md", disp.to_markdown(index=False) + "\n")
    lat = latency_table(agg)
    if lat is not None:
        io.write_text(tdir / "latency.md", lat.to_markdown(index=False) + "\n")
    io.write_text(tdir / "main.csv", agg.to_csv(index=False))
    more = [k for k in MORE_COLUMNS if k in agg and agg[k].notna().any()]
    if more:  # the metrics beside the main table's: distribution, diversity, preference, GenEval
        io.write_text(tdir / "metrics.md", display_table(agg, floor, columns=more, timing=False).to_markdown(index=False)
                      + "\n")
    io.write_text(tdir / "main.tex", display_table(agg, floor, with_ci=False).to_latex(index=False))
    alloc = allocation_table(df)
    if alloc is not None:  # where each student trained (issue 20: a shared student's draw over its grid times)
        io.write_text(tdir / "allocation.md", "Where each student trained: the share of its training inputs at each "
                      "timestep (`train.student_timesteps`, summed over training seeds).\n\n"
                      + alloc.to_markdown(index=False) + "\n")
    if not agg.empty and reference_row(agg) is not None:
        a, b = table_a(agg), table_b(agg)
        ref = reference_row(agg)
        io.write_text(tdir / "table_a.md", f"Reference for speedups: {ref['label']} at {ref['steps']} steps.\n\n"
                      + a.to_markdown(index=False) + "\n")
        io.write_text(tdir / "table_a.tex", a.to_latex(index=False))
        io.write_text(tdir / "table_b.md", f"Relative to {ref['label']} at {ref['steps']} steps (=100%).\n\n"
                      + b.to_markdown(index=False) + "\n")
        io.write_text(tdir / "table_b.tex", b.to_latex(index=False))
    if not agg.empty and (agg["status"] == "ok").any():
        plot_quality(agg, run / "plots")
        overview(agg, run / "grids", prompts=grid_prompts(run))
        claims.write(run, agg)
    curves.write(run, df)  # a suite with [curves]: curves.jsonl, plots/learning_curves.png, tables/curves.md


# --- plots and grids ----------------------------------------------------------------------------


def plot_quality(agg: pd.DataFrame, out: Path) -> None:
    """plots/quality_vs_nfe.png and quality_vs_latency.png: each plotted metric (with its CI) against NFE and latency,
    one series per method (its own colour, marker and line style); the legend below the panels, NFE ticks at the
    budgets measured."""
    plt = pyplot()
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    ok = agg[agg["status"] == "ok"]
    keys = [k for k in PLOTTED if k in ok]
    labels = list(dict.fromkeys(ok["label"]))
    for x, name, xlabel in (("nfe", "quality_vs_nfe", "NFE per image"),
                            ("latency_ms", "quality_vs_latency", "latency per image at batch 1 (ms)")):
        if x not in ok or not keys or ok[x].isna().all():
            continue
        fig, axes = plt.subplots(1, len(keys), figsize=(4.4 * len(keys), 3.6), squeeze=False)
        axes = list(axes[0])
        for ax, key in zip(axes, keys):
            for label, g in ok.groupby("label", sort=False):
                g = g.dropna(subset=[x, key]).sort_values(x)
                if g.empty:
                    continue
                yerr = None
                if f"{key}_ci_low" in g:
                    yerr = [(g[key] - g[f"{key}_ci_low"]).clip(lower=0), (g[f"{key}_ci_high"] - g[key]).clip(lower=0)]
                ax.errorbar(g[x], g[key], yerr=yerr, ms=4, capsize=2, label=label, lw=1.2,
                            **series_style(labels.index(label)))
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            if x == "nfe":  # ticks at the budgets measured, thinned so that their labels never touch
                ticks = sorted({int(v) for v in ok["nfe"].dropna()})
                kept = [t for i, t in enumerate(ticks) if i == 0 or t >= 1.35 * ticks[i - 1]]
                ax.xaxis.set_major_locator(FixedLocator(kept))
                ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.tick_params(axis="x", labelsize=8)
            ax.set_xlabel(xlabel)
            ax.set_title(SPECS[key].title)
            ax.grid(alpha=0.3)
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="lower center", ncol=min(len(names), 4), fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0.06 + 0.045 * ((len(names) - 1) // 4), 1, 1))
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(out / f"{name}.png")


def grid_prompts(run: Path) -> list[str] | None:
    """The texts of a run's prompts in order (its grids show the first ones), when its prompt set is a shipped set or
    a file that still reads the same (its sha256); None otherwise."""
    from prompts import load_prompts
    from prompts.loaders import prompts_sha256

    try:
        ident = json.loads((Path(run) / "config.json").read_text())["prompts"]
        prompts = load_prompts(ident["set"])
    except Exception:  # a drawn protocol, a moved file: the grid goes without its captions
        return None
    prompts = prompts[: ident.get("n", len(prompts))]
    return [p.text for p in prompts] if prompts_sha256(prompts) == ident.get("sha256") else None


def overview(agg: pd.DataFrame, grids: Path, nrow: int = 8, upscale: int = 4, size: int = 16,
             prompts: list[str] | None = None) -> None:
    """grids/overview.png: the first row of every cell's grid (the same prompts and seeds), a row per cell labelled
    with its method and NFE, each column headed by its prompt's text (`prompts`, when known)."""
    import textwrap

    import matplotlib.image as mpimg

    plt = pyplot()
    cells = [(r["label"], r["nfe"]) for r in agg.to_dict("records") if (grids / f"{r['label']}_nfe{r['nfe']}.png").exists()]
    if not cells:
        return
    h = 2 + size * upscale + 2
    head = 0.9 if prompts else 0.0  # inches of captions above the first row
    fig, axes = plt.subplots(len(cells), 1, figsize=(8, 0.95 * len(cells) + 0.3 + head), squeeze=False)
    for ax, (label, nfe) in zip(axes[:, 0], cells):
        img = mpimg.imread(grids / f"{label}_nfe{nfe}.png")[:h]
        ax.imshow(img, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f"{label}\nNFE {nfe}", rotation=0, ha="right", va="center", fontsize=7)
    if prompts:
        step = size * upscale + 2
        for j, text in enumerate(prompts[:nrow]):
            axes[0, 0].text(2 + j * step + step / 2, -3, textwrap.fill(text, 15), ha="center", va="bottom", fontsize=5)
    fig.tight_layout(rect=(0, 0, 1, 1 - head / (0.95 * len(cells) + 0.3 + head)))
    tmp = grids / ".overview.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(grids / "overview.png")
