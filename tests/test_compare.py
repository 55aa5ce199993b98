"""The regression gate passes a rerun of the same suite and fails an injected regression."""

import json
import shutil

import pytest

from tests.test_cli import flashbench

SUITE = """
name = "gate"
prompts = "shapes-eval"
samples = 24
seeds = [0, 1]
metrics = ["fid", "clip_score", "accuracy"]
[[methods]]
name = "teacher"
label = "teacher"
nfe = [2, 6]
settings = { solver = "dpmsolver++" }
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("gate")
    (d / "s.toml").write_text(SUITE)
    for name in ("base", "rerun"):
        r = flashbench("run", d / "s.toml", "--out", d / name, "--cache", d / "cache", "--no-progress")
        assert r.returncode == 0, r.stderr[-2000:]
    r = flashbench("baseline", d / "base")
    assert r.returncode == 0, r.stderr
    return d


def test_rerun_passes(runs):
    r = flashbench("compare", runs / "base", runs / "rerun")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "**PASS**" in r.stdout and (runs / "rerun" / "compare.md").exists()


def test_injected_regression_fails(runs):
    bad = runs / "regressed"
    shutil.copytree(runs / "rerun", bad)
    rows = [json.loads(x) for x in (bad / "results.jsonl").read_text().splitlines()]
    for row in rows:
        if row["nfe"] == 6:
            row["fid"] = 2 * row["fid"] + 20  # the injected regression
            row["accuracy"] = 0.0
    (bad / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = flashbench("compare", runs / "base", bad)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "**regression**" in r.stdout and "teacher|nfe=6 | fid" in r.stdout
    assert "teacher|nfe=6 | accuracy" in r.stdout and "FAIL" in r.stdout
    assert r.stdout.count("**regression**") == 2  # the untouched cell stays ok


def test_missing_cell_fails_and_protocol_mismatch_is_refused(runs):
    part = runs / "partial"
    shutil.copytree(runs / "rerun", part)
    rows = [x for x in (part / "results.jsonl").read_text().splitlines() if '"nfe": 6' not in x]
    (part / "results.jsonl").write_text("\n".join(rows) + "\n")
    r = flashbench("compare", runs / "base", part)
    assert r.returncode == 1 and "missing" in r.stdout
    other = runs / "other-protocol"
    shutil.copytree(runs / "rerun", other)
    rows = [json.loads(x) for x in (other / "results.jsonl").read_text().splitlines()]
    for row in rows:
        row["protocol"]["id"] = "somethingelse"
    (other / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = flashbench("compare", runs / "base", other)
    assert r.returncode == 2 and "another protocol" in r.stderr


def test_baseline_needs_two_seeds(tmp_path, runs):
    one = tmp_path / "one"
    shutil.copytree(runs / "rerun", one)
    rows = [x for x in (one / "results.jsonl").read_text().splitlines() if '"seed": 0' in x]
    (one / "results.jsonl").write_text("\n".join(rows) + "\n")
    r = flashbench("baseline", one)
    assert r.returncode == 2 and ">= 2 seeds" in r.stderr
