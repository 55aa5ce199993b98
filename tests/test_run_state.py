"""Run state that cannot lie: the student cache keyed by the code that trains it, corrupt cache entries retrained."""

import shutil

import pytest
import torch

from methods.student import training_code_sha256
from methods.training import cached_student
from tests.conftest import ROOT


def test_the_student_cache_key_follows_the_code_that_trains_it(tmp_path):
    """A change to a method's training code, or to a module it imports, is another student; a module it does not
    import is not (the same student serves)."""
    src = shutil.copytree(ROOT / "methods", tmp_path / "methods", ignore=shutil.ignore_patterns("__pycache__"))
    h = training_code_sha256("methods.lcm", src)
    assert h == training_code_sha256("methods.lcm", ROOT / "methods")  # by content, wherever the checkout is
    lcm = src / "lcm.py"
    lcm.write_text(lcm.read_text().replace("loss = consistency_loss(f_online", "loss = 0.0 * consistency_loss(f_online"))
    changed = training_code_sha256("methods.lcm", src)
    assert changed != h
    (src / "teacher.py").write_text((src / "teacher.py").read_text() + "\n# the teacher method trains nothing\n")
    assert training_code_sha256("methods.lcm", src) == changed
    (src / "diffusion.py").write_text((src / "diffusion.py").read_text() + "\n# the schedule math it imports\n")
    assert training_code_sha256("methods.lcm", src) != changed


def test_the_cache_stem_holds_the_training_code(tiny, tmp_path, monkeypatch):
    from methods import base, student

    cls = base.get("lcm")
    m = cls(tiny, cls.make_config(cls.smoke_settings()), base.Context(tmp_path, progress=False))
    stem = m.cache_stem(1)
    monkeypatch.setattr(student, "training_code_sha256", lambda module, root=None: "other code")
    assert m.cache_stem(1) != stem


@pytest.mark.parametrize("damage", ["cut", "empty", "not-an-object", "no-info", "weights"])
def test_a_corrupt_cache_entry_is_warned_about_and_retrained(tmp_path, damage):
    trained = []

    def train(ckpt):
        trained.append(1)
        return {"w": torch.arange(4.0)}, {"student_updates": 3}

    got = {}
    assert cached_student(tmp_path, "s", train, got.update)["cached"] is False
    card, weights = tmp_path / "s.json", tmp_path / "s.safetensors"
    if damage == "cut":
        card.write_text(card.read_text()[:20])
    elif damage == "empty":
        card.write_text("")
    elif damage == "not-an-object":
        card.write_text("[1, 2]")
    elif damage == "no-info":
        card.write_text('{"sha256": "00"}')
    else:
        weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.warns(UserWarning, match="ignoring the corrupt cached student s.safetensors"):
        info = cached_student(tmp_path, "s", train, got.update)
    assert info["cached"] is False and len(trained) == 2 and torch.equal(got["w"], torch.arange(4.0))
    assert cached_student(tmp_path, "s", train, got.update)["cached"] is True and len(trained) == 2  # mended


def _parse(**raw):
    from bench import suite as suite_mod

    base = {"prompts": "shapes-eval", "samples": 4, "metrics": ["clip_score"],
            "methods": [{"name": "teacher", "steps": [1]}]}
    return suite_mod.parse({**base, **raw}, "t.toml")


@pytest.mark.parametrize("label", ["../../escaped", "sd-turbo/4step", ".hidden", "a|b", "tab\there", "", "x" * 81, "a "])
def test_labels_that_could_leave_the_run_directory_or_break_a_table_are_refused(label):
    from core.errors import UserError

    with pytest.raises(UserError, match="must be 1-80 letters, digits, spaces and"):
        _parse(methods=[{"name": "teacher", "label": label, "steps": [1]}])


@pytest.mark.parametrize("label", ["teacher-dpm++", "rho=0.25,teacher_steps=1", "imagine-flash lr=5e-5", "sd-turbo (512)"])
def test_the_labels_suites_and_studies_use_are_kept(label):
    assert _parse(methods=[{"name": "teacher", "label": label, "steps": [1]}]).entries[0].label == label


@pytest.mark.parametrize("raw, match", [
    ({"scale": float("nan")}, "scale must be a positive finite number, got nan"),
    ({"scale": float("inf")}, "scale must be a positive finite number, got inf"),
    ({"methods": [{"name": "teacher", "steps": [1], "settings": {"guidance_scale": float("nan")}}]},
     "setting 'guidance_scale' must be a finite number, got nan"),
    ({"train": {"lr": float("inf")}, "methods": [{"name": "lcm", "steps": [1]}]}, "setting 'lr' must be a finite number"),
    ({"train": {"student_update": 3}}, "\\[train\\] 'student_update' is no method's setting; did you mean 'student_updates'"),
])
def test_every_suite_value_is_checked_when_parsed(raw, match):
    from core.errors import UserError

    with pytest.raises(UserError, match=match):
        _parse(**raw)


def test_resume_refuses_what_it_cannot_honour(tmp_path):
    from tests.test_cli import flashbench_in_process

    (tmp_path / "s.toml").write_text('name = "s"\nprompts = "shapes-eval"\nsamples = 4\nbatch_size = 4\n'
                                     'metrics = ["clip_score"]\n[[methods]]\nname = "teacher"\nsteps = [1]\n')
    code, err = flashbench_in_process("run", tmp_path / "s.toml", "--out", tmp_path / "run", "--no-progress",
                                      "--cache", tmp_path / "cache", cwd=tmp_path)
    assert code == 0, err
    before = (tmp_path / "run/results.jsonl").read_text()
    for extra, match in ((["--nfe", "2,4"], "drop --nfe"), (["--samples", "8", "--seeds", "0,1"], "drop --samples, --seeds"),
                         ([tmp_path / "s.toml"], "drop a suite"), (["--device", "cuda"], "was started on cpu")):
        args = ["run", "--resume", tmp_path / "run", "--no-progress"]
        args = args[:1] + extra + args[1:] if extra and not str(extra[0]).startswith("--") else args + extra
        code, err = flashbench_in_process(*args, cwd=tmp_path)
        assert code == 2 and match in err and len(err.strip().splitlines()) == 1, (extra, err)
    code, err = flashbench_in_process("study", "teacher-guidance", "--resume", tmp_path / "run", cwd=tmp_path)
    assert code == 2 and "is a run of 'no study', not of study 'teacher-guidance'" in err, err
    assert (tmp_path / "run/results.jsonl").read_text() == before  # nothing changed


LABELS = ["teacher", "../../escaped", "sd-turbo/4step", ".hidden", "a|b", "rho=0.5,k=1", "x y", "ok-1"]


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def test_random_suites_labels_and_options_never_traceback_nor_write_outside_the_run(fuzz_root):
    """Real runs (not dry runs) of tiny suites with random labels, budgets, sample counts, shards and saved samples:
    exit 0 or a one-line exit 2, and every file written lies in the run directory (or the cache)."""
    import itertools

    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st

    from tests.test_cli import flashbench_in_process

    counter, ran = itertools.count(), []

    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
    @given(label=st.one_of(st.sampled_from(LABELS), st.text(max_size=10)), steps=st.sampled_from([1, 1, 2, 0]),
           samples=st.sampled_from([2, 3, 1, 0]), shard=st.sampled_from([None, "0/2", "1/2", "2/2", "1/0"]),
           save=st.booleans(), solver=st.sampled_from(["ddim", "euler", "nosuch"]))
    @example(label="rho=0.5,k=1", steps=1, samples=3, shard="1/2", save=True, solver="ddim")  # runs, and writes
    @example(label="x y", steps=1, samples=2, shard=None, save=True, solver="euler")
    @example(label="../../escaped", steps=1, samples=2, shard="0/2", save=True, solver="ddim")
    def run(label, steps, samples, shard, save, solver):
        work = fuzz_root / f"w{next(counter)}"
        work.mkdir()
        suite = work / "s.toml"
        import json

        suite.write_text(f'name = "fuzz"\nprompts = "shapes-eval"\nsamples = {samples}\nbatch_size = 2\n'
                         f'metrics = ["clip_score"]\n[[methods]]\nname = "teacher"\nlabel = {json.dumps(label)}\n'
                         f'steps = [{steps}]\nsettings = {{ solver = "{solver}" }}\n')
        args = ["run", suite, "--out", work / "out" / "run", "--no-progress", "--cache", fuzz_root / "cache"]
        args += (["--shard", shard] if shard else []) + (["--save-samples"] if save else [])
        before = {p for p in work.rglob("*")}
        code, err = flashbench_in_process(*args, cwd=work)
        assert code in (0, 2) and "Traceback" not in err, (label, code, err[-800:])
        new = {p for p in work.rglob("*")} - before
        if code == 2:
            assert len(err.strip().splitlines()) == 1 and not new, (label, err, new)
        else:
            ran.append(label)
            assert all(p == work / "out" or p.is_relative_to(work / "out" / "run") for p in new), (label, new)

    run()
    assert len(ran) >= 2  # the property was checked on real runs, not only on refusals
