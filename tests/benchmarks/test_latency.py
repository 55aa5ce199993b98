"""Latency benchmarks (pytest-benchmark): `pytest -m bench tests/benchmarks --benchmark-only`.

Never timed assertions: pytest-benchmark stores the timings (per machine / GPU model) and
`--benchmark-compare --benchmark-compare-fail=median:15%` turns a slowdown into a failure.
What is timed is a whole sample call at batch 1 (text encoding, noise, every network evaluation,
decode), as in the runner's latency columns.
"""

import os

import pytest
import torch

from methods import base

pytestmark = pytest.mark.bench
DEVICE = os.environ.get("FLASHBENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
TEXT, KEY = ["a large red circle at the top left and a small blue square at the bottom right"], [("bench", 0)]


@pytest.fixture(scope="module")
def backbone():
    from bench.shapes.teacher import ShapesBackbone

    return ShapesBackbone.load(DEVICE)


@pytest.fixture(scope="module")
def student(backbone, tmp_path_factory):
    """A 1-NFE-per-step sampler over a teacher-sized UNet (latency does not depend on its weights)."""
    d = tmp_path_factory.mktemp("ckpt")
    backbone.new_unet().save_pretrained(d / "unet", safe_serialization=True)
    cls = base.get("pretrained")
    return cls(backbone, cls.make_config({"kind": "lightning", "path": str(d / "unet"), "max_steps": 8}),
               base.Context(d, progress=False))


def _sync():
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


@pytest.mark.parametrize("steps", [1, 4, 25])
def test_teacher_dpmpp_guided_batch1(benchmark, backbone, steps):
    cls = base.get("teacher")
    m = cls(backbone, cls.make_config({"solver": "dpmsolver++"}), base.Context("."))
    with m.unpadded():
        benchmark(lambda: (m.sample(TEXT, KEY, steps), _sync()))


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_student_batch1(benchmark, student, steps):
    with student.unpadded():
        benchmark(lambda: (student.sample(TEXT, KEY, steps), _sync()))


def test_student_4step_throughput_batch32(benchmark, student):
    texts, keys = TEXT * 32, [("bench", i) for i in range(32)]
    with student.unpadded():
        benchmark.pedantic(lambda: (student.sample(texts, keys, 4), _sync()), rounds=5, warmup_rounds=1)
