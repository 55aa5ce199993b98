"""The CLI end to end on a tiny suite, and bad input: one line, exit 2, nothing written."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

TINY = """
name = "tiny"
prompts = "shapes-eval"
samples = 12
seeds = [0]
batch_size = 8
grid = 8
[latency]
warmup = 1
repeats = 2
throughput_batch = 4
[[methods]]
name = "teacher"
label = "teacher-ddim"
nfe = [2, 4]
settings = { solver = "ddim" }
"""

REQUIRED = ["method", "steps", "nfe", "seed", "n_samples", "fid", "clip_score", "accuracy", "acc_color", "acc_shape",
            "acc_size", "acc_position", "acc_count", "latency_ms", "throughput", "fid_ci_low", "fid_ci_high",
            "clip_score_ci_low", "clip_score_ci_high", "accuracy_ci_low", "accuracy_ci_high", "protocol",
            "saturation", "contrast"]


def flashbench_in_process(*args, cwd):
    """(exit status, stderr) of `flashbench ARGS` run in this process (no interpreter start-up)."""
    import contextlib
    import io

    from bench.cli import main

    err, here = io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:
                code = e.code
    finally:
        os.chdir(here)
    return code, err.getvalue()


def flashbench(*args, cwd=None, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "bench", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=900)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    suite = d / "tiny.toml"
    suite.write_text(TINY)
    out = d / "run"
    r = flashbench("run", suite, "--out", out, "--cache", d / "cache", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    return d, out, r


def test_run_writes_rows_tables_plots_grids(tiny_run):
    _, out, r = tiny_run
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [(x["label"], x["nfe"], x["steps"]) for x in rows] == [("teacher-ddim", 2, 1), ("teacher-ddim", 4, 2)]
    for row in rows:
        missing = [k for k in REQUIRED if k not in row]
        assert not missing, missing
        assert row["nfe_counted"] == row["nfe"] and row["status"] == "ok"
        assert row["fid_ci_low"] <= row["fid"] <= row["fid_ci_high"] or row["n_samples"] < 50
        assert row["protocol"]["fid"]["feature_sha256"] and row["protocol"]["teacher"]["teacher_sha256"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["git"] and cfg["versions"]["torch"] and cfg["suite"]["name"] == "tiny"
    for f in ["tables/main.md", "tables/main.csv", "tables/main.tex", "plots/quality_vs_nfe.png",
              "plots/quality_vs_latency.png", "grids/teacher-ddim_nfe2.png", "grids/overview.png", "floor.json"]:
        assert (out / f).exists(), f
    assert "teacher-ddim" in (out / "tables/main.md").read_text()
    assert "| method" in r.stdout


def test_table_rebuilds_from_results_alone(tiny_run):
    _, out, _ = tiny_run
    before = (out / "tables/main.md").read_text()
    (out / "tables/main.md").unlink()
    r = flashbench("table", out)
    assert r.returncode == 0, r.stderr
    assert (out / "tables/main.md").read_text() == before


def test_new_run_never_overwrites(tiny_run):
    d, out, _ = tiny_run
    before = (out / "results.jsonl").read_bytes()
    r = flashbench("run", d / "tiny.toml", "--out", out, "--cache", d / "cache")
    assert r.returncode == 2 and "already exists" in r.stderr
    assert (out / "results.jsonl").read_bytes() == before


@pytest.mark.parametrize("args,needle", [
    (["run", "nosuch"], "unknown suite 'nosuch'"),
    (["run", "--methods", "teachr"], "did you mean 'teacher'"),
    (["run", "--nfe", "3"], "not reachable"),
    (["run", "--nfe", "0"], "NFE must be a positive integer"),
    (["run", "--nfe", "two"], "comma-separated integers"),
    (["run", "--device", "cuda"], "CUDA is not available"),
    (["run", "--samples", "99999"], "has only"),
    (["run", "--resume", "nowhere"], "cannot resume"),
    (["table", "nowhere"], "has no results.jsonl"),
    (["merge", "nowhere", "nowhere2", "--out", "out"], "cannot merge nowhere"),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, args, needle):
    if "--device" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    out = tmp_path / "out"
    full = args + (["--out", str(out)] if args[0] == "run" and "--resume" not in args else [])
    code, err = flashbench_in_process(*full, cwd=tmp_path)
    assert code == 2, (code, err[-2000:])
    assert needle in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert not out.exists() and not (tmp_path / "results").exists()


def test_bad_suite_files(tmp_path):
    cases = {
        "syntax.toml": "name = \n",
        "key.toml": 'nmae = "x"\n',
        "method.toml": '[[methods]]\nname = "lcmm"\nsteps = [1]\n',
        "setting.toml": '[[methods]]\nname = "teacher"\nsteps = [1]\nsettings = { solverr = "ddim" }\n',
        "solver.toml": '[[methods]]\nname = "teacher"\nsteps = [1]\nsettings = { solver = "heun" }\n',
        "type.toml": '[[methods]]\nname = "teacher"\nsteps = [1]\nsettings = { guidance_scale = "high" }\n',
        "steps.toml": '[[methods]]\nname = "teacher"\nsteps = [0]\n',
        "both.toml": '[[methods]]\nname = "teacher"\nsteps = [1]\nnfe = [2]\n',
        "prompts.toml": 'prompts = "nope.txt"\n[[methods]]\nname = "teacher"\nsteps = [1]\n',
        "teacher.toml": '[backbone]\nkind = "shapes"\nteacher = "flw"\n[[methods]]\nname = "teacher"\nsteps = [1]\n',
        "guidance.toml": '[[methods]]\nname = "teacher"\nsteps = [1]\nsettings = { guidance = "cfgg" }\n',
        "v-on-flow.toml": ('[backbone]\nkind = "shapes"\nteacher = "flow"\n[[methods]]\nname = "progressive"\n'
                           'steps = [1]\nsettings = { student_prediction = "v_prediction" }\n'),
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        code, err = flashbench_in_process("run", tmp_path / name, "--out", tmp_path / "o", cwd=tmp_path)
        assert code == 2, (name, err[-1500:])
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert not (tmp_path / "o").exists()


def test_corrupt_weights_are_reported(tmp_path):
    """Missing or corrupt shipped weights: one line, exit 2 (checked on a copy of the package)."""
    import shutil

    pkg = tmp_path / "pkg"
    for p in ("core", "bench", "methods", "prompts"):
        shutil.copytree(ROOT / p, pkg / p, ignore=shutil.ignore_patterns("__pycache__"))
    w = pkg / "bench" / "shapes" / "assets" / "teacher.safetensors"
    w.write_bytes(w.read_bytes()[:-100] + b"x" * 100)
    suite = tmp_path / "s.toml"
    suite.write_text(TINY)
    env = dict(os.environ, PYTHONPATH=str(pkg))
    r = subprocess.run([sys.executable, "-m", "bench", "run", str(suite), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 2 and "corrupt" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()
    w.unlink()
    r = subprocess.run([sys.executable, "-m", "bench", "run", str(suite), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 2 and "not found" in r.stderr, r.stderr


def test_list_is_fast_and_names_everything():
    r = flashbench("list")
    assert r.returncode == 0 and "teacher" in r.stdout and "default" in r.stdout
    r = subprocess.run([sys.executable, "-c", "import sys; from bench.cli import main; main(['list']); "
                        "print('torch' in sys.modules)"], capture_output=True, text=True, cwd=ROOT)
    assert r.stdout.strip().endswith("False")  # listing imports no torch


def test_training_seeds_give_one_row_with_the_spread(tmp_path):
    (tmp_path / "s.toml").write_text("""
name = "seeds"
prompts = "shapes-eval"
samples = 12
batch_size = 12
grid = 4
train_seeds = [0, 1]
metrics = ["fid", "clip_score", "accuracy"]
[[methods]]
name = "imagine-flash"
label = "flash"
steps = [1]
settings = { student_updates = 2, batch_size = 2, max_steps = 1, adversarial = false }
[[methods]]
name = "teacher"
label = "teacher"
steps = [1]
""")
    r = flashbench("run", tmp_path / "s.toml", "--out", tmp_path / "run", "--cache", tmp_path / "cache", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert sorted((x["label"], x["train_seed"]) for x in rows) == [("flash", 0), ("flash", 1), ("teacher", None)]
    flash = [x for x in rows if x["label"] == "flash"]
    assert flash[0]["settings"]["seed"] != flash[1]["settings"]["seed"]
    assert flash[0]["train"]["passes"]["teacher"]["forward"] == flash[0]["train"]["teacher_nfe"] > 0
    table = (tmp_path / "run" / "tables" / "main.md").read_text()
    assert " ± " in table.split("flash")[1].split("\n")[0]  # mean ± spread over the two students


def test_table_rederives_a_study_runs_choice_by_the_studys_rule(tmp_path):
    """`flashbench table` on a study run rebuilds its tables and its choice (choice.json, tables/study.md) from the
    results, as the study's rule in bench/study.py now decides it: a rule's change reaches every committed study."""
    import json
    import shutil

    from tests.conftest import ROOT

    run = tmp_path / "study"
    shutil.copytree(ROOT / "results/reference/study-imagine-flash-noise-correction", run)
    committed = json.loads((run / "choice.json").read_text())
    (run / "choice.json").unlink()
    (run / "tables" / "study.md").unlink()
    code, err = flashbench_in_process("table", run, cwd=tmp_path)
    assert code == 0, err
    again = json.loads((run / "choice.json").read_text())
    assert again["chosen"] == committed["chosen"] and (run / "tables" / "study.md").exists()
    assert "paired by training seed" in again["chosen"]["all"]["why"]
