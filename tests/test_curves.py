"""Issue 20: where shared students train (the grid draw), training that continues a cached shorter training,
and learning curves (snapshots on validation prompts, a plateau rule, an equal-compute comparison)."""

import pytest
import torch

from methods import base
from methods.student import draw_grid, grid_shares, grid_weights


def _grid(k):  # trailing grids as the VP schedule makes them
    return [999, 499][:k] if k <= 2 else {3: [999, 666, 332], 4: [999, 749, 499, 249]}[k]


def test_the_grid_draw_rules_give_the_shares_they_state():
    steps = grid_shares(4, "steps", _grid)
    assert steps[999] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)  # 52%: the audit's figure
    assert steps[749] == pytest.approx(1 / 16) and steps[666] == pytest.approx(1 / 12)
    pairs = grid_shares(4, "pairs", _grid)
    assert pairs[999] == pytest.approx(2 / 5)  # in each of the 4 grids: 4 of the 10 (steps, index) pairs
    assert pairs[499] == pytest.approx(2 / 10) and pairs[249] == pytest.approx(1 / 10)
    assert sum(pairs.values()) == pytest.approx(1) and sum(steps.values()) == pytest.approx(1)
    assert grid_weights(4, "pairs").tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="grid_draw"):
        grid_weights(4, "even")


@pytest.mark.parametrize("rule", ["steps", "pairs"])
def test_draw_grid_matches_its_rule_empirically(rule):
    g = torch.Generator().manual_seed(0)
    counts: dict = {}
    n_updates, batch = 20000, 2
    for _ in range(n_updates):
        k, i = draw_grid(4, batch, g, rule)
        for j in i.tolist():
            counts[(k, j)] = counts.get((k, j), 0) + 1
    share = {p: c / (n_updates * batch) for p, c in counts.items()}
    weights = grid_weights(4, rule).tolist()
    for (k, j), s in share.items():
        assert s == pytest.approx(weights[k - 1] / k, abs=0.012), (k, j)


def test_the_default_draw_is_the_one_the_bench_had():
    """"steps" consumes the generator exactly as the code before the rule: the default students are unchanged."""
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    k, i = draw_grid(4, 8, a, "steps")
    k0 = int(torch.randint(1, 5, (1,), generator=b))
    assert k == k0 and torch.equal(i, torch.randint(0, k0, (8,), generator=b))


def test_a_shared_student_trains_where_its_draw_rule_says(tiny, tmp_path):
    """The timesteps of the student's gradient passes, counted in training, follow grid_shares (many tiny updates)."""
    cls = base.get("imagine-flash")
    settings = {"student_updates": 30, "batch_size": 4, "max_steps": 3, "shared_student": True, "grid_draw": "pairs"}
    m = cls(tiny, cls.make_config(settings), base.Context(tmp_path, progress=False))
    info = m.prepare(3)
    counted = {int(t): n for t, n in info.student_timesteps.items()}
    total = sum(counted.values())
    assert total == 30 * 4  # one gradient pass per training sample
    expected = grid_shares(3, "pairs", tiny.schedule.grid)
    assert set(counted) == set(expected)
    for t, share in expected.items():  # the step count is one draw per update: 30 draws, a loose tolerance
        assert counted[t] / total == pytest.approx(share, abs=0.15), (t, counted[t] / total, share)


@pytest.mark.parametrize("name", ["imagine-flash", "dmd2"])
@pytest.mark.parametrize("rule", ["steps", "pairs"])
def test_shared_students_draw_their_grid_by_the_configured_rule(tiny, tmp_path, monkeypatch, name, rule):
    import importlib

    module = importlib.import_module(base.get(name).__module__)
    seen = []
    real = module.draw_grid
    monkeypatch.setattr(module, "draw_grid", lambda *a: seen.append(a[3]) or real(*a))
    cls = base.get(name)
    settings = {**cls.smoke_settings(), "student_updates": 1, "shared_student": True, "grid_draw": rule}
    cls(tiny, cls.make_config(settings), base.Context(tmp_path, progress=False)).prepare(2)
    assert seen and set(seen) == {rule}


@pytest.mark.parametrize("name", ["imagine-flash", "dmd2", "lcm"])
def test_a_longer_training_continues_the_kept_state_of_a_shorter_one(tiny, tmp_path, name):
    """With keep_state, the 3-update student continues the cached 2-update training and ends where a fresh 3-update
    training ends: the same weights, the same counted passes and training timesteps."""
    cls = base.get(name)
    smoke = cls.smoke_settings()

    def make(updates, cache, keep):
        cfg = cls.make_config({**smoke, "student_updates": updates})
        return cls(tiny, cfg, base.Context(cache, progress=False, keep_state=keep))

    steps = cls.smoke_steps(cls.make_config(smoke))[-1]
    short = make(2, tmp_path / "curve", True)
    assert short.prefix_stable()
    short.prepare(steps)
    long = make(3, tmp_path / "curve", True)
    assert long.continuation(steps)[0] == 2
    info = long.prepare(steps)
    fresh = make(3, tmp_path / "fresh", False)
    ref = fresh.prepare(steps)
    assert info.continued_from == 2 and ref.continued_from is None
    assert info.student_updates == ref.student_updates == 3
    assert info.passes == ref.passes and info.student_timesteps == ref.student_timesteps
    for a, b in zip(long.student_net(steps).parameters(), fresh.student_net(steps).parameters()):
        assert torch.equal(a, b)
    assert not list((tmp_path / "fresh").glob("*.state.safetensors"))  # nothing kept without keep_state
    assert long.cache_stem(steps).endswith("-3u") and short.cache_stem(steps).endswith("-2u")
    assert long.cache_stem(steps)[:-2] == short.cache_stem(steps)[:-2]  # one lineage


def test_trainings_with_schedules_over_their_total_never_continue(tiny, tmp_path):
    prog = base.get("progressive")
    m = prog(tiny, prog.make_config(prog.smoke_settings()), base.Context(tmp_path, keep_state=True))
    assert not m.prefix_stable() and m.continuation(1) is None
    dmd2 = base.get("dmd2")
    ramped = dmd2(tiny, dmd2.make_config({"adv_ramp": 0.2}), base.Context(tmp_path))
    assert not ramped.prefix_stable()
    flash = base.get("imagine-flash")
    assert flash(tiny, flash.make_config({}), base.Context(tmp_path)).prefix_stable()  # no adversarial term
    assert not flash(tiny, flash.make_config({"adversarial": True}), base.Context(tmp_path)).prefix_stable()


# --- the curve rules (pure) --------------------------------------------------------------------------------


def _pt(updates, passes, fid, hi, curve="a"):
    return {"curve": curve, "steps": 1, "updates": updates, "network_passes": passes, "fid": fid, "fid_ci_high": hi}


def test_the_plateau_is_the_first_point_within_the_ci_of_the_best_later_point():
    from bench.results.curves import plateau

    falling = [_pt(50, 1, 30, 32), _pt(100, 2, 20, 22), _pt(200, 4, 19, 21.5), _pt(400, 8, 19.5, 22)]
    assert plateau(falling) == (falling[1], True)  # 20 <= 21.5, the best later point's upper bound
    still_falling = [_pt(50, 1, 30, 32), _pt(100, 2, 20, 21), _pt(200, 4, 10, 11)]
    assert plateau(still_falling) == (still_falling[-1], False)  # its own best: not shown
    noisy = [_pt(50, 1, 12, 15), _pt(100, 2, 11, 14), _pt(200, 4, 13, 16)]
    assert plateau(noisy) == (noisy[0], True)
    seeds = [{**_pt(50, 1, 21, 21.5), "fid_seed_sd": 0.1}, {**_pt(100, 2, 20, 20.5), "fid_seed_sd": 2.0}]
    assert plateau(seeds)[0] is seeds[0]  # the training seeds' spread widens the best point's bound


def test_equal_compute_compares_every_curves_best_point_within_the_compute_the_last_plateau_needed():
    from bench.results.curves import equal_compute

    cheap = [_pt(50, 10, 30, 31, "cheap"), _pt(100, 20, 25, 26, "cheap"), _pt(200, 40, 24.5, 25.5, "cheap")]
    dear = [_pt(50, 30, 28, 29, "dear"), _pt(100, 60, 22, 23, "dear"), _pt(200, 120, 21.8, 22.8, "dear")]
    eq = equal_compute({("cheap", 1): cheap, ("dear", 1): dear})[1]
    assert eq["passes"] == 60  # dear's plateau (100 updates: 22 <= 22.8) spent 60; cheap's (100 updates) 20
    rows = eq["curves"]
    assert rows["cheap"]["point"] is cheap[2] and rows["cheap"]["under_budget"]  # its last point, under C
    assert rows["dear"]["point"] is dear[1] and not rows["dear"]["under_budget"]  # not its 120-pass point
    assert rows["cheap"]["plateau"] is cheap[1] and all(r["past_plateau"] for r in rows.values())
    worse = [_pt(50, 10, 5, 6, "worse"), _pt(100, 20, 8, 9, "worse"), _pt(200, 40, 9, 10, "worse")]
    rows = equal_compute({("worse", 1): worse, ("dear", 1): dear})[1]["curves"]
    assert rows["worse"]["point"] is worse[0] and rows["worse"]["past_plateau"]  # early stopping: its best within C
    falling = {("cheap", 1): cheap, ("dear", 1): dear[:2]}  # dear still falling: its last point sets C
    rows = equal_compute(falling)[1]["curves"]
    assert rows["dear"]["point"] is dear[1] and not rows["dear"]["plateau_shown"] and not rows["dear"]["past_plateau"]


# --- a tiny curve, end to end ------------------------------------------------------------------------------

CURVE_SUITE = """
name = "tiny-curves"
prompts = "shapes-val"
samples = 12
seeds = [0]
batch_size = 12
metrics = ["fid", "clip_score", "accuracy"]
[curves]
updates = [2, 1]
[train]
batch_size = 2
[[methods]]
name = "teacher"
label = "teacher"
steps = [1]
settings = { solver = "ddim" }
[[methods]]
name = "imagine-flash"
label = "flash"
steps = [1]
[[methods]]
name = "lcm"
steps = [1]
"""


def test_a_curves_suite_trains_each_point_by_continuing_the_last_and_writes_its_curves(tmp_path):
    import json

    from tests.test_cli import flashbench_in_process

    (tmp_path / "suite.toml").write_text(CURVE_SUITE)
    code, err = flashbench_in_process("run", tmp_path / "suite.toml", "--no-progress", "--cache", tmp_path / "cache",
                                      "--out", tmp_path / "run", cwd=tmp_path)
    assert code == 0, err
    rows = [json.loads(x) for x in (tmp_path / "run/results.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["teacher", "flash u=1", "flash u=2", "lcm u=1", "lcm u=2"]
    by = {r["label"]: r for r in rows}
    assert by["flash u=2"]["train"]["continued_from"] == 1 and by["flash u=1"]["train"]["continued_from"] is None
    assert by["flash u=2"]["train"]["network_passes"] == 2 * by["flash u=1"]["train"]["network_passes"]
    pts = [json.loads(x) for x in (tmp_path / "run/curves.jsonl").read_text().splitlines()]
    assert [(p["curve"], p["updates"]) for p in pts] == [("flash", 1), ("flash", 2), ("lcm", 1), ("lcm", 2)]
    assert all(p["fid_ci_low"] <= p["fid"] <= p["fid_ci_high"] and p["passes"]["student"]["backward"] > 0 for p in pts)
    assert (tmp_path / "run/plots/learning_curves.png").stat().st_size > 0
    table = (tmp_path / "run/tables/curves.md").read_text()
    assert "Plateau rule" in table and "At equal compute" in table


@pytest.mark.parametrize("change, match", [
    ({"prompts": "shapes-eval"}, "validation prompts"),
    ({"curves": {"updates": [2, 2]}}, "repeat"),
    ({"curves": {"updates": [0]}}, ">= 1"),
    ({"curves": {"points": [1]}}, "points"),
    ({"train": {"student_updates": 5}}, "remove it from"),
])
def test_a_curves_table_is_checked(change, match):
    import tomllib

    from bench import suite
    from core.errors import UserError

    raw = {**tomllib.loads(CURVE_SUITE), **change}
    with pytest.raises(UserError, match=match):
        suite.parse(raw, "curves test")


# --- claims at each compute point ----------------------------------------------------------------------------


def _curve_rows():
    """A curves run's rows: the teacher at 1 step, Imagine Flash cheap and already good, LCM dearer and better
    later; claim (b) (Imagine Flash beats every baseline at equal steps) holds at 50 updates and fails at 100."""
    import pandas as pd

    def row(label, method, curve, updates, passes, fid, half=0.5, variant=None):
        return {"label": label, "method": method, "variant": variant, "steps": 1, "nfe": 1, "n_samples": 10,
                "status": "ok", "error": None, "train_seed": 0, "curve": curve, "fid": fid, "fid_ci_low": fid - half,
                "fid_ci_high": fid + half, "clip_score": 50.0, "clip_score_ci_low": 49.0, "clip_score_ci_high": 51.0,
                "train": {"student_updates": updates, "network_passes": passes} if updates else None}

    return pd.DataFrame([
        row("teacher", "teacher", None, 0, 0, 40.0),
        row("imagine-flash u=50", "imagine-flash", "imagine-flash", 50, 100, 10.0, variant="full"),
        row("imagine-flash u=100", "imagine-flash", "imagine-flash", 100, 200, 10.1, variant="full"),
        row("lcm u=50", "lcm", "lcm", 50, 300, 20.0, variant="lcm"),
        row("lcm u=100", "lcm", "lcm", 100, 600, 5.0, variant="lcm"),
        row("other u=50", "imagine-flash", "other", 50, 100, 30.0, variant="other"),  # a variant: not the full row
        row("other u=100", "imagine-flash", "other", 100, 200, 30.0, variant="other"),
    ])


def test_each_claim_is_decided_at_every_compute_point_and_marked_when_its_verdict_depends_on_the_budget():
    from bench.results import claims, tables

    agg = tables.aggregate(_curve_rows())
    points = claims.compute_points(agg)
    assert list(points) == ["50 updates", "100 updates", "equal compute"]
    assert sorted(points["50 updates"]["label"]) == ["imagine-flash", "lcm", "other", "teacher"]
    # equal compute: LCM's plateau (100 updates, still falling: its last point) spent 600 passes; within them
    # Imagine Flash's best point is its first (10.0 against 10.1)
    eq = points["equal compute"].set_index("label")
    assert eq.loc["lcm", "fid"] == 5.0 and eq.loc["imagine-flash", "fid"] == 10.0
    lines, verdicts = claims.by_compute(agg)
    assert verdicts["b"] == {"50 updates": "reproduced", "100 updates": "not reproduced",
                             "equal compute": "not reproduced"}
    assert verdicts["c"] == dict.fromkeys(points, "not measured")
    row_b = next(line for line in lines if line.startswith("| (b)"))
    assert row_b.endswith("| yes |")
    text, decided = claims.report(agg, "curves")
    assert decided["b"] == "not reproduced" and "## Verdicts at each compute point" in text
    assert "1 steps vs other" not in text  # the variant curve is no baseline


def test_a_curves_run_writes_its_claims_by_compute_point(tmp_path):
    from bench.results import claims, tables

    claims.write(tmp_path, tables.aggregate(_curve_rows()))
    table = (tmp_path / "tables/claims_by_compute.md").read_text()
    assert "| 50 updates | 100 updates | equal compute | depends on the budget |" in table
    claims.write(tmp_path / "plain", tables.aggregate(_curve_rows().drop(columns="curve")))
    assert not (tmp_path / "plain/tables/claims_by_compute.md").exists()


def test_a_run_without_curves_has_no_compute_points():
    from bench.results import claims, tables

    agg = tables.aggregate(_curve_rows().drop(columns="curve").iloc[:1])
    assert claims.compute_points(agg) == {} and claims.by_compute(agg) == ([], {})
    assert claims.budget_dependence({"a": "not measured"}) == "not measured"
    assert claims.budget_dependence({"a": "reproduced", "b": "not reproduced", "c": "inconclusive"}) == "yes"
    assert claims.budget_dependence({"a": "inconclusive", "b": "not reproduced"}) == "decided at some budgets only"
    assert claims.budget_dependence({"a": "not reproduced", "b": "not reproduced", "c": "not measured"}) == "no"


def test_table_a_shows_the_teacher_at_the_most_nfe_not_above_each_student_rows():
    import pandas as pd

    from bench.results import tables

    def row(label, method, steps, nfe, fid):
        return {"label": label, "method": method, "variant": None, "steps": steps, "nfe": nfe, "n_samples": 10,
                "status": "ok", "error": None, "train_seed": None, "fid": fid, "fid_ci_low": fid - 1,
                "fid_ci_high": fid + 1}

    agg = tables.aggregate(pd.DataFrame([
        row("teacher-ddim", "teacher", 1, 2, 31.0), row("teacher-dpm++", "teacher", 1, 2, 30.0),
        row("teacher-dpm++", "teacher", 2, 4, 8.0), row("teacher-dpm++", "teacher", 25, 50, 0.4),
        row("lcm", "lcm", 1, 1, 40.0), row("lcm", "lcm", 3, 3, 2.0), row("lcm", "lcm", 4, 4, 1.0)]))
    col = dict(zip(zip(tables.table_a(agg)["method"], tables.table_a(agg)["NFE"]),
                   tables.table_a(agg)["teacher at ≤ NFE: FID"], strict=True))
    assert col[("lcm", 1)] == "—"  # the teacher has no 1-NFE row (CFG: 2 NFE a step)
    assert col[("lcm", 3)] == "30.00 [29.00, 31.00] (2 NFE)"  # DPM-Solver++ preferred at equal NFE
    assert col[("lcm", 4)] == "8.00 [7.00, 9.00] (4 NFE)"
    assert col[("teacher-dpm++", 4)] == "—"


def test_table_a_counts_a_continued_students_training_seconds_over_every_session():
    """A student continued from a cached shorter training (a curves point, an equal-compute row) spent its passes
    and its seconds over several sessions: Table A's seconds are the counted total beside the counted passes, not
    the last session's wall time (which loading a cached student makes ~0)."""
    import pandas as pd

    from bench.results import tables

    def row(seed, train):
        return {"label": "lcm u=400", "method": "lcm", "variant": None, "steps": 4, "nfe": 4, "n_samples": 10,
                "status": "ok", "error": None, "train_seed": seed, "fid": 1.0, "train": train}

    trains = [{"student_updates": 400, "network_passes": 64_000, "train_seconds": 130.0, "wall_seconds": 66.0},
              {"student_updates": 400, "network_passes": 64_000, "train_seconds": 140.0, "wall_seconds": 0.2}]
    a = tables.table_a(tables.aggregate(pd.DataFrame([row(s, t) for s, t in enumerate(trains)])))
    assert a["train s"].tolist() == ["135"] and a["fwd+bwd passes (train)"].tolist() == ["64,000"]
    older = [{k: v for k, v in t.items() if k != "train_seconds"} for t in trains]  # before the count existed
    a = tables.table_a(tables.aggregate(pd.DataFrame([row(s, t) for s, t in enumerate(older)])))
    assert a["train s"].tolist() == ["33"]


def test_the_allocation_table_says_where_each_student_trained():
    import pandas as pd

    from bench.results import tables

    def row(label, steps, ckpt, counts, seed=0):
        return {"label": label, "method": label, "steps": steps, "nfe": steps, "status": "ok", "train_seed": seed,
                "train": {"checkpoint": ckpt, "student_timesteps": counts}}

    shared = {"999": 52, "499": 28, "749": 20}
    df = pd.DataFrame([row("flash", 1, "f.safetensors", shared), row("flash", 4, "f.safetensors", shared),
                       row("prog", 1, "p1-s0", {"999": 3, "1": 1}), row("prog", 1, "p1-s1", {"999": 1, "1": 3}, 1),
                       {"label": "teacher", "method": "teacher", "steps": 1, "nfe": 2, "status": "ok", "train": None}])
    t = tables.allocation_table(df).set_index("method")
    assert t.loc["flash", "serves steps"] == "1, 4" and t.loc["flash", "students"] == 1
    assert t.loc["flash", "share at the largest t"] == "52.0% (t = 999)"
    assert t.loc["flash", "least-trained time"] == "20.0% (t = 749)"
    assert t.loc["prog", "students"] == 2 and t.loc["prog", "share at the largest t"] == "50.0% (t = 999)"
    assert "teacher" not in t.index and tables.allocation_table(df.iloc[4:]) is None


# --- the suite at equal compute, derived from the curves run ------------------------------------------------


@pytest.mark.parametrize(("curves", "base"), [("curves", "paper"), ("curves-flow", "paper-flow")])
def test_the_equal_compute_suite_is_what_the_rule_derives_from_the_committed_curves_run(curves, base):
    import tomllib

    from bench import suite as suite_mod
    from bench.results import budgets
    from tests.conftest import ROOT

    run = ROOT / "results/reference" / curves
    committed = ROOT / f"bench/suites/{base}-equal-compute.toml"
    assert budgets.main([str(run), "--base", base, "--check", str(committed)]) == 0
    text = budgets.equal_compute_suite(run, base)
    parsed = suite_mod.parse(tomllib.loads(text), "derived")
    chosen = budgets.chosen_updates(run)
    for e in parsed.entries:
        if e.name == "teacher":
            continue
        curve, updates = e.label.rsplit(" u=", 1)
        assert all(chosen[curve][b.steps] == int(updates) == e.settings["student_updates"] for b in e.budgets)
    # every step count of the base suite's trained entries is served once, and the teacher is kept
    paper = suite_mod.load(base)
    served = {(e.name, b.steps) for e in parsed.entries for b in e.budgets}
    assert served == {(e.name, b.steps) for e in paper.entries for b in e.budgets}
    assert parsed.prompts == "shapes-eval" and "student_updates" not in parsed.train


def test_a_run_without_curves_gives_no_equal_compute_suite(tmp_path):
    from bench.results import budgets

    (tmp_path / "results.jsonl").write_text("")
    with pytest.raises(ValueError, match="no learning-curve rows"):
        budgets.chosen_updates(tmp_path)
    assert budgets.main([str(tmp_path)]) == 2


def test_an_equal_compute_suite_is_refused_from_another_teachers_curves_or_a_missing_check_file(tmp_path, capsys):
    from bench.results import budgets
    from tests.conftest import ROOT

    flow = ROOT / "results/reference/curves-flow"
    with pytest.raises(ValueError, match="use the curves run of the base suite's teacher"):
        budgets.equal_compute_suite(flow, "paper")  # VP paper suite, flow-teacher curves
    assert budgets.main([str(flow), "--base", "paper"]) == 2
    assert budgets.main([str(flow), "--base", "paper-flow", "--check", str(tmp_path / "none.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "backbone" in err[0] and "no such file" in err[1]
    assert not list(tmp_path.iterdir())
