"""The teacher's training objective pieces (the full training is `flashbench train-teacher`)."""

import pytest
import torch

from bench.shapes import world
from methods.diffusion import Schedule
from methods.diffusion import eps_loss_weight
from bench.shapes.teacher import TextEncoder, tokenize
from bench.shapes.train_teacher import CaptionParser


def test_loss_weights():
    snr = Schedule.scaled_linear().snr(torch.tensor([999, 500, 10])).float()
    w = eps_loss_weight(snr, "min-snr", 5.0)
    assert w[0] == 1.0 and w[1] == 1.0 and torch.isclose(w[2], 5.0 / snr[2])
    x0w = eps_loss_weight(snr, "x0-truncated", 5.0) * snr  # the weight on ‖x̂_0 − x_0‖²
    assert torch.allclose(x0w, torch.clamp(snr, 1.0, 5.0))
    with pytest.raises(ValueError):
        eps_loss_weight(snr, "nope", 5.0)


def test_caption_parser_targets_come_from_the_caption_only():
    scenes = world.scenes("train", 0, 6)
    states = TextEncoder()(tokenize([s.caption for s in scenes])[0])
    parser = CaptionParser()
    keep = torch.tensor([True, True, False, True, True, True])
    loss = parser.loss(states, scenes, keep)
    loss.backward()
    assert torch.isfinite(loss) and parser.slots.grad is not None


@pytest.mark.slow
def test_training_resumes_to_the_same_weights(tmp_path):
    """A teacher training killed after a checkpoint and resumed exports the same weights (sha256)."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = ("import sys; sys.path.insert(0, {root!r}); from bench.shapes.train_teacher import *; "
            "train_teacher(TeacherTrainConfig(steps=4, batch_size=4, ckpt_every=2, warmup=1), sys.argv[1], progress=False)")
    run = lambda out, fault=None: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code.format(root=str(ROOT)), str(out)], capture_output=True, text=True, timeout=600,
        env={**os.environ, "FLASHBENCH_FAULT": fault or ""})
    assert run(tmp_path / "clean").returncode == 0
    assert run(tmp_path / "killed", "kill:teacher:3").returncode == -signal.SIGKILL
    assert (tmp_path / "killed" / "teacher-train.ckpt.safetensors").exists()
    r = run(tmp_path / "killed")
    assert r.returncode == 0, r.stderr[-2000:]
    card = lambda d: json.loads((tmp_path / d / "teacher.json").read_text())  # noqa: E731
    assert card("clean")["sha256"] == card("killed")["sha256"]
