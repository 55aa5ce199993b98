"""The paper's claims (METHODS.md (a)-(d)), decided by rules written here, from results alone.

Every verdict is "reproduced", "not reproduced" or "inconclusive" (or "not measured" when the run
lacks the rows). The rules are fixed in advance and use the bootstrap CIs stored with each number:

* compare(a, b): a is *significantly better* than b when their 95% intervals do not overlap and a's
  value is better; *significantly worse* the other way round; otherwise *tied*. A row measured
  once has the bootstrap CI of its sample; a row over several training seeds has the t-interval of
  the mean over those seeds (student-to-student spread, which the bootstrap CI does not see).
* within(student, teacher, tol): the student meets the bound teacher·(1±tol) by its point value
  ("pass"), misses it with its whole CI ("fail"), or neither ("unclear").
Thresholds: FID within 10% and CLIP within 3% of the 25-step teacher for claim (a).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from scipy import stats

from bench.results import curves, select
from bench.specs import SPECS, fmt
from core import io

FID_TOL = 0.10
CLIP_TOL = 0.03

REPRODUCED, NOT, INCONCLUSIVE, MISSING = "reproduced", "not reproduced", "inconclusive", "not measured"


def _ci(r: dict, m: str) -> tuple[float, float, float]:
    """(value, low, high): the 95% t-interval over training seeds when the row has several, else its CI."""
    sd, n = r.get(f"{m}_seed_sd"), r.get("n_train_seeds") or 0
    if sd is not None and not math.isnan(sd) and n >= 2:
        half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        return r[m], r[m] - half, r[m] + half
    return r[m], r.get(f"{m}_ci_low", r[m]), r.get(f"{m}_ci_high", r[m])


def compare(a: dict, b: dict, m: str) -> str:
    """'better' / 'worse' / 'tied' for a against b on metric m, by CI overlap."""
    va, la, ha = _ci(a, m)
    vb, lb, hb = _ci(b, m)
    lower = SPECS[m].lower_is_better
    if ha < lb:
        return "better" if lower else "worse"
    if la > hb:
        return "worse" if lower else "better"
    return "tied"


def _against_full(verdict: str) -> str:
    return "tied with full" if verdict == "tied" else f"{verdict} than full"


def within(student: dict, teacher: dict, m: str, tol: float) -> str:
    v, lo, hi = _ci(student, m)
    if SPECS[m].lower_is_better:
        bound = teacher[m] * (1 + tol)
        return "pass" if v <= bound else ("fail" if lo > bound else "unclear")
    bound = teacher[m] * (1 - tol)
    return "pass" if v >= bound else ("fail" if hi < bound else "unclear")


def _flash(df: pd.DataFrame, steps: int, variant: str = "full") -> dict | None:
    f = select.ok(df)
    f = f[(f["method"] == "imagine-flash") & (f["steps"] == steps)]
    if "variant" in f:
        f = f[f["variant"].fillna("full") == variant]
    return None if f.empty else f.iloc[0].to_dict()


def claim_a(df) -> dict:
    """(a) the student at 3 steps is within a few % of the teacher at 25 steps."""
    s, t = _flash(df, 3), select.teacher_row(df, 25)
    if s is None or t is None:
        return {"verdict": MISSING, "evidence": []}
    checks = {"fid": within(s, t, "fid", FID_TOL), "clip_score": within(s, t, "clip_score", CLIP_TOL)}
    verdict = REPRODUCED if all(v == "pass" for v in checks.values()) else (
        NOT if any(v == "fail" for v in checks.values()) else INCONCLUSIVE)
    ev = [f"Imagine Flash 3 steps FID {fmt(s, 'fid')} vs teacher 25 steps {fmt(t, 'fid')} "
          f"({100 * s['fid'] / t['fid']:.0f}%; bound ≤ {100 * (1 + FID_TOL):.0f}%): {checks['fid']}",
          f"CLIP {fmt(s, 'clip_score')} vs {fmt(t, 'clip_score')} "
          f"({100 * s['clip_score'] / t['clip_score']:.0f}%; bound ≥ {100 * (1 - CLIP_TOL):.0f}%): {checks['clip_score']}"]
    return {"verdict": verdict, "evidence": ev}


def claim_b(df) -> dict:
    """(b) Imagine Flash beats every baseline at equal steps (FID and CLIP)."""
    ok = select.ok(df)
    ev, outcomes = [], []
    for steps in sorted(ok[ok["method"] == "imagine-flash"]["steps"].unique()) if not ok.empty else []:
        s = _flash(ok, int(steps))
        if s is None:
            continue
        base = ok[(ok["steps"] == steps) & (ok["method"] != "imagine-flash")]
        for r in base.to_dict("records"):
            res = {m: compare(s, r, m) for m in ("fid", "clip_score")}
            outcomes.append(res)
            ev.append(f"{int(steps)} steps vs {r['label']}: FID {fmt(s, 'fid')} vs {fmt(r, 'fid')} → {res['fid']}; "
                      f"CLIP {fmt(s, 'clip_score')} vs {fmt(r, 'clip_score')} → {res['clip_score']}")
    if not outcomes:
        return {"verdict": MISSING, "evidence": ev}
    if any("worse" in o.values() for o in outcomes):
        verdict = NOT
    elif all(o["fid"] == "better" for o in outcomes):
        verdict = REPRODUCED
    else:
        verdict = INCONCLUSIVE
    return {"verdict": verdict, "evidence": ev}


def _gan(r: dict) -> str:
    """" (GAN inactive)" for a row whose adversarial term did not learn (see ``adversarial_notes``), else ""."""
    status = r.get("gan")
    return "" if not isinstance(status, str) or status == "active" else f" (GAN {status})"


def claim_c(df) -> dict:
    """(c) removing SRL or backward distillation hurts most, the discriminator less; noise correction
    mainly changes colour/contrast."""
    full = _flash(df, 3, "full")
    rows = {v: _flash(df, 3, v) for v in ("no-srl", "no-backward-distillation")}
    # the discriminator's and noise correction's rows: removed from a full method that has it, or added to one that
    # does not (full is the defaults, which the studies chose)
    no_disc, with_disc = _flash(df, 3, "no-discriminator"), _flash(df, 3, "with-discriminator")
    nc_variant = next((v for v in ("no-noise-correction", "with-noise-correction") if _flash(df, 3, v) is not None),
                      None)
    if full is None or any(r is None for r in rows.values()) or (no_disc is None and with_disc is None) \
            or nc_variant is None:
        return {"verdict": MISSING, "evidence": []}
    rows[nc_variant] = _flash(df, 3, nc_variant)
    if no_disc is not None:
        rows["no-discriminator"] = no_disc
    delta = {v: r["fid"] - full["fid"] for v, r in rows.items()}
    # what removing the discriminator costs in FID (from the configuration that has it)
    delta_disc = delta["no-discriminator"] if no_disc is not None else full["fid"] - with_disc["fid"]
    shown = {**rows, **({"with-discriminator": with_disc} if with_disc is not None else {})}
    ev = [f"FID full{_gan(full)} {fmt(full, 'fid')}; " + "; ".join(
        f"{v}{_gan(r)} {fmt(r, 'fid')} (Δ {r['fid'] - full['fid']:+.2f}, {_against_full(compare(r, full, 'fid'))})"
        for v, r in shown.items())]
    # c1: SRL and BD removals are significantly worse than full, and each hurts more than removing the discriminator
    big = [compare(rows[v], full, "fid") for v in ("no-srl", "no-backward-distillation")]
    order = all(delta[v] > delta_disc for v in ("no-srl", "no-backward-distillation"))
    c1 = REPRODUCED if all(b == "worse" for b in big) and order else (
        NOT if any(b == "better" for b in big) or not order else INCONCLUSIVE)
    # c2: noise correction: FID tied, colour statistics moved
    nc = rows[nc_variant]
    fid_tied = compare(nc, full, "fid") == "tied"
    colour_keys = ("saturation", "saturation_lowpass", "contrast")
    colour = {m: compare(full, nc, m) for m in colour_keys if m in full and m in nc}
    moved = any(v != "tied" for v in colour.values())
    c2 = REPRODUCED if fid_tied and moved else (NOT if not moved else INCONCLUSIVE)
    ev.append(f"c1 (SRL, backward distillation hurt most; discriminator less, Δ {delta_disc:+.2f} when removed): {c1}")
    ev.append(f"c2 noise correction: FID {'tied' if fid_tied else 'changed'}; "
              + ", ".join(f"{m} full {fmt(full, m)} vs {fmt(nc, m)} ({colour[m]})" for m in colour) + f": {c2}")
    verdict = c1 if c1 == c2 else (NOT if NOT in (c1, c2) else INCONCLUSIVE)
    return {"verdict": verdict, "evidence": ev}


def claim_d(df) -> dict:
    """(d) a few-step teacher (3 steps) is far worse than every distilled student at 3 steps."""
    t3 = select.teacher_row(df, 3)
    ok = select.ok(df)
    if t3 is None or ok.empty:
        return {"verdict": MISSING, "evidence": []}
    students = ok[(ok["steps"] == 3) & (ok["method"] != "teacher")]
    if "variant" in students:
        students = students[students["variant"].fillna("full") == "full"]
    if students.empty:
        return {"verdict": MISSING, "evidence": []}
    res = {r["label"]: compare(r, t3, "fid") for r in students.to_dict("records")}
    ev = [f"teacher 3 steps FID {fmt(t3, 'fid')}"] + [
        f"{r['label']} 3 steps FID {fmt(r, 'fid')}: {res[r['label']]}" for r in students.to_dict("records")]
    verdict = REPRODUCED if all(v == "better" for v in res.values()) else (
        NOT if any(v == "worse" for v in res.values()) else INCONCLUSIVE)
    return {"verdict": verdict, "evidence": ev}


CLAIMS = {
    "a": ("The student at 3 steps is within a few % of the teacher at 25 steps", claim_a),
    "b": ("It beats every baseline at equal steps", claim_b),
    "c": ("Removing SRL or backward distillation hurts most, the discriminator less; noise correction mainly "
          "changes colour/contrast", claim_c),
    "d": ("A few-step teacher (3 steps) is far worse than every distilled student", claim_d),
}


def adversarial_notes(agg: pd.DataFrame) -> list[str]:
    """One line per row with an adversarial term: whether it was active (its discriminator left chance, the rule of
    ``methods.student.AdversarialTerm.verdict``). A row whose term was inactive trained without a learned GAN signal,
    so its numbers say nothing about the adversarial term."""
    if "gan" not in agg:
        return []
    lines = []
    for r in agg.to_dict("records"):
        status = r.get("gan")
        if status is None or (isinstance(status, float) and math.isnan(status)):
            continue
        acc = r.get("gan_disc_acc")
        acc = "" if acc is None or math.isnan(acc) else f" (discriminator held-out accuracy {acc:.3f} at the end)"
        lines.append(f"{r['label']} at {r['steps']} steps: GAN {status}{acc}")
    return lines


def compute_points(agg: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """A learning-curves run's rows (``bench/results/curves.py``) as one table per compute point, each decided as a
    run of its own: "N updates" (every curve's point at the suite's N updates) and "equal compute" (per step count,
    each curve at its point of ``curves.equal_compute``: its best validation point within the compute of the last
    plateau).
    The untrained rows (the teacher) are in every table; a curve's rows take the curve's label, and are the
    method's full variant when the curve is named after the method (or marked ``variant = "full"``). {} for a run
    without curves."""
    if "curve" not in agg or agg["curve"].isna().all():
        return {}
    fixed = agg[agg["curve"].isna()]
    pts = agg[agg["curve"].notna()].copy()
    pts["updates"] = [curves.nominal_updates(label) for label in pts["label"]]  # the suite's count of the point
    pts["variant"] = [None if v == "full" or c == m else c for v, c, m in zip(pts["variant"], pts["curve"], pts["method"])]
    pts["label"] = pts["curve"]
    out = {f"{u} updates": pd.concat([fixed, pts[pts["updates"] == u]]) for u in sorted(pts["updates"].unique())}
    chosen = curves.equal_compute_updates([
        {"curve": r["curve"], "steps": int(r["steps"]), "updates": r["updates"], "nominal_updates": r["updates"],
         "network_passes": r["train_network_passes"], "fid": r.get("fid"), "fid_ci_high": r.get("fid_ci_high"),
         "fid_seed_sd": r.get("fid_seed_sd")} for r in pts.to_dict("records")])
    keep = [chosen.get((c, int(s))) == u for c, s, u in zip(pts["curve"], pts["steps"], pts["updates"])]
    out["equal compute"] = pd.concat([fixed, pts[keep]])
    return out


def by_compute(agg: pd.DataFrame) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The verdict of each claim at each compute point of a curves run (``compute_points``): markdown lines and
    {claim: {point: verdict}}; the last column is ``budget_dependence``."""
    points = compute_points(agg)
    if not points:
        return [], {}
    verdicts = {key: {name: fn(rows)["verdict"] for name, rows in points.items()} for key, (_, fn) in CLAIMS.items()}
    names = list(points)
    lines = ["## Verdicts at each compute point", "",
             "Each claim decided by the same rules on each point of the learning curves: every curve at the same "
             "number of updates, and at equal compute (`bench/results/curves.py`, `equal_compute`: per step count, "
             "every curve at its best validation point within the network passes of the last plateau). A claim "
             "*depends on the budget* when it is reproduced at some points and not at others; one that is "
             "inconclusive at some points is *decided at some budgets only*.", "",
             "| claim | " + " | ".join(names) + " | depends on the budget |",
             "|---|" + "---|" * len(names) + "---|"]
    for key, (text, _) in CLAIMS.items():
        lines.append(f"| ({key}) {text} | " + " | ".join(verdicts[key][n] for n in names)
                     + f" | {budget_dependence(verdicts[key])} |")
    return lines + [""], verdicts


def budget_dependence(verdicts: dict[str, str]) -> str:
    """Whether a claim's verdict depends on the training budget, from its verdicts at the compute points: "yes" when
    it is reproduced at some and not at others; "decided at some budgets only" when it is inconclusive at some and
    decided (one way) at the others; "no" when every measured point agrees; "not measured"."""
    measured = {v for v in verdicts.values() if v != MISSING}
    if not measured:
        return MISSING
    if {REPRODUCED, NOT} <= measured:
        return "yes"
    return "decided at some budgets only" if len(measured) > 1 else "no"


def report(agg: pd.DataFrame, title: str) -> tuple[str, dict]:
    """The claims report of a run: each claim's verdict and evidence; for a curves run, decided at equal compute,
    then the verdict at every compute point (``by_compute``), then the adversarial terms' status."""
    verdicts = {}
    points = compute_points(agg)
    decided = points.get("equal compute", agg)
    lines = [f"# Claims report: {title}", "",
             "Generated from this run's results by `bench/results/claims.py` (rules in its docstring); "
             "nothing here is typed by hand.", ""]
    if points:
        lines += ["A learning-curves run: the evidence below is at equal compute; every compute point follows.", ""]
    for key, (text, fn) in CLAIMS.items():
        res = fn(decided)
        verdicts[key] = res["verdict"]
        lines.append(f"## ({key}) {text}: **{res['verdict']}**")
        lines += [f"- {e}" for e in res["evidence"]] or ["- (the rows this claim needs are not in this run)"]
        lines.append("")
    lines += by_compute(agg)[0]
    notes = adversarial_notes(agg)
    if notes:
        lines += ["## Adversarial terms", "",
                  "A GAN term is *inactive* when its discriminator's held-out accuracy over the last updates does not "
                  "leave chance (95% interval not above 0.5); such a row trained without a learned adversarial signal.",
                  ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines), verdicts


def write(run: Path, agg: pd.DataFrame) -> dict:
    """tables/claims.md of a run (and, for a curves run, tables/claims_by_compute.md: ``by_compute``'s table, which
    the README cites); returns {claim: verdict}."""
    text, verdicts = report(agg, Path(run).name)
    io.write_text(Path(run) / "tables" / "claims.md", text)
    lines, _ = by_compute(agg)
    if lines:
        io.write_text(Path(run) / "tables" / "claims_by_compute.md", "\n".join(lines))
    return verdicts
