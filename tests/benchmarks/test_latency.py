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
    backbone.new_net().save_pretrained(d / "unet", safe_serialization=True)
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


@pytest.mark.benchmark(group="stages")
def test_stage_text_encoding(benchmark, backbone):
    benchmark(lambda: (backbone.encode_text(TEXT), _sync()))


@pytest.mark.benchmark(group="stages")
def test_stage_guided_network_call(benchmark, backbone):
    from methods.sampling import Denoiser

    d = Denoiser(backbone.net, backbone.schedule)
    x = torch.randn(1, *backbone.sample_shape, device=backbone.device)
    cond, uncond = backbone.encode_text(TEXT), backbone.encode_text([""])
    with torch.no_grad():
        benchmark(lambda: (d.raw_guided(x, 999, cond, uncond, 1.5), _sync()))


@pytest.mark.benchmark(group="stages")
def test_stage_decode(benchmark, backbone):
    x = torch.randn(1, *backbone.sample_shape, device=backbone.device)
    benchmark(lambda: (backbone.to_images(x), _sync()))


@pytest.mark.benchmark(group="loop-vs-pipeline")
def test_our_loop_against_the_diffusers_pipeline(benchmark, tmp_path_factory):
    """The teacher method against StableDiffusionPipeline at equal NFE (DPM-Solver++, 4 guided steps, batch 1):
    the ratio of medians goes into extra_info (``our / pipeline``)."""
    import diffusers

    from bench.latency import time_call
    from methods.backbones import load_dir
    from methods.sampling import make_scheduler, per_sample_noise
    from tests import tiny_sd

    bb = load_dir(tiny_sd.build(tmp_path_factory.mktemp("sd") / "pipe"), DEVICE)
    cls = base.get("teacher")
    m = cls(bb, cls.make_config({"solver": "dpmsolver++"}), base.Context("."))
    pipe = diffusers.StableDiffusionPipeline(
        vae=bb.vae, unet=bb.net, scheduler=make_scheduler("dpmsolver++", bb.scheduler_config), tokenizer=bb.tokenizers[0],
        text_encoder=bb.text_encoders[0], safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    latents = per_sample_noise(KEY, bb.sample_shape, device=DEVICE)
    call = lambda: pipe(TEXT, num_inference_steps=4, guidance_scale=1.5, latents=latents, output_type="pt")  # noqa: E731
    theirs = time_call(lambda: (call(), _sync()), DEVICE, 1, 5)
    with m.unpadded():
        benchmark(lambda: (m.sample(TEXT, KEY, 4), _sync()))
    benchmark.extra_info["pipeline_median_s"] = theirs["median_s"]
    benchmark.extra_info["ratio_ours_over_pipeline"] = benchmark.stats.stats.median / theirs["median_s"]
