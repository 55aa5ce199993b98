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
    baseline = "no-discriminator"      # optional: with rule "lowest-fid-beats-baseline"
    group_by = "method"                # optional: choose one candidate per method
    [base]                             # settings every candidate shares
    solver = "dpmsolver++"
    [candidates]                       # label -> settings (or [grid]: setting -> values, all combinations)
    "w=1" = { guidance_scale = 1.0 }
"""

from __future__ import annotations

import itertools
import math
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
    if raw.get("rule") == "lowest-fid-beats-baseline" and raw.get("baseline") not in raw.get("candidates", {}):
        raise UserError(f"{path.name}: rule lowest-fid-beats-baseline needs baseline = one of the candidates")
    return raw


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


def _per_candidate(agg: pd.DataFrame) -> pd.DataFrame:
    import pandas as pd

    """Per candidate: FID and CLIP means over the study's budgets, and the FID spread over training seeds."""
    ok = agg[agg["status"] == "ok"]
    rows = []
    for label, g in ok.groupby("label", sort=False):
        sd = g["fid_seed_sd"].mean() if "fid_seed_sd" in g else float("nan")
        gan = next(iter(g["gan"].dropna()), None) if "gan" in g else None  # the adversarial term's verdict, if any
        rows.append({"label": label, "method": g["method"].iloc[0], "fid": g["fid"].mean(), "fid_sd": sd,
                     "gan": gan,
                     "n": int(g["n_train_seeds"].max()) if "n_train_seeds" in g else 1,
                     "clip_score": g["clip_score"].mean(), "accuracy": g["accuracy"].mean()})
    return pd.DataFrame(rows)


def lowest_fid(table: pd.DataFrame, study: dict) -> tuple[str, str]:
    """The lowest mean FID over the budgets (and training seeds); ties broken by the higher CLIP score."""
    best = table.sort_values(["fid", "clip_score"], ascending=[True, False]).iloc[0]
    return best["label"], f"lowest mean FID ({best['fid']:.2f})"


def beats(a: pd.Series, b: pd.Series) -> bool:
    """a beats b: a's mean FID is lower than b's by more than one standard error of the difference
    (training-seed spreads; with one seed each, by more than nothing)."""
    se = math.sqrt(sum((r["fid_sd"] if not math.isnan(r["fid_sd"]) else 0.0) ** 2 / max(r["n"], 1) for r in (a, b)))
    return b["fid"] - a["fid"] > se


def lowest_fid_beats_baseline(table: pd.DataFrame, study: dict) -> tuple[str, str]:
    """The lowest-FID candidate other than the baseline, kept only if it beats the baseline (``beats``)."""
    base = table[table["label"] == study["baseline"]].iloc[0]
    label, _ = lowest_fid(table[table["label"] != study["baseline"]], study)
    best = table[table["label"] == label].iloc[0]
    if beats(best, base):
        return label, (f"{label} (FID {best['fid']:.2f} ± {best['fid_sd']:.2f}) beats the baseline "
                       f"{base['label']} ({base['fid']:.2f} ± {base['fid_sd']:.2f}) by more than one standard error")
    return base["label"], (f"the best other candidate, {label} (FID {best['fid']:.2f} ± {best['fid_sd']:.2f}), "
                           f"does not beat the baseline {base['label']} ({base['fid']:.2f} ± {base['fid_sd']:.2f}) "
                           "by more than one standard error")


RULES = {"lowest-fid": lowest_fid, "lowest-fid-beats-baseline": lowest_fid_beats_baseline}


def choose(run: Path, study: dict) -> dict:
    """Apply the study's rule to a finished run; writes choice.json and tables/study.md, returns the choice."""
    from bench.results import tables

    agg = tables.aggregate(tables.load(run)[0])
    table = _per_candidate(agg)
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
           "candidates": [{k: v for k, v in r.items() if not (k == "gan" and not isinstance(v, str))}
                          for r in table.to_dict("records")]}  # "gan" only where a candidate has the term
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
