"""The real-scale path as deep as the embedded one, on a tiny random SDXL pipeline on the CPU: a bf16 run, a
run split in two shards and merged (equal to one run), saved samples re-scored by `flashbench evaluate`
(equal to the run), training data as users have it, latency by stage, the GPU check's tiny mode."""

import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

from tests import tiny_sd
from tests.conftest import ROOT
from tests.test_cli import flashbench
from tests.test_faults import comparable

SUITE = """
name = "sdxl"
prompts = "{caps}"
samples = 6
batch_size = 4
grid = 4
metrics = ["fid", "clip_score", "latency"]
[latency]
warmup = 1
repeats = 2
throughput_batch = 2
[backbone]
kind = "diffusers"
path = "{pipe}"
train_data = "{data}"
train_workers = 0
{extra}
[evaluators]
kind = "real"
inception_dir = "{inc}"
clip_model = "local-dir:{clip}"
reference = "{ref}"
[[methods]]
name = "teacher"
label = "teacher"
nfe = [2, 4]
[[methods]]
name = "lcm"
label = "lcm"
steps = [1]
settings = {{ student_updates = 2, batch_size = 2 }}
"""


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale")
    tiny_sd.real_fixtures(d)
    tiny_sd.build(d / "sdxl", sdxl=True)
    (d / "caps.txt").write_text("\n".join(f"a photo of object {i}" for i in range(6)) + "\n")
    tiny_sd.image_folder(d / "data", 8)
    return d


def suite(fx, name: str, extra: str = "") -> str:
    path = fx / f"{name}.toml"
    path.write_text(SUITE.format(caps=fx / "caps.txt", pipe=fx / "sdxl", data=fx / "data", inc=fx / "inception",
                                 clip=fx / "clip", ref=fx / "ref16", extra=extra))
    return path


def run(*args, cwd=None):
    r = flashbench(*args, "--no-progress", cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def one(fx):
    run("run", suite(fx, "one"), "--out", fx / "one", "--cache", fx / "cache", "--save-samples")
    return fx / "one"


def rows(run_dir):
    return [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_shards_merged_equal_one_run(fx, one):
    for i in (0, 1):
        run("run", suite(fx, "one"), "--shard", f"{i}/2", "--out", fx / f"shard{i}", "--cache", fx / "cache")
    assert all(r["status"] == "shard" for r in rows(fx / "shard1"))
    run("merge", fx / "shard1", fx / "shard0", "--out", fx / "merged", "--cache", fx / "cache")
    assert comparable(fx / "merged") == comparable(one)  # bit for bit: every metric, CI and protocol field
    assert (fx / "merged" / "grids" / "teacher_nfe2.png").read_bytes() == (one / "grids" / "teacher_nfe2.png").read_bytes()


def test_merge_refuses_what_is_not_one_run(fx, one):
    r = flashbench("merge", one, "--out", fx / "nope")
    assert r.returncode == 2 and "is not a shard" in r.stderr


@pytest.mark.slow
def test_saved_samples_rescored_equal_the_run(fx, one):
    assert (one / "samples" / "teacher_nfe2" / "00000" / "samples" / "0000.png").is_file()
    run("evaluate", one / "samples", suite(fx, "one"), "--out", fx / "scored", "--cache", fx / "cache")
    ours = {(r["label"], r["nfe"]): r for r in rows(one)}
    for r in rows(fx / "scored"):
        o = ours[(r["label"], r["nfe"])]
        assert r["protocol"]["id"] == o["protocol"]["id"]  # the same protocol: `compare` accepts them
        for k in ("fid", "fid_ci_low", "fid_ci_high", "clip_score", "clip_score_ci_low", "saturation"):
            assert r[k] == o[k], k


@pytest.mark.slow
def test_a_bf16_run(fx):
    run("run", suite(fx, "bf16", 'dtype = "bf16"'), "--methods", "teacher", "--out", fx / "bf16", "--cache", fx / "cache")
    rs = rows(fx / "bf16")
    assert all(r["status"] == "ok" and r["fid"] >= 0 for r in rs)
    assert rs[0]["protocol"]["dtype"]["teacher"] == "bf16" and rs[0]["protocol"]["teacher"]["dtype"] == "bf16"


def test_latency_by_stage_and_memory_in_rows_and_a_table(fx, one):
    r = [x for x in rows(one) if x["label"] == "teacher"][0]
    stages = r["latency_text_ms"] + r["latency_denoise_ms"] + r["latency_decode_ms"]
    assert r["latency_text_ms"] > 0 and r["latency_decode_ms"] > 0 and r["latency_step_ms"] > 0
    assert abs(stages - r["latency_ms"]) < 0.25 * r["latency_ms"]
    assert r["peak_rss_mb"] > 0
    assert "ms/step" in (one / "tables" / "latency.md").read_text()


def test_training_data_as_users_have_it(fx, tmp_path):
    """Folder and tar shards, aspect-preserving resize + centre crop, SDXL micro-conditioning, deterministic keys."""
    from PIL import Image

    from methods.training_data import TrainingData

    folder = tmp_path / "folder"
    folder.mkdir()
    meta = []
    for i, (w, h) in enumerate([(40, 20), (20, 30), (16, 16), (33, 17)]):
        Image.new("RGB", (w, h), (i * 60, 0, 0)).save(folder / f"{i}.png")
        meta.append(json.dumps({"file_name": f"{i}.png", "text": f"image {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(meta) + "\n")
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for i in range(4):
            tar.add(folder / f"{i}.png", arcname=f"{i:03d}.png")
            (tmp_path / f"{i}.txt").write_text(f"image {i}")
            tar.add(tmp_path / f"{i}.txt", arcname=f"{i:03d}.txt")
    a = TrainingData(folder, 16, workers=0)(4, 0)
    b = TrainingData(tmp_path / "shard-0.tar", 16, workers=0)(4, 0)
    c = TrainingData(folder, 16, workers=2)(4, 0)
    assert a[0].shape == (4, 3, 16, 16) and a[1] == ["image 0", "image 1", "image 2", "image 3"]
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and torch.equal(a[0], c[0])  # layouts and workers agree
    assert a[2][0].tolist() == [20, 40, 0, 8]  # original (h, w) = (20, 40): resized to 16x32, crop left 8
    data = TrainingData(folder, 16, workers=0)
    first = data(2, 5)
    data(2, 6)  # streams on
    assert torch.equal(data(2, 5)[0], first[0])  # any key again: the same batch


def test_sdxl_micro_conditioning_reaches_the_unet(fx):
    from methods.backbones import load_dir

    bb = load_dir(fx / "sdxl")
    plain = bb.encode_text(["a cat"])
    micro = bb.encode_text(["a cat"], torch.tensor([[20, 40, 0, 8]]))
    r = bb.resolution
    assert plain.added["time_ids"].tolist() == [[r, r, 0, 0, r, r]]
    assert micro.added["time_ids"].tolist() == [[20, 40, 0, 8, r, r]]


def test_the_gpu_check_runs_tiny_on_the_cpu(tmp_path):
    """`bash scripts/gpu-check.sh --dry-run` as a fresh clone runs it: every step, tiny, on the CPU."""
    env = {k: v for k, v in os.environ.items() if k != "PY"}
    env.update(PYTHONPATH=str(ROOT), PY=sys.executable, OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", "scripts/gpu-check.sh", "--dry-run"], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=900)
    assert r.returncode == 0, (r.stdout[-1500:], r.stderr[-3000:])
    assert "collectives: backend gloo, world 2" in r.stdout and ": ok" in r.stdout
    for name in ("sdxl", "flux1-dev"):
        assert f"| {name} | 25 |" in r.stdout and f"| {name} | 2 |" in r.stdout  # latency rows, memory vs plan
    assert r.stderr.count("\tok\t") == 4, r.stderr[-2000:]
