"""A first hour without friction (issue 21): the run directory named at start, --threads, latency flagged when the
machine is loaded, a dry run that says what it will cost and which students it trains."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from bench import latency
from tests.test_cli import ROOT, flashbench_in_process

SUITE = textwrap.dedent("""
    name = "first"
    prompts = "shapes-eval"
    samples = 8
    seeds = [0]
    batch_size = 8
    metrics = ["clip_score", "latency"]
    [latency]
    warmup = 1
    repeats = 2
    throughput_batch = 4
    [[methods]]
    name = "teacher"
    label = "teacher-ddim"
    steps = [1]
    settings = { solver = "ddim" }
    [[methods]]
    name = "lcm"
    steps = [1]
    settings = { student_updates = 2, batch_size = 4 }
""")


def test_the_run_directory_is_named_before_the_first_cell_and_latency_records_the_load(tmp_path, monkeypatch):
    import torch

    (tmp_path / "s.toml").write_text(SUITE.split("[[methods]]\nname = \"lcm\"")[0])
    monkeypatch.setattr(os, "getloadavg", lambda: (40.0, 40.0, 40.0))  # a busy machine
    threads = torch.get_num_threads()
    try:
        code, err = flashbench_in_process("run", tmp_path / "s.toml", "--out", tmp_path / "run", "--no-progress",
                                          "--threads", "1", "--cache", tmp_path / "cache", cwd=tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    assert err.splitlines()[0] == f"run directory: {tmp_path / 'run'}"
    assert "measured on a loaded machine" in err
    (row,) = [json.loads(x) for x in (tmp_path / "run/results.jsonl").read_text().splitlines()]
    assert row["latency_load_average"] == 40.0 and row["latency_other_load"] == pytest.approx(39.0)
    assert row["latency_protocol"]["threads"] == 1


def test_machine_load_is_other_work_beyond_this_runs_threads(monkeypatch):
    import torch

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.2, 0, 0))
    assert latency.machine_load()["loaded"] is False  # this run's own two threads
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 0, 0))
    load = latency.machine_load()
    assert load["loaded"] is True and load["other_load"] == pytest.approx(1.0)


def test_threads_below_one_are_refused_fast_before_anything_loads(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", "import sys; from bench.cli import main; sys.exit(main(['run', "
                          "'--threads', '0', '--out', 'x']))"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 2 and "--threads must be 1 or more" in out.stderr and not (tmp_path / "x").exists()


def test_a_dry_run_prints_the_cost_and_which_students_it_trains(tmp_path, capsys):
    (tmp_path / "s.toml").write_text(SUITE)
    from bench.cli import main

    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["run", str(tmp_path / "s.toml"), "--dry-run", "--cache", str(tmp_path / "cache")]) == 0
    finally:
        os.chdir(here)
    out = capsys.readouterr().out
    assert "student: trains" in out and "1 to train, 0 loaded" in out
    assert "NFE x samples" in out and "sampling ≈" in out
    assert not (tmp_path / "cache" / "students").exists() or not any((tmp_path / "cache" / "students").iterdir())


def test_no_two_methods_of_a_plot_share_a_style():
    from bench.results.plotstyle import series_style

    styles = [series_style(i) for i in range(40)]
    assert len({(tuple(s["color"]), s["marker"], s["linestyle"]) for s in styles}) == 40
    assert len({s["marker"] for s in styles[:12]}) == 12  # the first dozen differ by marker alone


def test_the_overview_grid_is_captioned_with_the_runs_prompts(tmp_path):
    import pandas as pd
    import torch

    from bench.results import tables
    from bench.runner import save_grid
    from prompts import load_prompts
    from prompts.loaders import prompts_sha256

    prompts = load_prompts("shapes-eval")[:8]
    (tmp_path / "config.json").write_text(json.dumps({"prompts": {"set": "shapes-eval", "n": 8,
                                                                  "sha256": prompts_sha256(prompts)}}))
    assert tables.grid_prompts(tmp_path) == [p.text for p in prompts]
    save_grid(torch.rand(8, 3, 16, 16), tmp_path / "grids" / "a_nfe2.png")
    tables.overview(pd.DataFrame([{"label": "a", "nfe": 2}]), tmp_path / "grids", prompts=tables.grid_prompts(tmp_path))
    assert (tmp_path / "grids" / "overview.png").stat().st_size > 0
    (tmp_path / "config.json").write_text(json.dumps({"prompts": {"set": "shapes-eval", "n": 8, "sha256": "other"}}))
    assert tables.grid_prompts(tmp_path) is None  # a set that no longer reads the same: no captions rather than wrong ones
