"""`flashbench evaluate` on saved samples as runs and shards write them: one shard's folder (its prompt folders start
at its global index), several shards' folders together, and inputs that do not fit refused before --out exists."""

import json
import re
import shutil

import pytest

from tests.test_cli import flashbench_in_process

SUITE = """
name = "tiny"
prompts = "shapes-eval"
samples = 10
seeds = [0]
batch_size = 10
metrics = ["clip_score", "accuracy"]
[[methods]]
name = "teacher"
label = "teacher-ddim"
steps = [1]
settings = { solver = "ddim" }
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaluate")
    (d / "suite.toml").write_text(SUITE)
    for args in (["--out", d / "whole"], ["--shard", "0/2", "--out", d / "shard0"], ["--shard", "1/2", "--out", d / "shard1"]):
        code, err = flashbench_in_process("run", d / "suite.toml", "--save-samples", "--no-progress", "--cache",
                                          d / "cache", *args, cwd=d)
        assert code == 0, err
    return d


def rows(run):
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]


def test_one_shards_samples_are_scored(runs):
    """Shard 1 of 2 saved prompts 00005..00009: its folder alone is scored (5 samples)."""
    d = runs
    assert sorted(p.name for p in (d / "shard1/samples/teacher-ddim_nfe2").iterdir() if p.is_dir())[0] == "00005"
    code, err = flashbench_in_process("evaluate", d / "shard1/samples", d / "suite.toml", "--out", d / "scored1", cwd=d)
    assert code == 0, err
    (row,) = rows(d / "scored1")
    assert row["n_samples"] == 5 and row["label"] == "teacher-ddim" and row["nfe"] == 2


def test_every_shards_samples_together_equal_the_whole_run(runs):
    d = runs
    code, err = flashbench_in_process("evaluate", d / "shard0/samples", d / "shard1/samples", d / "suite.toml",
                                      "--out", d / "scored", cwd=d)
    assert code == 0, err
    (got,), (want,) = rows(d / "scored"), rows(d / "whole")
    assert got["n_samples"] == 10
    for k in ("clip_score", "clip_score_ci_low", "accuracy", "acc_color"):
        assert got[k] == pytest.approx(want[k], rel=1e-6), k


@pytest.mark.parametrize("damage, match", [
    ("gap", "miss 1 \\(first 00003\\)"),
    ("twice", "is in both"),
    ("truncated-png", "not a readable image"),
    ("missing-png", "no sample 0000.png"),
    ("bad-metadata", "expected one JSON object"),
    ("odd-size", "is 32x32, .* is 16x16; one cell's samples share a size"),
])
def test_samples_that_do_not_fit_are_refused_before_out_exists(runs, tmp_path, damage, match):
    d = runs
    shutil.copytree(d / "shard0/samples", tmp_path / "a")
    shutil.copytree(d / "shard1/samples", tmp_path / "b")
    cell = tmp_path / "a" / "teacher-ddim_nfe2"
    folders = [tmp_path / "a", tmp_path / "b"]
    if damage == "gap":
        shutil.rmtree(cell / "00003")
    elif damage == "twice":
        folders.append(tmp_path / "a")
    elif damage == "truncated-png":
        png = cell / "00002/samples/0000.png"
        png.write_bytes(png.read_bytes()[:40])
    elif damage == "missing-png":
        (cell / "00002/samples/0000.png").unlink()
    elif damage == "odd-size":
        from PIL import Image

        png = cell / "00002/samples/0000.png"
        Image.open(png).resize((32, 32)).save(png)
    else:
        (cell / "00001/metadata.jsonl").write_text("{not json\n")
    code, err = flashbench_in_process("evaluate", *folders, d / "suite.toml", "--out", tmp_path / "out", cwd=tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(match, err), err
    assert not (tmp_path / "out").exists()


def test_a_stray_png_is_ignored_and_a_mended_folder_scores_into_the_same_out(runs, tmp_path):
    """An editor's backup copy beside a sample is not a seed; after a refusal, fixing the input and running the same
    command again writes the run (nothing was left at --out)."""
    d = runs
    shutil.copytree(d / "whole/samples", tmp_path / "s")
    cell = tmp_path / "s" / "teacher-ddim_nfe2"
    shutil.copy(cell / "00000/samples/0000.png", cell / "00000/samples/0000 (copy).png")
    good = (cell / "00003/samples/0000.png").read_bytes()
    (cell / "00003/samples/0000.png").write_bytes(good[:60])
    args = ("evaluate", tmp_path / "s", d / "suite.toml", "--out", tmp_path / "out")
    code, err = flashbench_in_process(*args, cwd=tmp_path)
    assert code == 2 and not (tmp_path / "out").exists()
    (cell / "00003/samples/0000.png").write_bytes(good)
    code, err = flashbench_in_process(*args, cwd=tmp_path)
    assert code == 0, err
    (row,) = [json.loads(x) for x in (tmp_path / "out/results.jsonl").read_text().splitlines()]
    assert row["n_samples"] == 10 and row["seed"] == 0
