"""`flashbench merge` owns its run directory: every input read before --out exists, written whole or not at all (a
failed or killed merge is simply run again), and shards of mixed provenance refused."""

import json
import shutil

import pytest

from tests.test_cli import flashbench_in_process
from tests.test_evaluate import SUITE  # the tiny teacher suite shards are cut from



@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("merge")
    (d / "suite.toml").write_text(SUITE)
    for i in (0, 1):
        code, err = flashbench_in_process("run", d / "suite.toml", "--shard", f"{i}/2", "--out", d / f"s{i}",
                                          "--no-progress", "--cache", d / "cache", cwd=d)
        assert code == 0, err
    return d


def copy_shards(shards, tmp_path):
    for i in (0, 1):
        shutil.copytree(shards / f"s{i}", tmp_path / f"s{i}")
    return [tmp_path / "s0", tmp_path / "s1"]


def merge(tmp_path, *runs, out="merged"):
    return flashbench_in_process("merge", *runs, "--out", tmp_path / out, cwd=tmp_path)


@pytest.mark.parametrize("damage, match", [
    ("cut-values", "cannot be read \\(SafetensorError"),
    ("missing-values", "missing; the shard s1 did not finish cell"),
    ("other-torch", "was made with torch 0.0.1"),
    ("other-gpu", "ran on cuda \\(NVIDIA H200\\), .* on cpu"),
    ("other-student", "was sampled with 2 different students across the shards"),
])
def test_shards_that_do_not_fit_are_refused_before_out_exists(shards, tmp_path, damage, match):
    import re

    s0, s1 = copy_shards(shards, tmp_path)
    (values,) = (s1 / "values").glob("*.safetensors")
    config, rows = json.loads((s1 / "config.json").read_text()), [json.loads(x) for x in (s1 / "results.jsonl").open()]
    if damage == "cut-values":
        values.write_bytes(values.read_bytes()[:100])
    elif damage == "missing-values":
        values.unlink()
    elif damage == "other-torch":
        config["versions"]["torch"] = "0.0.1"
    elif damage == "other-gpu":
        config.update(device="cuda:0", gpu="NVIDIA H200")
    else:  # each shard trained its own student
        rows[0]["train"] = {"checkpoint_sha256": "a" * 64}
        first = [json.loads(x) for x in (s0 / "results.jsonl").open()]
        first[0]["train"] = {"checkpoint_sha256": "b" * 64}
        (s0 / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in first))
    (s1 / "config.json").write_text(json.dumps(config))
    (s1 / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, err = merge(tmp_path, s0, s1)
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(match, err), err
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged*"))


def test_a_killed_or_failed_merge_is_run_again_into_the_same_out(shards, tmp_path):
    """A merge killed mid-way leaves only its hidden staging folder; the next merge into the same --out clears it and
    writes the whole run, equal to an uninterrupted merge."""
    s0, s1 = copy_shards(shards, tmp_path)
    stale = tmp_path / ".merged.partial"
    stale.mkdir()
    (stale / "config.json").write_text("{}")  # what a kill -9 after writing the config leaves
    (stale / ".lock").write_text("12345\n")
    code, err = merge(tmp_path, s0, s1)
    assert code == 0, err
    assert not stale.exists() and (tmp_path / "merged/results.jsonl").exists() and not (tmp_path / "merged/.lock").exists()
    code, err = merge(tmp_path, s0, s1, out="again")
    assert code == 0
    strip = lambda run: [{k: v for k, v in json.loads(x).items() if k not in ("eval_seconds", "metric_seconds")}  # noqa: E731
                         for x in (run / "results.jsonl").read_text().splitlines()]
    assert strip(tmp_path / "merged") == strip(tmp_path / "again")
    code, err = merge(tmp_path, s0, s1)  # a finished run is never overwritten
    assert code == 2 and "already exists" in err


@pytest.mark.parametrize("out", ["a-file", "dangling-link", "under-a-file", "under-a-dangling-link"])
def test_out_that_cannot_be_a_run_directory_is_one_line(shards, tmp_path, out):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "dangling-link").symlink_to(tmp_path / "nowhere")
    target = {"under-a-file": tmp_path / "a-file" / "run",
              "under-a-dangling-link": tmp_path / "dangling-link" / "run"}.get(out, tmp_path / out)
    for args in (["run", shards / "suite.toml", "--out", target, "--no-progress"],
                 ["merge", shards / "s0", shards / "s1", "--out", target]):
        code, err = flashbench_in_process(*args, cwd=tmp_path)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "--out" in err, err
    assert (tmp_path / "a-file").read_text() == "x" and not (tmp_path / "nowhere").exists()
