"""The GPU regression gate on small fake run directories (no suite is run): per-device references filed
under a key, tier (a) sample checks, tier (b) distribution windows, and the main-branch latency history."""

import contextlib
import io
import json
import shutil

import numpy as np
import pytest

from bench.cli import main
from bench.results import images, reference

CELLS = (("teacher", 2), ("student", 1))
KEY = "smoke--cpu--torch-2.14.1--diffusers-0.42.1"


def flashbench(*args) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `flashbench ARGS`, in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def samples(label: str, nfe: int, k: int = 16, size: int = 16) -> np.ndarray:
    """A cell's k 8-bit samples [k, H, W, 3]: smooth colour blobs, a function of the cell only."""
    rng = np.random.default_rng([len(label), nfe])
    yy, xx = np.mgrid[:size, :size] / size
    out = np.empty((k, size, size, 3))
    for i in range(k):
        cy, cx, r = rng.uniform(0.2, 0.8, 3)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.05 + 0.1 * r))
        out[i] = rng.uniform(0, 0.3, 3) + blob[..., None] * rng.uniform(0.3, 0.7, 3)
    return (out.clip(0, 1) * 255).round().astype(np.uint8)


def write_grid(run, label, nfe, imgs: np.ndarray) -> None:
    """The grid as `flashbench run` writes it (bench.runner.save_grid)."""
    import torch

    from bench.runner import save_grid

    save_grid(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255, images.grid_path(run, label, nfe))


def fake_run(path, *, device="cpu", gpu=None, torch_version="2.14.1", protocol="p1", shift=0.0, latency_ms=10.0):
    """A finished run of suite "smoke": two cells, seeds 0 and 1, metrics, latencies and grids (k = 16)."""
    path.mkdir(parents=True)
    config = {"suite": {"name": "smoke", "grid": 16, "seeds": [0, 1]}, "prompts": {"n": 200}, "device": device,
              "git": "0" * 40, "versions": {"torch": torch_version, "diffusers": "0.42.1", "python": "3.11.7"}}
    if gpu:
        config["gpu"] = gpu
    (path / "config.json").write_text(json.dumps(config))
    rows = [{"label": label, "nfe": nfe, "seed": seed, "status": "ok", "protocol": {"id": protocol},
             "fid": 20.0 / nfe + 0.1 * seed + shift, "clip_score": 40.0 + nfe + 0.2 * seed, "accuracy": 0.5 + 0.01 * seed,
             "latency_ms": latency_ms * nfe}
            for label, nfe in CELLS for seed in (0, 1)]
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for label, nfe in CELLS:
        write_grid(path, label, nfe, samples(label, nfe))
    return path


@pytest.fixture
def run(tmp_path):
    return fake_run(tmp_path / "run")


@pytest.fixture
def store(tmp_path, run):
    """A store holding `run` as the reference of its key."""
    code, out, err = flashbench("baseline", run, "--store", tmp_path / "store")
    assert code == 0, err
    return tmp_path / "store"


def rewrite_rows(run, edit) -> None:
    rows = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    (run / "results.jsonl").write_text("".join(json.dumps(edit(r) or r) + "\n" for r in rows))


# --- tier (a): grids and SSIM ---------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5, 16])
def test_grid_samples_are_recovered_exactly_from_save_grid(tmp_path, k):
    imgs = samples("x", 3, k=k)
    write_grid(tmp_path, "x", 3, imgs)
    got = images.grid_samples(images.grid_path(tmp_path, "x", 3), k)
    assert got.dtype == np.uint8 and np.array_equal(got, imgs)


def test_ssim_identity_symmetry_and_closed_form():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
    y = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
    assert images.ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    assert images.ssim(x, y) == pytest.approx(images.ssim(y, x), abs=1e-12) and images.ssim(x, y) < 0.5
    # one 7×7 window, y = x + c: equal variances and covariance, so SSIM = (2 μ (μ + c) + C1) / (μ² + (μ + c)² + C1)
    x7 = rng.integers(0, 200, (7, 7, 1)).astype(np.uint8)
    mu, c, c1 = x7.mean(), 40.0, (0.01 * 255) ** 2
    want = (2 * mu * (mu + c) + c1) / (mu**2 + (mu + c) ** 2 + c1)
    assert images.ssim(x7, x7 + np.uint8(c)) == pytest.approx(want, rel=1e-12)
    # y = x / 2: μ_y = μ/2, σ_y² = σ²/4, σ_xy = σ²/2 with σ² the sample variance (ddof 1, as scikit-image)
    xe = 2 * rng.integers(0, 120, (7, 7, 1)).astype(np.uint8)
    mu, var, c2 = xe.mean(), xe.var(ddof=1), (0.03 * 255) ** 2
    want = (mu**2 + c1) / (1.25 * mu**2 + c1) * (var + c2) / (1.25 * var + c2)
    assert images.ssim(xe, xe // 2) == pytest.approx(want, rel=1e-12)


# --- per-device references: keys and bootstrap ------------------------------------------------------


def test_bootstrap_files_the_keyed_reference_and_passes(tmp_path, run):
    store = tmp_path / "store"
    code, out, err = flashbench("compare", run, "--store", store)  # no reference, no --bootstrap: says so, exit 2
    assert code == 2 and f"no reference for {KEY}" in err and err.count("\n") == 1 and not store.exists()
    code, out, err = flashbench("compare", run, "--store", store, "--bootstrap")
    assert code == 0 and out.startswith("notice: no reference for") and "bootstrap" in out
    meta = json.loads((store / KEY / "reference.json").read_text())
    assert meta["key"] == {"suite": "smoke", "device": "cpu", "torch": "2.14.1", "diffusers": "0.42.1"}
    assert meta["images"]["threshold"] == reference.IMAGE_THRESHOLD
    assert sorted(p.name for p in (store / KEY / "grids").iterdir()) == ["student_nfe1.png", "teacher_nfe2.png"]
    assert set(json.loads((store / KEY / "tolerances.json").read_text())["cells"]) == {"teacher|nfe=2", "student|nfe=1"}
    code, out, err = flashbench("compare", run, "--store", store, "--bootstrap")  # now it exists: compared, not filed
    assert code == 0 and "**PASS**" in out and "notice" not in out


def test_a_run_compared_with_itself_passes_both_tiers(run, store):
    code, out, err = flashbench("compare", run, "--store", store)
    assert code == 0, out + err
    assert "**PASS**" in out and out.count("| ok |") == 2 + 2 * 3  # 2 cells in tier (a), 2 × 3 metrics in (b)
    assert "| teacher|nfe=2 | 16 | 1.000000 |" in out and (run / "compare.md").read_text() + "\n" == out


def test_gpu_runs_are_keyed_by_gpu_model(tmp_path):
    cuda = fake_run(tmp_path / "cuda", device="cuda")
    code, _, err = flashbench("baseline", cuda, "--store", tmp_path / "s")  # no GPU name recorded, none given
    assert code == 2 and "--device-class" in err and not (tmp_path / "s").exists()
    code, out, err = flashbench("baseline", cuda, "--store", tmp_path / "s", "--device-class", "NVIDIA H200")
    assert code == 0, err
    assert (tmp_path / "s" / "smoke--nvidia-h200--torch-2.14.1--diffusers-0.42.1" / "reference.json").exists()
    named = fake_run(tmp_path / "named", device="cuda", gpu="NVIDIA H200")  # a config that names its GPU
    assert reference.run_key(named).device == "nvidia-h200"
    code, _, err = flashbench("compare", named, "--store", tmp_path / "s", "--device-class", "NVIDIA A100")
    assert code == 2 and "'NVIDIA H200'" in err


def test_different_keys_or_protocols_are_refused(tmp_path, run, store):
    ref = store / KEY
    other = fake_run(tmp_path / "other-torch", torch_version="2.15.0")
    code, out, err = flashbench("compare", ref, other)
    assert code == 2 and "torch-2.15.0" in err and "torch-2.14.1" in err and not (other / "compare.md").exists()
    code, out, err = flashbench("compare", other, "--store", store)  # its own key has none: said, not compared
    assert code == 2 and "no reference for smoke--cpu--torch-2.15.0" in err and KEY in err
    gpu = fake_run(tmp_path / "gpu", device="cuda", gpu="NVIDIA H200")
    code, _, err = flashbench("compare", ref, gpu)
    assert code == 2 and "nvidia-h200" in err
    prot = fake_run(tmp_path / "protocol", protocol="p2")
    code, _, err = flashbench("compare", ref, prot)
    assert code == 2 and "another protocol" in err


def test_baseline_store_refuses_to_replace_and_bootstrap_keeps(tmp_path, run, store):
    before = (store / KEY / "reference.json").read_text()
    code, _, err = flashbench("baseline", run, "--store", store)
    assert code == 2 and "already exists" in err
    code, out, _ = flashbench("baseline", run, "--store", store, "--bootstrap")
    assert code == 0 and "already has a reference" in out and (store / KEY / "reference.json").read_text() == before


def test_bad_settings_exit_2_before_anything_is_written(tmp_path, run):
    for bad in ("0", "1.5", "nan"):
        code, _, err = flashbench("baseline", run, "--store", tmp_path / "s", "--image-threshold", bad)
        assert code == 2 and "--image-threshold" in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()
    code, _, err = flashbench("compare", run, "--bootstrap")
    assert code == 2 and "--store" in err
    one_seed = fake_run(tmp_path / "one-seed")
    rewrite_rows(one_seed, lambda r: {**r, "status": "failed"} if r["seed"] == 1 else r)
    code, _, err = flashbench("compare", one_seed, "--store", tmp_path / "s", "--bootstrap")
    assert code == 2 and ">= 2 seeds" in err and not list((tmp_path / "s").glob("*"))


# --- tier (a): perturbed samples ----------------------------------------------------------------------


def test_one_perturbed_sample_fails_tier_a(tmp_path, run, store):
    bad = tmp_path / "perturbed"
    shutil.copytree(run, bad)
    imgs = samples("student", 1)
    imgs[5, :8, :8] = 255 - imgs[5, :8, :8]  # one sample of one cell: a corner inverted
    write_grid(bad, "student", 1, imgs)
    code, out, err = flashbench("compare", bad, "--store", store)
    assert code == 1, out + err
    assert "| student|nfe=1 | 16 |" in out and "| 5 | **differs** |" in out and out.count("**differs**") == 1
    assert "tier (a) samples differ" in out and "tier (b)" not in out.split("**FAIL")[1]


def test_quantisation_noise_passes_tier_a_and_a_missing_grid_fails(tmp_path, run, store):
    noisy = tmp_path / "noisy"
    shutil.copytree(run, noisy)
    imgs = samples("teacher", 2).astype(int)
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 16, (40, 3))
    imgs[idx[:, 0], idx[:, 1], idx[:, 2]] += rng.choice([-1, 1], (40, 1))  # ±1 level on 40 pixels of the cell
    write_grid(noisy, "teacher", 2, imgs.clip(0, 255).astype(np.uint8))
    code, out, _ = flashbench("compare", noisy, "--store", store)
    assert code == 0 and "**PASS**" in out
    assert "| teacher|nfe=2 | 16 | 1.000000" not in out  # the noise was seen, and is within the threshold
    (noisy / "grids" / "teacher_nfe2.png").unlink()
    code, out, _ = flashbench("compare", noisy, "--store", store)
    assert code == 1 and "**missing grid**" in out


# --- tier (b): distribution windows -------------------------------------------------------------------


def test_a_metric_shift_beyond_its_window_fails_tier_b(tmp_path, run, store):
    tol = json.loads((store / KEY / "tolerances.json").read_text())["cells"]["student|nfe=1"]["fid"]
    assert tol == pytest.approx(3 * 0.1 / np.sqrt(2))  # K · std over the two seeds (above the 0.05 floor)
    within = fake_run(tmp_path / "within", shift=0.8 * tol)
    code, out, _ = flashbench("compare", within, "--store", store)
    assert code == 0 and "**PASS**" in out
    beyond = fake_run(tmp_path / "beyond", shift=1.2 * tol)  # FID worse (higher) in every cell
    code, out, _ = flashbench("compare", beyond, "--store", store)
    assert code == 1 and out.count("**regression**") == 2 and "| student|nfe=1 | fid |" in out
    assert "tier (b) regression" in out and "tier (a)" not in out.split("**FAIL")[1]
    better = fake_run(tmp_path / "better", shift=-1.2 * tol)
    code, out, _ = flashbench("compare", better, "--store", store)
    assert code == 0 and out.count("| better |") == 2


# --- latency: the main-branch history -----------------------------------------------------------------


def latency_gate(run, hist, *extra):
    return flashbench("latency-gate", run, "--history", hist, *extra)


def test_latency_regresses_only_beyond_both_limits(tmp_path):
    hist = tmp_path / "hist"
    assert latency_gate(fake_run(tmp_path / "m0", latency_ms=10.0), hist, "--main")[0] == 0  # teacher cell: 20 ms
    # 20 ms -> 26 ms: +6 ms and +30 %: beyond both
    code, out, _ = latency_gate(fake_run(tmp_path / "slow", latency_ms=13.0), hist)
    assert code == 1 and "| teacher|nfe=2 | 1 | 20.00 | 26.00 | +6.00 ms (+30 %) | **slower** |" in out
    # +17.5 %: 20 -> 23.5 ms (+3.5 ms) fails; 10 -> 11.75 ms (+1.75 ms: beyond the relative limit only) passes
    code, out, _ = latency_gate(fake_run(tmp_path / "r", latency_ms=11.75), hist)
    assert code == 1 and out.count("**slower**") == 1 and "| student|nfe=1 | 1 | 10.00 | 11.75 | +1.75 ms (+18 %) | ok |" in out
    # the same run with the limits moved: beyond only the absolute one (20 %), beyond only the relative one (4 ms)
    assert latency_gate(tmp_path / "r", hist, "--max-slower-pct", "20")[0] == 0
    assert latency_gate(tmp_path / "r", hist, "--max-slower-ms", "4")[0] == 0


def test_history_appends_only_with_main_and_the_median_uses_only_those(tmp_path):
    hist = tmp_path / "hist"
    path = hist / f"{KEY}.jsonl"
    code, out, _ = latency_gate(fake_run(tmp_path / "first", latency_ms=10.0), hist)
    assert code == 0 and "| 0 | — | 20.00 | — | new |" in out and not path.exists()  # no history: new, passes
    for i in range(3):
        assert latency_gate(fake_run(tmp_path / f"main{i}", latency_ms=10.0), hist, "--main")[0] == 0
    for i in range(4):  # pull requests, much slower: compared, never appended
        assert latency_gate(fake_run(tmp_path / f"pr{i}", latency_ms=30.0), hist)[0] == 1
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [e["run"] for e in lines] == ["main0", "main1", "main2"] and lines[0]["latency_ms"]["teacher|nfe=2"] == 20.0
    # the median is still 20 ms (with the PR runs in it, it would be 60 ms and 26 ms would pass)
    code, out, _ = latency_gate(fake_run(tmp_path / "check", latency_ms=13.0), hist)
    assert code == 1 and "| teacher|nfe=2 | 3 | 20.00 | 26.00 |" in out
    # only the last --window entries count
    for i in range(2):
        latency_gate(fake_run(tmp_path / f"fast{i}", latency_ms=5.0), hist, "--main")
    code, out, _ = latency_gate(tmp_path / "check", hist, "--window", "2")
    assert code == 1 and "| teacher|nfe=2 | 2 | 10.00 | 26.00 |" in out


def test_latency_history_is_per_key_and_bad_input_is_refused(tmp_path):
    hist = tmp_path / "hist"
    latency_gate(fake_run(tmp_path / "cpu", latency_ms=10.0), hist, "--main")
    gpu = fake_run(tmp_path / "gpu", device="cuda", gpu="NVIDIA H200", latency_ms=50.0)
    code, out, _ = latency_gate(gpu, hist, "--main")
    assert code == 0 and "History: 0 run(s)" in out  # another key: another file, not compared with the CPU's
    assert sorted(p.name for p in hist.iterdir()) == [f"{KEY}.jsonl", "smoke--nvidia-h200--torch-2.14.1--diffusers-0.42.1.jsonl"]
    before = (hist / f"{KEY}.jsonl").read_text()
    (hist / f"{KEY}.jsonl").write_text(before + "{not json\n")
    code, _, err = latency_gate(tmp_path / "cpu", hist, "--main")
    assert code == 2 and f"{KEY}.jsonl:2" in err and (hist / f"{KEY}.jsonl").read_text() == before + "{not json\n"
    for flag, value in (("--window", "0"), ("--max-slower-pct", "-1"), ("--max-slower-ms", "nan")):
        code, _, err = latency_gate(tmp_path / "cpu", tmp_path / "h2", flag, value, "--main")
        assert code == 2 and flag in err and not (tmp_path / "h2").exists()


def test_pytest_benchmark_medians_are_gated_as_cells(tmp_path):
    hist, bench = tmp_path / "hist", tmp_path / "bench.json"

    def benchmark(seconds):
        bench.write_text(json.dumps({"benchmarks": [{"name": "test_student_batch1[1]", "stats": {"median": seconds}}]}))
        return bench

    run = fake_run(tmp_path / "run")
    assert latency_gate(run, hist, "--main", "--benchmark-json", benchmark(0.010))[0] == 0
    code, out, _ = latency_gate(run, hist, "--benchmark-json", benchmark(0.013))
    assert code == 1 and "| bench:test_student_batch1[1] | 1 | 10.00 | 13.00 |" in out
    bench.write_text("{}")
    code, _, err = latency_gate(run, hist, "--benchmark-json", bench)
    assert code == 2 and "pytest-benchmark" in err
