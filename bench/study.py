"""Studies: how the bench's defaults are chosen, by a rule written here, on validation prompts.

A study (``bench/studies/NAME.toml``) names candidate settings of one or more methods, the budget
they are compared at, the training seeds, and a rule. ``flashbench study NAME`` runs the candidates
on the *validation* prompts (``shapes-val``; never the evaluation prompts the tables report) through
the ordinary runner, then applies the rule to the aggregated rows and writes
``choice.json`` and ``tables/study.md`` into the run. The chosen values are the defaults in the
methods' Config classes; ``tests/test_studies.py`` checks every committed study against them.

    name = "teacher-guidance"
    description = "..."
    method = "teacher"                 # the method of every candidate (or name = ... per candidate)
    steps = [25]                       # the budgets the candidates are compared at (mean over them)
    train_seeds = [0, 1, 2]            # trained methods: one student per seed (mean over seeds)
    samples = 500
    rule = "lowest-fid"                # a key of RULES
    baseline = "no-discriminator"      # optional: with rule "lowest-fid-beats-baseline" (with group_by = "method",
                                       # a list: each method's incumbent)
    group_by = "method"                # optional: choose one candidate per method
    [base]                             # settings every candidate shares
    solver = "dpmsolver++"
    [candidates]                       # label -> settings (or [grid]: setting -> values, all combinations)
    "w=1" = { guidance_scale = 1.0 }
"""

from __future__ import annotations

import itertools
import math
import statistics
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

from bench import suite as suite_mod
from core import io
from core.errors import UserError, unknown

if TYPE_CHECKING:  # pandas and the tables load only where a study's results are read (not for `list`)
    import pandas as pd

STUDIES_DIR = Path(__file__).parent / "studies"
STUDY_KEYS = {"name", "description", "method", "steps", "train_seeds", "samples", "rule", "baseline", "group_by",
              "base", "candidates", "grid", "prompts", "backbone"}
CHOICE_FILE = "choice.json"


def available() -> dict[str, Path]:
    return {p.stem: p for p in sorted(STUDIES_DIR.glob("*.toml"))}


def load(name: str) -> dict:
    """A study by name (bench/studies/NAME.toml) or path; UserError naming what is wrong."""
    studies = available()
    path = studies.get(name) or (Path(name) if name.endswith(".toml") and Path(name).is_file() else None)
    if path is None:
        raise unknown("study", name, studies)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path.name}: invalid TOML ({e})") from None
    for key in raw:
        if key not in STUDY_KEYS:
            raise unknown(f"key in {path.name}", key, STUDY_KEYS)
    if raw.get("rule", "lowest-fid") not in RULES:
        raise unknown(f"rule in {path.name}", raw.get("rule"), RULES)
    if ("candidates" in raw) == ("grid" in raw):
        raise UserError(f"{path.name}: give exactly one of [candidates] or [grid]")
    if raw.get("rule") == "lowest-fid-beats-baseline":
        _check_baselines(raw, path.name)
    return raw


def baselines(study: dict) -> list[str]:
    """The study's baseline labels: one (``baseline = "label"``) or, with ``group_by = "method"``, one per method."""
    b = study.get("baseline")
    return [b] if isinstance(b, str) else list(b) if isinstance(b, list) else []


def _check_baselines(raw: dict, name: str) -> None:
    """rule lowest-fid-beats-baseline: every baseline is a candidate and, grouped by method, each method has exactly
    one; UserError naming what is wrong."""
    cands = raw.get("candidates", {})
    labels = baselines(raw)
    if not labels or any(label not in cands for label in labels):
        raise UserError(f"{name}: rule lowest-fid-beats-baseline needs baseline = one of the candidates "
                        f"(or, with group_by = \"method\", a list of one per method)")
    if raw.get("group_by") == "method":
        method = {k: v.get("name", raw.get("method")) for k, v in cands.items()}
        for m in dict.fromkeys(method.values()):
            n = sum(method[label] == m for label in labels)
            if n != 1:
                raise UserError(f"{name}: group_by = \"method\" needs exactly one baseline per method; "
                                f"{m} has {n}")
    elif len(labels) != 1:
        raise UserError(f"{name}: one baseline label (a list needs group_by = \"method\")")


def candidates(study: dict) -> dict[str, dict]:
    """label -> settings (without the shared base), from [candidates] or the product of [grid]."""
    if "candidates" in study:
        return {str(k): dict(v) for k, v in study["candidates"].items()}
    keys = list(study["grid"])
    out = {}
    for values in itertools.product(*(study["grid"][k] for k in keys)):
        out[",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in zip(keys, values))] = \
            dict(zip(keys, values))
    return out


def build_suite(study: dict, samples: int | None = None, train_seeds: list[int] | None = None) -> suite_mod.Suite:
    """The suite that runs every candidate at the study's budgets (validated like any suite)."""
    methods = []
    for label, settings in candidates(study).items():
        settings = dict(settings)
        name = settings.pop("name", study.get("method"))
        methods.append({"name": name, "label": label, "variant": label, "steps": list(study["steps"]),
                        "settings": {**study.get("base", {}), **settings}})
    raw = {"name": study["name"], "description": study.get("description", ""),
           "prompts": study.get("prompts", "shapes-val"), "samples": samples or study.get("samples", 500),
           "metrics": ["fid", "clip_score", "accuracy"], "methods": methods}
    if "backbone" in study:  # e.g. { kind = "shapes", teacher = "flow" }: a default for that teacher
        raw["backbone"] = study["backbone"]
    seeds = train_seeds if train_seeds is not None else study.get("train_seeds")
    if seeds is not None:
        raw["train_seeds"] = seeds
    if raw["prompts"] == "shapes-eval":
        raise UserError(f"study {study['name']}: defaults are never chosen on the evaluation prompts; use shapes-val")
    return suite_mod.parse(raw, f"study {study['name']}")


# --- rules ------------------------------------------------------------------------------------------


def _per_candidate(agg: pd.DataFrame, rows_df: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per candidate: FID and CLIP means over the study's budgets, the FID spread over training seeds, and (from the
    run's rows, `rows_df`) ``fid_by_seed``: {training seed: mean FID over the budgets}, which ``beats`` pairs."""
    import pandas as pd

    ok = agg[agg["status"] == "ok"]
    by_seed: dict[str, dict[int, float]] = {}
    if rows_df is not None and "train_seed" in rows_df and rows_df["train_seed"].notna().any():
        good = rows_df[(rows_df["status"] == "ok") & rows_df["train_seed"].notna()]
        for (label, seed), g in good.groupby(["label", "train_seed"], sort=False):
            by_seed.setdefault(label, {})[int(seed)] = float(g["fid"].mean())
    rows = []
    for label, g in ok.groupby("label", sort=False):
        sd = g["fid_seed_sd"].mean() if "fid_seed_sd" in g else float("nan")
        gan = next(iter(g["gan"].dropna()), None) if "gan" in g else None  # the adversarial term's verdict, if any
        rows.append({"label": label, "method": g["method"].iloc[0], "fid": g["fid"].mean(), "fid_sd": sd,
                     "gan": gan, "fid_by_seed": by_seed.get(label),
                     "n": int(g["n_train_seeds"].max()) if "n_train_seeds" in g else 1,
                     "clip_score": g["clip_score"].mean(), "accuracy": g["accuracy"].mean()})
    return pd.DataFrame(rows)


def lowest_fid(table: pd.DataFrame, study: dict) -> tuple[str, str]:
    """The lowest mean FID over the budgets (and training seeds); ties broken by the higher CLIP score."""
    best = table.sort_values(["fid", "clip_score"], ascending=[True, False]).iloc[0]
    return best["label"], f"lowest mean FID ({best['fid']:.2f})"


def difference(a: pd.Series, b: pd.Series) -> tuple[float, float, bool]:
    """(how much lower a's FID is than b's, its standard error, whether paired). Paired by training seed where both
    candidates were measured on the same two or more seeds (``fid_by_seed``): the mean of the per-seed differences
    and its standard error (sample SD / sqrt(n)), the paired comparison of a design where each seed's students share
    their initialisation and data order, and a sampling setting's candidates sample the very same students.
    Otherwise unpaired: the difference of the means and sqrt(sd_a²/n_a + sd_b²/n_b) from the training-seed spreads
    (0 with one seed each)."""
    pa, pb = a.get("fid_by_seed"), b.get("fid_by_seed")
    common = sorted(set(pa) & set(pb)) if isinstance(pa, dict) and isinstance(pb, dict) else []
    if len(common) >= 2:
        d = [pb[k] - pa[k] for k in common]
        return statistics.mean(d), statistics.stdev(d) / math.sqrt(len(d)), True
    se = math.sqrt(sum((r["fid_sd"] if not math.isnan(r["fid_sd"]) else 0.0) ** 2 / max(r["n"], 1) for r in (a, b)))
    return b["fid"] - a["fid"], se, False


def beats(a: pd.Series, b: pd.Series) -> bool:
    """a beats b: a's FID is lower than b's by more than one standard error of the difference (``difference``:
    paired by training seed where both share two or more seeds; with one seed each, by more than nothing)."""
    diff, se, _ = difference(a, b)
    return diff > se


def lowest_fid_beats_baseline(table: pd.DataFrame, study: dict) -> tuple[str, str]:
    """The lowest-FID candidate other than the baseline, kept only if it beats the baseline (``beats``)."""
    base = table[table["label"].isin(baselines(study))].iloc[0]  # the group's one baseline (load checks it)
    label, _ = lowest_fid(table[table["label"] != base["label"]], study)
    best = table[table["label"] == label].iloc[0]
    diff, se, paired = difference(best, base)
    by = (f"by more than one standard error ({'paired by training seed: ' if paired else ''}"
          f"{diff:.2f} lower, standard error {se:.2f})")
    if beats(best, base):
        return label, (f"{label} (FID {best['fid']:.2f} ± {best['fid_sd']:.2f}) beats the baseline "
                       f"{base['label']} ({base['fid']:.2f} ± {base['fid_sd']:.2f}) {by}")
    return base["label"], (f"the best other candidate, {label} (FID {best['fid']:.2f} ± {best['fid_sd']:.2f}), "
                           f"does not beat the baseline {base['label']} ({base['fid']:.2f} ± {base['fid_sd']:.2f}) "
                           f"{by}")


RULES = {"lowest-fid": lowest_fid, "lowest-fid-beats-baseline": lowest_fid_beats_baseline}


# candidate fields written to choice.json only where a candidate has them: the GAN verdict (a candidate with the
# term) and the per-seed FIDs (a run with training seeds)
_ONLY_WHEN = {"gan": str, "fid_by_seed": dict}


def choose(run: Path, study: dict) -> dict:
    """Apply the study's rule to a finished run; writes choice.json and tables/study.md, returns the choice."""
    from bench.results import tables

    rows_df = tables.load(run)[0]
    table = _per_candidate(tables.aggregate(rows_df), rows_df)
    if table.empty:
        raise UserError(f"{run}: no finished candidate rows; nothing to choose from")
    cands = candidates(study)
    groups = [("all", table)] if study.get("group_by") != "method" else list(table.groupby("method", sort=False))
    rule = study.get("rule", "lowest-fid")
    chosen = {}
    for group, t in groups:
        label, why = RULES[rule](t, study)
        settings = {k: v for k, v in cands[label].items() if k != "name"}
        chosen[group] = {"label": label, "method": t[t["label"] == label]["method"].iloc[0], "settings": settings,
                         "why": why}
    out = {"study": study["name"], "rule": rule, "rule_doc": RULES[rule].__doc__, "base": study.get("base", {}),
           "steps": study["steps"], "chosen": chosen,
           "candidates": [{k: v for k, v in r.items() if k not in _ONLY_WHEN or isinstance(v, _ONLY_WHEN[k])}
                          for r in table.to_dict("records")]}
    io.write_json(Path(run) / CHOICE_FILE, out)
    io.write_text(Path(run) / "tables" / "study.md", report(table, out, study))
    return out


def report(table: pd.DataFrame, choice: dict, study: dict) -> str:
    chosen = {c["label"] for c in choice["chosen"].values()}
    steps = ", ".join(map(str, study["steps"]))
    # the GAN column (``tables.gan_status``: whether each candidate's discriminator left chance) when any has one
    gan = "gan" in table and table["gan"].notna().any()
    lines = [f"# Study: {study['name']}", "", study.get("description", ""), "",
             f"Validation prompts; budgets: {steps} steps; mean over them and over the training seeds "
             f"(± the spread over training seeds). Rule: `{choice['rule']}` — {choice['rule_doc'].strip()}", "",
             "| candidate | method | FID ↓ | CLIP ↑ | Acc ↑ |" + (" GAN term |" if gan else ""),
             "|---|---|---|---|---|" + ("---|" if gan else "")]
    for r in table.to_dict("records"):
        sd = "" if math.isnan(r["fid_sd"]) else f" ± {r['fid_sd']:.2f}"
        mark = " **(chosen)**" if r["label"] in chosen else ""
        lines.append(f"| {r['label']}{mark} | {r['method']} | {r['fid']:.2f}{sd} | {r['clip_score']:.2f} | "
                     f"{r['accuracy']:.3f} |" + (f" {r['gan'] if isinstance(r.get('gan'), str) else '—'} |" if gan else ""))
    lines.append("")
    for group, c in choice["chosen"].items():
        prefix = "" if group == "all" else f"{group}: "
        lines.append(f"- {prefix}chosen **{c['label']}** ({c['settings']}): {c['why']}.")
    return "\n".join(lines) + "\n"
