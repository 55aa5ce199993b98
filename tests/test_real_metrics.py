"""Every preference and distribution metric in one tiny real-scale run (issue 19): a random SD pipeline, clean-fid's
Inception, an open_clip model, DINOv2, HPSv2, PickScore, ImageReward and the LAION aesthetic predictor, all random-weight
stand-ins of the real architectures saved in the real file layouts, through `flashbench run --save-samples`: every
metric's columns and CI in the row, its protocol block and weights' sha256, its wall time, tables/metrics.md, and the
samples in GenEval's folder layout. Offline; nothing is downloaded or trained.

In process, not a subprocess: the stand-ins' open_clip architectures (HPSv2's, the aesthetic predictor's CLIP) are
registered in this interpreter by ``open_clip.add_model_config``, as a user's real ViT-H-14 / ViT-L-14 are built in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import geneval
from bench.metrics import registry
from bench.metrics.preference import RewardMLP
from tests import tiny_sd
from tests.test_cli import flashbench_in_process
from tests.test_distribution import tiny_dinov2
from tests.test_preference import image_reward_stand_in, tiny_clip_processor, tiny_open_clip, tiny_pickscore_config

SAMPLES = 8
TEXTS = [f"a photo of object {c}" for c in "abcdefgh"]
DISTRIBUTION = ["fid", "clip_score", "kid", "cmmd", "fd_dinov2", "prdc"]
PREFERENCE = ["hpsv2", "pickscore", "image_reward", "aesthetic"]
WEIGHTED = {"kid", "cmmd", "fd_dinov2", "prdc", *PREFERENCE}  # those whose protocol block names their weights

SUITE = """
name = "allmetrics"
prompts = "{caps}"
samples = {n}
batch_size = 4
grid = 4
[backbone]
kind = "diffusers"
path = "{pipe}"
[evaluators]
kind = "real"
inception_dir = "{inc}"
clip_model = "local-dir:{clip}"
reference = "{ref}"
dinov2 = "{dinov2}"
[metrics]
fid = {{}}
clip_score = {{}}
kid = {{ subsets = 5 }}
cmmd = {{}}
fd_dinov2 = {{}}
prdc = {{ nearest_k = 3 }}
hpsv2 = {{ path = "{hps}", model = "{hps_model}" }}
pickscore = {{ path = "{pick}", processor = "{pick_proc}" }}
image_reward = {{ path = "{ir}", med_config = "{ir_med}", tokenizer = "{ir_tok}" }}
aesthetic = {{ path = "{aes}", clip_pretrained = "{aes_clip}", clip_model = "{aes_model}" }}
[[methods]]
name = "teacher"
label = "teacher"
nfe = [2]
"""


def hpsv2_weights(d: Path) -> dict:
    """HPS_v2.1_compressed.pt's layout: {"state_dict": the whole open_clip model}, of a tiny open_clip architecture."""
    import open_clip

    d.mkdir(parents=True)
    name = tiny_open_clip(d, "flashbench-e2e-tiny-hps")
    torch.manual_seed(0)
    torch.save({"state_dict": open_clip.create_model(name, pretrained=None).state_dict()}, d / "HPS_v2.1_compressed.pt")
    return {"hps": d / "HPS_v2.1_compressed.pt", "hps_model": name}


def pickscore_weights(d: Path) -> dict:
    """PickScore_v1's layout (a transformers CLIPModel directory) and laion's CLIP processor directory."""
    from transformers import CLIPModel

    d.mkdir(parents=True)
    vocab = tiny_clip_processor(d / "processor")
    torch.manual_seed(0)
    cfg = tiny_pickscore_config(vocab)
    CLIPModel(cfg).save_pretrained(d / "PickScore_v1")
    return {"pick": d / "PickScore_v1", "pick_proc": d / "processor"}


def image_reward_weights(d: Path) -> dict:
    """ImageReward.pt (BLIP's ViT and BERT names + the MLP head), med_config.json and a bert-base-uncased tokenizer."""
    ir = image_reward_stand_in(d, TEXTS)
    return {"ir": ir["path"], "ir_med": ir["med_config"], "ir_tok": ir["tokenizer"]}


def aesthetic_weights(d: Path) -> dict:
    """sac+logos+ava1-l14-linearMSE.pth (the MLP) on a QuickGELU open_clip model saved as open_clip_pytorch_model.bin."""
    import open_clip

    d.mkdir(parents=True)
    name = tiny_open_clip(d, "flashbench-e2e-tiny-l14-quickgelu", quick_gelu=True)
    torch.manual_seed(0)
    torch.save(open_clip.create_model(name, pretrained=None).state_dict(), d / "open_clip_pytorch_model.bin")
    torch.save(RewardMLP(16).state_dict(), d / "sac+logos+ava1-l14-linearMSE.pth")
    return {"aes": d / "sac+logos+ava1-l14-linearMSE.pth", "aes_clip": d / "open_clip_pytorch_model.bin",
            "aes_model": name}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("allmetrics")
    tiny_sd.real_fixtures(d)  # sd/, inception/, clip/, ref16/ (8 reference images)
    (d / "caps.txt").write_text("\n".join(TEXTS) + "\n")
    paths = {"caps": d / "caps.txt", "pipe": d / "sd", "inc": d / "inception", "clip": d / "clip", "ref": d / "ref16",
             "dinov2": tiny_dinov2(d / "dinov2"), **hpsv2_weights(d / "hps"), **pickscore_weights(d / "pick"),
             **image_reward_weights(d / "ir"), **aesthetic_weights(d / "aes")}
    (d / "suite.toml").write_text(SUITE.format(n=SAMPLES, **paths))
    code, err = flashbench_in_process("run", d / "suite.toml", "--out", d / "run", "--save-samples", "--no-progress",
                                      "--cache", d / "cache", cwd=d)
    assert code == 0, err[-3000:]
    return d / "run"


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines()]


def columns(name: str) -> list[dict]:
    return list(registry.declared()[name]["columns"])


def test_every_metric_in_the_row_with_its_ci_protocol_and_time(run):
    (row,) = rows(run)
    assert row["status"] == "ok" and row["label"] == "teacher" and row["nfe"] == 2 and row["n_samples"] == SAMPLES
    for name in DISTRIBUTION + PREFERENCE:
        for col in columns(name):
            k = col["key"]
            assert isinstance(row.get(k), float), (name, k, row.get(k))
            assert row[f"{k}_ci_low"] <= row[k] <= row[f"{k}_ci_high"], (name, k)
        assert name in row["metric_seconds"] and row["metric_seconds"][name] >= 0, name
    blocks = row["protocol"]["metrics"]
    for name in WEIGHTED:
        assert name in blocks, name
        sha = blocks[name].get("weights_sha256") or blocks[name].get("sha256")
        assert isinstance(sha, str) and len(sha) == 64, (name, blocks[name])
    assert blocks["fd_dinov2"]["space"] == "dinov2" and blocks["cmmd"]["space"] == "clip"
    assert blocks["prdc"]["nearest_k"] == 3
    for name in ("pickscore", "image_reward", "aesthetic"):  # their other files are hashed too
        assert all(len(v) == 64 for k, v in blocks[name].items() if k.endswith("_sha256")), name
    # the preference scores of random weights: finite, and in the range each definition allows
    assert -1 <= row["hpsv2"] <= 1 and abs(row["pickscore"]) <= torch.e ** 3 + 1e-6
    assert row["kid_subset_std"] >= 0 and 0 <= row["precision"] <= 1 and 0 <= row["coverage"] <= 1


def test_metrics_table_has_every_column(run):
    table = (run / "tables" / "metrics.md").read_text()
    for name in ["kid", "cmmd", "fd_dinov2", "prdc", *PREFERENCE]:
        for col in columns(name):
            assert col["header"] in table, (name, col["header"])
    assert "teacher" in table


def test_samples_in_genevals_folder_layout(run):
    (row,) = rows(run)
    cell = run / "samples" / "teacher_nfe2"
    assert json.loads((cell / "cell.json").read_text())["nfe"] == 2
    seed = row["seed"]
    for i in range(SAMPLES):
        assert (cell / f"{i:05d}" / "metadata.jsonl").is_file()
        assert (cell / f"{i:05d}" / "samples" / f"{seed:04d}.png").is_file()
    layout = geneval.read_layout(cell)
    assert [p.relative_to(cell).as_posix() for p, _ in layout] == [f"{i:05d}/samples/{seed:04d}.png"
                                                                   for i in range(SAMPLES)]
    assert [m["prompt"] for _, m in layout] == TEXTS
    from PIL import Image

    with Image.open(layout[0][0]) as im:
        assert im.mode == "RGB" and im.size == (16, 16)  # the tiny pipeline's 16 px samples, lossless
