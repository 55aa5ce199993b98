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
