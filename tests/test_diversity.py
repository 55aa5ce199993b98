"""Diversity (bench/metrics/diversity.py): the Vendi score and pairwise distance pinned to their definitions, a
collapsed sampler told from real renders, and the runner sampling several seeds per prompt (refused where it cannot)."""

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from bench.metrics import diversity
from bench.metrics.cell import CellMetrics
from bench.shapes import world
from prompts import load_prompts
from tests.test_cli import flashbench_in_process


def test_vendi_of_k_identical_items_is_1_and_of_k_orthogonal_items_is_k():
    k = 6
    same = torch.ones(k, 5)
    assert diversity.vendi_score(diversity.cosine_kernel(same)) == pytest.approx(1.0, abs=1e-9)
    assert diversity.mean_pairwise_distance(diversity.cosine_kernel(same)) == pytest.approx(0.0, abs=1e-12)
    ortho = torch.eye(k, 9) * 3.0  # rows mutually orthogonal (any length: the kernel normalises)
    assert diversity.vendi_score(diversity.cosine_kernel(ortho)) == pytest.approx(k, rel=1e-9)
    assert diversity.mean_pairwise_distance(diversity.cosine_kernel(ortho)) == pytest.approx(1.0)


def test_vendi_equals_the_papers_formula_on_random_features():
    """exp(-Σ λ log λ), λ = eig(K/n) (Friedman & Dieng 2023 eq. 2; vendi_score.vendi.score_K), computed by scipy."""
    x = np.random.default_rng(0).normal(size=(7, 4))
    f = x / np.linalg.norm(x, axis=1, keepdims=True)
    lam = scipy.linalg.eigvalsh(f @ f.T / 7)
    lam = lam[lam > 1e-15]
    want = float(np.exp(-(lam * np.log(lam)).sum()))
    assert diversity.vendi_score(diversity.cosine_kernel(torch.from_numpy(x))) == pytest.approx(want, rel=1e-9)
    # two clusters of identical items count as two
    two = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3)
    assert diversity.vendi_score(diversity.cosine_kernel(two)) == pytest.approx(2.0, rel=1e-9)


def test_a_collapsed_sampler_scores_below_real_renders(shapes_eval):
    """Every seed giving the same image (mode collapse) has Vendi 1 and pairwise distance 0; real renders of the same
    prompts vary (nuisance draws), so the ratio to real is below 1 and its CI excludes 1."""
    prompts = load_prompts("shapes-eval")[:6]
    meter = CellMetrics(shapes_eval, prompts, None, ["diversity"], {"diversity": {"prompts": 6, "seeds": 4}})

    def collapsed(texts, keys):
        scene = world.scene_of(next(p for p in prompts if p.text == texts[0]))
        return world.render([scene], variant=0).expand(len(texts), -1, -1, -1)

    assert meter.sample_groups(collapsed, cell_seed=0) == 24
    row = meter.compute([])
    assert row["vendi"] == pytest.approx(1.0, abs=1e-6) and row["pairwise_distance"] == pytest.approx(0.0, abs=1e-6)
    assert row["vendi_real"] > 1.05 and row["vendi_ratio_ci_high"] < 1.0
    assert row["vendi_ci_low"] <= row["vendi"] <= row["vendi_ci_high"]
    proto = meter.protocols()["diversity"]
    assert proto["space"] == "clip" and proto["seeds"] == 4 and proto["sha256"]


def test_the_noise_seeds_of_groups_differ_from_every_cell_seed_and_from_each_other():
    m = diversity.Diversity.__new__(diversity.Diversity)
    m.config = diversity.DiversityConfig(seeds=8)
    a, b = m.noise_seeds(0), m.noise_seeds(1)
    assert len(set(a) | set(b)) == 16 and min(a) >= diversity.GROUP_SEED


SUITE = """
name = "div"
prompts = "shapes-eval"
samples = 8
seeds = [0]
batch_size = 8
[metrics]
clip_score = {}
diversity = { prompts = 2, seeds = 3 }
[[methods]]
name = "teacher"
label = "teacher-ddim"
steps = [1]
settings = { solver = "ddim" }
"""


def test_a_run_samples_the_groups_and_records_the_metrics_cost_and_protocol(tmp_path):
    (tmp_path / "s.toml").write_text(SUITE)
    code, err = flashbench_in_process("run", tmp_path / "s.toml", "--out", tmp_path / "run", "--no-progress",
                                      "--cache", tmp_path / "cache", cwd=tmp_path)
    assert code == 0, err
    (row,) = [json.loads(x) for x in (tmp_path / "run/results.jsonl").read_text().splitlines()]
    assert 1.0 <= row["vendi"] <= 3.0 and 1.0 <= row["vendi_real"] <= 3.0
    assert set(row["metric_seconds"]) >= {"clip_score", "diversity"}
    assert row["protocol"]["metrics"]["diversity"]["prompts"] == 2
    assert row["nfe_counted"] == row["nfe"]  # the extra samples do not move the counted budget per sample
    assert "Vendi" in (tmp_path / "run/tables/metrics.md").read_text()


@pytest.mark.parametrize("args", [["--shard", "0/2"]])
def test_a_shard_refuses_diversity_before_writing(tmp_path, args):
    (tmp_path / "s.toml").write_text(SUITE)
    code, err = flashbench_in_process("run", tmp_path / "s.toml", "--out", tmp_path / "run", *args, cwd=tmp_path)
    assert code == 2 and "diversity" in err and "--shard" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_bad_diversity_settings_are_refused_in_one_line(tmp_path):
    (tmp_path / "s.toml").write_text(SUITE.replace("seeds = 3", "seeds = 1"))
    code, err = flashbench_in_process("run", tmp_path / "s.toml", "--out", tmp_path / "run", cwd=tmp_path)
    assert code == 2 and "seeds" in err and not (tmp_path / "run").exists()
    (tmp_path / "s.toml").write_text(SUITE.replace("prompts = 2", "prompts = 20"))
    code, err = flashbench_in_process("run", tmp_path / "s.toml", "--out", tmp_path / "run", cwd=tmp_path)
    assert code == 2 and "prompts" in err and not (tmp_path / "run").exists()
