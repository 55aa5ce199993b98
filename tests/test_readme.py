"""The README's figures are copied from committed results, and the report's rules decide as written."""

import json

import pytest

from bench import readme, report

REF = readme.ROOT / "results" / "reference"


def test_readme_blocks_equal_the_committed_results():
    assert readme.main(["--check"]) == 0, "run `python -m bench.readme`"


@pytest.mark.skipif(not (REF / "FIGURES.md").exists(), reason="no committed reference runs")
def test_figures_are_regenerated_identically_from_the_reference_runs():
    assert report.build(REF) == (REF / "FIGURES.md").read_text(), "run `python -m bench.report`"


def test_render_copies_a_file_between_markers(tmp_path):
    (tmp_path / "t.md").write_text("| a |\n|---|\n| 1 |\n")
    text = "x\n<!-- include: t.md -->\nstale\n<!-- end include -->\ny\n<!-- include: gone.md -->\n<!-- end include -->\n"
    out = readme.render(text, tmp_path)
    assert "| 1 |" in out and "stale" not in out and "(missing: gone.md)" in out
    assert readme.render(out, tmp_path) == out  # idempotent


def test_prose_may_quote_only_figures_the_committed_tables_hold(tmp_path):
    (tmp_path / "results" / "reference" / "r" / "tables").mkdir(parents=True)
    (tmp_path / "results" / "reference" / "r" / "tables" / "main.md").write_text("| x | 2.16 [1.89, 2.46] |\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("FID 2.16 [1.89, 2.46] holds.\n")
    (tmp_path / "README.md").write_text("<!-- include: gone.md -->\n9.99 [1.00, 2.00] in a block\n<!-- end include -->\n"
                                        "A stale one: 2.16 [1.77, 2.56], and -0.18 [-0.19,\n-0.17].\n")
    assert readme.unquoted_figures(tmp_path) == ["README.md:4: 2.16 [1.77, 2.56]", "README.md:4: -0.18 [-0.19, -0.17]"]
    (tmp_path / "README.md").write_text("2.16 [1.89, 2.46]\n")
    assert readme.unquoted_figures(tmp_path) == []


def test_included_headings_sit_under_the_readme_sections():
    assert readme.demote("# A\n## B\ntext # not a heading\n") == "#### A\n##### B\ntext # not a heading\n"
    assert readme.demote("### A\n") == "#### A\n"


def _row(steps, fid, acc, ci=0.5, acc_ci=0.02):
    return {"label": "teacher-dpm++", "method": "teacher", "steps": steps, "nfe": 2 * steps, "status": "ok",
            "n_samples": 100, "fid": fid, "fid_ci_low": fid - ci, "fid_ci_high": fid + ci,
            "clip_score": 90.0, "clip_score_ci_low": 89.0, "clip_score_ci_high": 91.0,
            "accuracy": acc, "accuracy_ci_low": acc - acc_ci, "accuracy_ci_high": acc + acc_ci}


@pytest.mark.parametrize(("r3", "acc25", "fid_sep", "acc_ok"), [
    (_row(3, 20.0, 0.5), 0.9, "yes", "yes"),   # clearly worse, accurate teacher
    (_row(3, 5.4, 0.89), 0.9, "no", "yes"),    # CIs overlap: not "measurably worse"
    (_row(3, 20.0, 0.5), 0.7, "yes", "no"),    # teacher below the accuracy aim
])
def test_teacher_checks_follow_their_rules(tmp_path, r3, acc25, fid_sep, acc_ok):
    rows = [_row(25, 5.0, acc25), r3]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = "\n".join(report.teacher_checks(tmp_path))
    assert f"≥ 0.8: **{acc_ok}**" in text
    assert f"outside the CIs: FID **{fid_sep}**" in text


def _fake_run(root, name, source):
    run = root / "results" / "reference" / name
    (run / "tables").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"source_sha256": source}))
    (run / "tables" / "main.md").write_text("| a |\n|---|\n| 1 |\n")


def test_a_reference_made_from_other_source_is_marked_stale(tmp_path):
    _fake_run(tmp_path, "fresh", "now")
    _fake_run(tmp_path, "old", "then")
    text = ("<!-- include: results/reference/fresh/tables/main.md -->\n<!-- end include -->\n"
            "<!-- include: results/reference/old/tables/main.md -->\n<!-- end include -->\n")
    assert readme.stale_runs(text, tmp_path, current="now") == {"old": "then"}
    out = readme.render(text, tmp_path, current="now")
    fresh, old = out.split("<!-- include: results/reference/old")
    assert "Stale" not in fresh and "**Stale:** `old` was made from numeric source `then`" in old


def test_source_hash_follows_the_numeric_source_only(tmp_path):
    import shutil

    from bench import source

    for d in ("methods", "bench/shapes", "bench/metrics", "bench/results"):
        shutil.copytree(readme.ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    h = source.source_hash(tmp_path)
    (tmp_path / "bench" / "results" / "tables.py").write_text("# a table's layout moves no number\n")
    assert source.source_hash(tmp_path) == h
    (tmp_path / "methods" / "lcm.py").write_text("# a method's code does\n")
    assert source.source_hash(tmp_path) != h


def test_real_scale_only_sources_are_never_imported_by_an_embedded_run():
    """The files the source hash leaves out are out of reach of every embedded run: load both shipped
    teachers and every method the shipped embedded suites name (as the runner does), then look."""
    import subprocess
    import sys

    from bench import source

    code = (
        "import sys, tomllib; from pathlib import Path\n"
        "import bench.runner, bench.components, bench.study\n"
        "from methods import registry\n"
        "from bench.shapes.teacher import ShapesBackbone\n"
        "names = {m['name'] for p in Path('bench/suites').glob('*.toml') for m in tomllib.loads(p.read_text())['methods']}\n"
        "names |= {n for n in registry.names() if n != 'pretrained'}\n"
        "[registry.get(n) for n in sorted(names)]\n"
        "[ShapesBackbone.load(kind=k) for k in ('vp', 'flow')]\n"
        "print('\\n'.join(m.__file__ for m in list(sys.modules.values()) if getattr(m, '__file__', None)))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=readme.ROOT, capture_output=True, text=True, check=True)
    loaded = {readme.Path(f).resolve() for f in out.stdout.split()}
    root = readme.ROOT.resolve()
    reached = [f.relative_to(root).as_posix() for f in loaded if f.is_relative_to(root)]
    assert reached and not [f for f in reached if source.real_scale_only(f)]
    # and every shipped embedded suite names no real-scale method
    import tomllib

    for p in (readme.ROOT / "bench" / "suites").glob("*.toml"):
        assert "pretrained" not in {m["name"] for m in tomllib.loads(p.read_text())["methods"]}, p.name


def test_families_table_pairs_rows_by_label_and_steps_and_judges_by_ci_overlap(tmp_path):
    from bench.results import families

    def student(label, steps, fid, ci=0.5):
        return {**_row(steps, fid, 0.9, ci=ci), "label": label, "method": label, "nfe": steps, "seed": 0}

    vp, flow = tmp_path / "vp", tmp_path / "flow"
    for run, rows in ((vp, [student("a", 1, 10.0), student("b", 1, 12.0), student("only-vp", 1, 1.0)]),
                      (flow, [student("a", 1, 5.0), student("b", 1, 12.2)])):
        run.mkdir()
        (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = families.side_by_side(vp, flow)
    assert "| a | 1 | 1 | 10.00 [9.50, 10.50] | 5.00 [4.50, 5.50] | flow better |" in table
    assert "| b | 1 | 1 | 12.00" in table and "| tied |" in table and "only-vp" not in table
    assert families.side_by_side(vp, tmp_path / "none").count("\n") == 2  # a run without results: no rows
    assert families.winners(tmp_path / "none", flow).count("\n") == 2
    best = families.winners(vp, flow)
    # VP: only-vp (1.0) is best there; flow: a beats b outside the intervals
    assert "| 1 | only-vp |" in best and "| a | 5.00 [4.50, 5.50] | better than b |" in best
