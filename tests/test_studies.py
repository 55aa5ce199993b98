"""Defaults are chosen by a rule written in code, on validation prompts: the rules, a study end to end,
and every committed study's choice against the defaults in the code."""

import json
import math

import pandas as pd
import pytest

from bench import study
from core.errors import UserError
from methods import base
from tests.conftest import ROOT
from tests.test_cli import flashbench

REF = ROOT / "results" / "reference"


def _table(rows):
    return pd.DataFrame([{"method": "m", "clip_score": 90.0, "accuracy": 1.0, "n": 3, **r} for r in rows])


def test_lowest_fid_breaks_ties_by_clip():
    t = _table([{"label": "a", "fid": 2.0, "fid_sd": 0.1, "clip_score": 90.0},
                {"label": "b", "fid": 2.0, "fid_sd": 0.1, "clip_score": 91.0},
                {"label": "c", "fid": 3.0, "fid_sd": 0.1}])
    assert study.lowest_fid(t, {})[0] == "b"


@pytest.mark.parametrize(("challenger", "sd", "kept"), [(4.0, 0.5, "adv"),  # 1.0 lower, se 0.41: beats
                                                        (4.6, 0.5, "base"),  # 0.4 lower, se 0.41: does not
                                                        (6.0, 0.1, "base")])  # worse
def test_a_candidate_is_kept_only_if_it_beats_the_baseline(challenger, sd, kept):
    t = _table([{"label": "base", "fid": 5.0, "fid_sd": 0.5}, {"label": "adv", "fid": challenger, "fid_sd": sd}])
    assert study.lowest_fid_beats_baseline(t, {"baseline": "base"})[0] == kept
    assert study.beats(t.iloc[1], t.iloc[0]) == (kept == "adv")
    assert math.isclose(math.sqrt(0.5**2 / 3 + sd**2 / 3), math.sqrt(0.25 / 3 + sd**2 / 3))


def test_a_challenger_lower_in_every_training_seed_beats_the_baseline_paired_whatever_the_seeds_spread():
    """The noise-correction study's shape: both candidates sample the same three students, whose FIDs differ by
    about 3 between seeds while the challenger is 0.5-0.8 lower in each. Paired by seed that is a difference
    several standard errors wide; compared through the two spreads (as if the students were independent) it is
    not. Without two shared seeds the comparison stays unpaired."""
    base = {"label": "on", "fid": 13.30, "fid_sd": 2.27, "fid_by_seed": {0: 15.0, 1: 12.4, 2: 12.5}}
    off = {"label": "off", "fid": 12.64, "fid_sd": 2.06, "fid_by_seed": {0: 14.2, 1: 11.8, 2: 11.9}}
    t = _table([base, off])
    diff, se, paired = study.difference(t.iloc[1], t.iloc[0])
    assert paired and math.isclose(diff, 2 / 3, rel_tol=1e-9) and se < 0.1
    assert study.beats(t.iloc[1], t.iloc[0]) and study.lowest_fid_beats_baseline(t, {"baseline": "on"})[0] == "off"
    assert "paired by training seed" in study.lowest_fid_beats_baseline(t, {"baseline": "on"})[1]
    unpaired = _table([{k: v for k, v in r.items() if k != "fid_by_seed"} for r in (base, off)])
    assert not study.difference(unpaired.iloc[1], unpaired.iloc[0])[2]
    assert not study.beats(unpaired.iloc[1], unpaired.iloc[0])
    one_shared = _table([base, {**off, "fid_by_seed": {0: 14.2, 7: 11.8}}])
    assert not study.difference(one_shared.iloc[1], one_shared.iloc[0])[2]


def test_a_baseline_per_method_is_each_groups_incumbent(tmp_path):
    """group_by = "method" with a list of baselines (lr-confirm): each method's pick is kept only if it beats that
    method's own incumbent; the list must name one candidate per method, and a list needs group_by."""
    t = _table([{"label": "a old", "method": "a", "fid": 5.0, "fid_sd": 0.5, "fid_by_seed": {0: 5.5, 1: 4.5}},
                {"label": "a new", "method": "a", "fid": 4.0, "fid_sd": 0.5, "fid_by_seed": {0: 4.5, 1: 3.5}},
                {"label": "b old", "method": "b", "fid": 5.0, "fid_sd": 0.5, "fid_by_seed": {0: 5.5, 1: 4.5}},
                {"label": "b new", "method": "b", "fid": 4.9, "fid_sd": 0.5, "fid_by_seed": {0: 4.0, 1: 5.8}}])
    st = {"baseline": ["a old", "b old"], "group_by": "method"}
    assert study.lowest_fid_beats_baseline(t[t["method"] == "a"], st)[0] == "a new"  # 1.0 lower in both seeds
    assert study.lowest_fid_beats_baseline(t[t["method"] == "b"], st)[0] == "b old"  # 0.1 lower, se 0.9

    def load(extra: str):
        (tmp_path / "s.toml").write_text('name = "s"\nsteps = [1]\nrule = "lowest-fid-beats-baseline"\n' + extra +
                                         '[candidates]\n"a1" = { name = "lcm", lr = 1e-4 }\n'
                                         '"a2" = { name = "lcm", lr = 2e-4 }\n"b1" = { name = "add", lr = 1e-4 }\n')
        return study.load(str(tmp_path / "s.toml"))

    assert study.baselines(load('group_by = "method"\nbaseline = ["a1", "b1"]\n')) == ["a1", "b1"]
    with pytest.raises(UserError, match="exactly one baseline per method; add has 0"):
        load('group_by = "method"\nbaseline = ["a1"]\n')
    with pytest.raises(UserError, match="exactly one baseline per method; lcm has 2"):
        load('group_by = "method"\nbaseline = ["a1", "a2", "b1"]\n')
    with pytest.raises(UserError, match="needs group_by"):
        load('baseline = ["a1", "b1"]\n')
    with pytest.raises(UserError, match="needs baseline = one of the candidates"):
        load('baseline = "zz"\n')


def test_studies_never_choose_on_evaluation_prompts():
    s = {**study.load("teacher-guidance"), "prompts": "shapes-eval"}
    with pytest.raises(UserError, match="never chosen on the evaluation prompts"):
        study.build_suite(s)
    for name in study.available():  # every shipped study builds and validates
        st = study.load(name)
        suite = study.build_suite(st)
        assert suite.prompts == "shapes-val" and {e.label for e in suite.entries} == set(study.candidates(st))


def test_a_study_end_to_end(tmp_path):
    (tmp_path / "s.toml").write_text("""
name = "tiny-guidance"
description = "two guidance scales"
method = "teacher"
steps = [1]
samples = 12
rule = "lowest-fid"
[base]
solver = "ddim"
[grid]
guidance_scale = [1.0, 3.0]
""")
    r = flashbench("study", tmp_path / "s.toml", "--out", tmp_path / "run", "--cache", tmp_path / "cache",
                   "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    choice = json.loads((tmp_path / "run" / study.CHOICE_FILE).read_text())
    assert choice["chosen"]["all"]["label"] in ("guidance_scale=1", "guidance_scale=3")
    rows = {c["label"]: c["fid"] for c in choice["candidates"]}
    assert choice["chosen"]["all"]["label"] == min(rows, key=rows.get)
    assert "(chosen)" in (tmp_path / "run" / "tables" / "study.md").read_text()


COMMITTED = sorted(REF.glob("study-*/" + study.CHOICE_FILE))


@pytest.mark.skipif(not COMMITTED, reason="no committed study results")
@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.parent.name)
def test_defaults_are_the_committed_studies_choices(path):
    """A default in the code is what its study chose (update both together: rerun the study). Where two committed
    studies choose the same setting of a method, the one started last governs (Imagine Flash's rho: the srl grid,
    the adversarial-srl study and the srl confirmation)."""
    choice = json.loads(path.read_text())
    backbone = study.load(choice["study"]).get("backbone")
    if backbone is not None:  # a choice for another teacher: every shipped suite on that teacher uses it
        _suites_on_the_teacher_use(backbone, choice)
        return
    for c in choice["chosen"].values():
        defaults = base.get(c["method"]).make_config({})
        for key, value in c["settings"].items():
            if key in ("shared_student", "max_steps"):  # the budget the study compared at, not a choice
                continue
            if _superseded(path, c["method"], key):
                continue
            assert getattr(defaults, key) == value, (path.parent.name, c["method"], key, getattr(defaults, key), value)


def _started(path) -> str:
    return json.loads((path.parent / "config.json").read_text())["started"]


def _superseded(path, method: str, key: str) -> bool:
    """Whether a committed study started after `path`'s also chose `key` for `method`."""
    return any(_started(other) > _started(path) and any(
        c["method"] == method and key in c["settings"] for c in json.loads(other.read_text())["chosen"].values())
        for other in COMMITTED if other != path)


@pytest.mark.parametrize(("method", "key", "study_name"), [("imagine-flash", "rho", "imagine-flash-srl-confirm"),
                                                            ("imagine-flash", "teacher_steps", "imagine-flash-srl-confirm"),
                                                            ("imagine-flash", "adversarial", "imagine-flash-adversarial"),
                                                            ("imagine-flash", "lr", "lr-confirm"),
                                                            ("add", "lr", "lr-confirm")])
def test_a_setting_several_studies_chose_is_checked_against_the_latest_only(method, key, study_name):
    """Some settings were chosen by several committed studies: Imagine Flash's SRL settings (the rho x k grid, the
    adversarial x rho study, the confirmation of the grid's re-run pick with more seeds), its adversarial design, and
    Imagine Flash's and ADD's learning rates (the lr sweep, then the confirmation of its re-run's picks against the
    incumbents). Exactly one governs each setting, the one run last, which is the one the docs name."""
    choosers = [p for p in COMMITTED if any(c["method"] == method and key in c["settings"]
                                            for c in json.loads(p.read_text())["chosen"].values())]
    if len(choosers) < 2:
        pytest.skip(f"one committed study chooses {method}'s {key}")
    governing = [p.parent.name for p in choosers if not _superseded(p, method, key)]
    assert governing == [f"study-{study_name}"]


def _suites_on_the_teacher_use(backbone: dict, choice: dict) -> None:
    from bench import suite as suite_mod

    suites = [suite_mod.load(p.stem) for p in suite_mod.SUITES_DIR.glob("*.toml")]
    on = [s for s in suites if s.backbone == {"kind": "shapes", **backbone} or s.backbone == backbone]
    assert on, f"no shipped suite runs on {backbone}"
    for s in on:
        for c in choice["chosen"].values():
            for key, value in c["settings"].items():
                for e in s.entries:
                    if not hasattr(e.config, key):
                        continue
                    if e.name == "teacher" and getattr(e.config, "guidance", "cfg") == "none" and value == 1.0:
                        continue  # CFG at w = 1 is the conditional prediction, which guidance = "none" runs (1 NFE)
                    assert getattr(e.config, key) == value, (s.name, e.label, key, getattr(e.config, key), value)


def test_a_study_table_says_whether_each_candidates_gan_term_learned():
    t = _table([{"label": "base", "fid": 5.0, "fid_sd": 0.5, "gan": None},
                {"label": "adv", "fid": 4.9, "fid_sd": 0.5, "gan": "inactive"}])
    choice = {"rule": "lowest-fid-beats-baseline", "rule_doc": "doc",
              "chosen": {"all": {"label": "base", "settings": {}, "why": "w"}}}
    text = study.report(t, choice, {"name": "s", "steps": [3]})
    assert "| GAN term |" in text and "| adv | m | 4.90 ± 0.50 | 90.00 | 1.000 | inactive |" in text
    assert "| base **(chosen)** | m | 5.00 ± 0.50 | 90.00 | 1.000 | — |" in text
    plain = study.report(t.drop(columns="gan"), choice, {"name": "s", "steps": [3]})
    assert "GAN" not in plain
