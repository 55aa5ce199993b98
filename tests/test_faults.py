"""Fault injection on real `flashbench run` subprocesses: kill -9 and resume, corrupt caches,
concurrent writers, NaN in training and in samples."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

SUITE = """
name = "faults"
prompts = "shapes-eval"
samples = 12
batch_size = 6
grid = 4
metrics = ["fid", "clip_score", "accuracy"]
[[methods]]
name = "teacher"
label = "teacher"
nfe = [2]
settings = { solver = "ddim" }
[[methods]]
name = "imagine-flash"
label = "flash"
steps = [1, 2]
settings = { student_updates = 12, batch_size = 4, shared_student = true, max_steps = 2 }
"""
TIMING = {"sample_seconds", "eval_seconds", "metric_seconds", "throughput"}


def _timing(key: str) -> bool:
    """Fields measured in time or memory: they vary between runs of the same code, never a metric."""
    return key in TIMING or key.startswith(("latency_", "peak_"))


def run(*args, fault=None, timeout=900):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("FLASHBENCH_FAULT", None)
    if fault:
        env["FLASHBENCH_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "bench", "run", *map(str, args), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def comparable(run_dir):
    rows = [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines()]
    out = []
    for r in rows:
        r = {k: v for k, v in r.items() if not _timing(k)}
        if r.get("train"):
            r["train"] = {k: v for k, v in r["train"].items() if k not in ("wall_seconds", "train_seconds", "cached")}
        out.append(r)
    return sorted(out, key=lambda r: (r["label"], r["nfe"], r["seed"]))


def assert_close(a, b, rel=1e-3, path="rows"):
    """Equal structure and non-float values; floats within `rel` (relative, or absolute near 0).

    For runs whose samples were drawn in different batch shapes (one process vs four): PyTorch does not
    promise bit-identical convolutions across batch sizes or thread counts, and an 8-bit rounding flip moves
    a per-sample score in its last digits."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), (path, a.keys() ^ b.keys())
        for k in a:
            assert_close(a[k], b[k], rel, f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, rel, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=rel, abs=rel), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    (d / "suite.toml").write_text(SUITE)
    r = run(d / "suite.toml", "--out", d / "clean", "--cache", d / "cache-clean")
    assert r.returncode == 0, r.stderr[-3000:]
    return d


@pytest.mark.parametrize("point", ["kill:train:5", pytest.param("kill:sample:1", marks=pytest.mark.slow),
                                   pytest.param("kill:metrics:2", marks=pytest.mark.slow)])
def test_killed_run_resumes_to_the_same_results(clean, point):
    d = clean
    out, cache = d / f"run-{point.replace(':', '-')}", d / f"cache-{point.replace(':', '-')}"
    r = run(d / "suite.toml", "--out", out, "--cache", cache, fault=point)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    if point.startswith("kill:train"):
        assert list((cache / "students").glob("*.ckpt.safetensors")), "training left no checkpoint"
    r = run("--resume", out)  # the cache location is remembered by the run
    assert r.returncode == 0, r.stderr[-3000:]
    assert comparable(out) == comparable(d / "clean")
    assert (out / "tables/main.md").read_text() == (d / "clean/tables/main.md").read_text()


def test_corrupt_cached_student_is_detected_and_retrained(clean):
    d = clean
    cache = d / "cache-corrupt"
    r = run(d / "suite.toml", "--out", d / "c1", "--cache", cache)
    assert r.returncode == 0, r.stderr[-2000:]
    (student,) = [p for p in (cache / "students").glob("*.safetensors") if ".ckpt" not in p.name]
    student.write_bytes(student.read_bytes()[:-64] + b"\0" * 64)
    r = run(d / "suite.toml", "--out", d / "c2", "--cache", cache)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in (d / "c2/results.jsonl").read_text().splitlines()]
    flash = [x for x in rows if x["label"] == "flash"]
    assert flash[0]["train"]["cached"] is False  # retrained, not silently used
    assert comparable(d / "c2") == comparable(d / "clean")


@pytest.mark.slow
def test_corrupt_training_checkpoint_is_not_used(clean):
    d = clean
    out, cache = d / "ckpt-run", d / "cache-ckpt"
    r = run(d / "suite.toml", "--out", out, "--cache", cache, fault="kill:train:7")
    assert r.returncode == -signal.SIGKILL
    (ckpt,) = list((cache / "students").glob("*.ckpt.safetensors"))
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # torn
    r = run("--resume", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert comparable(out) == comparable(d / "clean")


def test_second_writer_is_refused_while_a_run_is_in_progress(clean, tmp_path):
    d = clean
    out = tmp_path / "busy"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    slow = (d / "suite.toml").read_text().replace("student_updates = 12", "student_updates = 400")
    (tmp_path / "slow.toml").write_text(slow)
    a = subprocess.Popen([sys.executable, "-m", "bench", "run", str(tmp_path / "slow.toml"), "--out", str(out),
                          "--cache", str(tmp_path / "cache"), "--no-progress"], env=env, cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "config.json").exists():
            assert time.time() < deadline and a.poll() is None, "first run never started"
            time.sleep(0.5)
        before = (out / "config.json").read_bytes()
        r = run("--resume", out)
        assert r.returncode == 2 and "in use by another flashbench process" in r.stderr, r.stderr[-2000:]
        assert (out / "config.json").read_bytes() == before
    finally:
        a.kill()
        a.wait()


def test_nan_in_training_and_in_samples_marks_cells_failed_and_the_suite_goes_on(clean):
    d = clean
    out = d / "nan"
    # cell 0 is the teacher (NaN samples); the flash student's training diverges at update 3
    r = run(d / "suite.toml", "--out", out, "--cache", d / "cache-nan", fault="nan:sample:0,nan:train:3")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {(x["label"], x["nfe"]): x for x in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert rows[("teacher", 2)]["status"] == "failed" and "not finite" in rows[("teacher", 2)]["error"]
    for nfe in (1, 2):
        row = rows[("flash", nfe)]
        assert row["status"] == "failed" and row["failed_step"] == 3 and "diverged" in row["error"]
        assert "fid" not in row
    table = (out / "tables/main.md").read_text()
    assert table.count("failed") >= 3 * 3  # every metric cell of the failed rows says so
