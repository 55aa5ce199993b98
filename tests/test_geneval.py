"""GenEval (bench/geneval.py, bench/metrics/geneval.py): its rules on constructed detections against hand-computed
answers, its folder layout as the official scorer reads it, a transformers detector and an open_clip colour judge
from tiny random weights saved locally, and the metric end to end with a stub detector through the interface."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench import geneval
from bench.geneval import Detection, evaluate, kept, relative_position
from bench.metrics import registry
from core.errors import UserError
from prompts import Prompt
from prompts.loaders import load_geneval
from tests.conftest import DATA

METADATA = DATA / "geneval_evaluation_metadata.jsonl"


def box(x0, y0, x1, y1, label="x", score=0.99):
    return Detection(label, (x0, y0, x1, y1), score)


@pytest.fixture(scope="module")
def lines():
    return [json.loads(line) for line in METADATA.read_text().splitlines()]


@pytest.fixture(scope="module")
def first_of_tag(lines):
    """tag -> index of its first prompt in the metadata file."""
    out = {}
    for i, rec in enumerate(lines):
        out.setdefault(rec["tag"], i)
    return out


# --- the rules -------------------------------------------------------------------------------------------------------

def test_relative_position_by_hand():
    a = (0, 0, 10, 10)
    # centres 50 apart on x, sizes 10+10: shrunk offset 50 - 0.1·20 = 48, over |offset| 50 = 0.96 > 0.5
    assert relative_position(a, (50, 0, 60, 10)) == {"left of"}
    assert relative_position((50, 0, 60, 10), a) == {"right of"}
    assert relative_position(a, (0, 50, 10, 60)) == {"above"}  # image y grows downwards
    assert relative_position((0, 50, 10, 60), a) == {"below"}
    # 11 apart: (11 - 2) / 11 = 0.82 -> left of; 1 apart: max(1 - 2, 0) = 0 -> no relation at all
    assert relative_position(a, (11, 0, 21, 10)) == {"left of"}
    assert relative_position(a, (1, 0, 11, 10)) == set()
    # the diagonal: (30 - 2) / (30·√2) = 0.66 on both axes -> two relations
    assert relative_position(a, (30, 30, 40, 40)) == {"left of", "above"}
    # offset (-30, -10), shrunk (-28, -8), over √1000 = 31.6: dx = -0.89, dy = -0.25 -> only "left of"
    assert relative_position(a, (30, 10, 40, 20)) == {"left of"}


def test_iou_uses_inclusive_pixels():
    assert geneval.compute_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert geneval.compute_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)  # 5·10 over 100+100-50
    assert geneval.compute_iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0


def test_kept_thresholds_order_and_cap():
    dets = [box(0, 0, 1, 1, "clock", s) for s in (0.5, 0.95, 0.2, 0.91, 0.3)]
    assert [d.score for d in kept(dets, "counting")["clock"]] == [0.95, 0.91]  # > 0.9
    assert [d.score for d in kept(dets, "single_object")["clock"]] == [0.95, 0.91, 0.5]  # > 0.3, not >= 0.3
    many = [box(0, 0, 1, 1, "cup", 0.5 + i / 100) for i in range(20)]
    assert len(kept(many, "two_object")["cup"]) == geneval.MAX_OBJECTS == 16
    assert kept([box(0, 0, 1, 1, "cup", 0.1)], "colors") == {}  # nothing kept: the class is absent


def no_colours(found, cls):
    raise AssertionError("no colour asked")


def test_single_and_two_object(lines, first_of_tag):
    single, two = lines[first_of_tag["single_object"]], lines[first_of_tag["two_object"]]
    a, b = (c["class"] for c in two["include"])
    assert evaluate({single["include"][0]["class"]: [box(0, 0, 5, 5)]}, single, no_colours) == (True, "")
    assert evaluate({}, single, no_colours) == (False, f"expected {single['include'][0]['class']}>=1, found 0")
    assert evaluate({a: [box(0, 0, 5, 5)], b: [box(9, 9, 19, 19)]}, two, no_colours)[0]
    ok, reason = evaluate({a: [box(0, 0, 5, 5)]}, two, no_colours)
    assert not ok and reason == f"expected {b}>=1, found 0"


def test_counting_off_by_one(lines, first_of_tag):
    meta = lines[first_of_tag["counting"]]  # "a photo of two clocks": include clock >= 2, exclude clock >= 3
    cls, n = meta["include"][0]["class"], meta["include"][0]["count"]
    assert n == 2 and meta["exclude"] == [{"class": cls, "count": 3}]

    def verdict(scores):
        return evaluate(kept([box(10 * i, 0, 10 * i + 5, 5, cls, s) for i, s in enumerate(scores)], "counting"),
                        meta, no_colours)

    assert verdict([0.95, 0.93]) == (True, "")
    assert verdict([0.95]) == (False, f"expected {cls}>=2, found 1")
    assert verdict([0.95, 0.93, 0.92]) == (False, f"expected {cls}<3, found 3")
    assert verdict([0.95, 0.93, 0.85])[0]  # the third is under the counting threshold 0.9: not counted


def test_colour(lines, first_of_tag):
    meta = lines[first_of_tag["colors"]]  # "a photo of a blue fire hydrant"
    cls, colour = meta["include"][0]["class"], meta["include"][0]["color"]
    objs = {cls: [box(0, 0, 5, 5, cls)]}
    assert evaluate(objs, meta, lambda found, c: [colour] * len(found)) == (True, "")
    ok, reason = evaluate(objs, meta, lambda found, c: ["red"] * len(found))
    assert not ok and reason == f"expected {colour} {cls}>=1, found 0 {colour}; and 1 red"


def test_position_left_vs_right(lines, first_of_tag):
    meta = lines[first_of_tag["position"]]  # "a photo of a dog right of a teddy bear"
    target, mover = meta["include"][0]["class"], meta["include"][1]["class"]
    rel = meta["include"][1]["position"][0]
    assert rel == "right of"
    left, right = box(0, 0, 10, 10), box(50, 0, 60, 10)
    assert evaluate({target: [left], mover: [right]}, meta, no_colours) == (True, "")
    ok, reason = evaluate({target: [right], mover: [left]}, meta, no_colours)
    assert not ok and reason == f"expected {mover} right of target, found left of target"
    ok, reason = evaluate({mover: [right]}, meta, no_colours)  # no target: its clause failed first
    assert not ok and reason.splitlines() == [f"expected {target}>=1, found 0", f"no target for {mover} to be right of"]


def test_colour_binding(lines, first_of_tag):
    meta = lines[first_of_tag["color_attr"]]  # "a photo of a purple wine glass and a black apple"
    (a, ca), (b, cb) = ((c["class"], c["color"]) for c in meta["include"])
    objs = {a: [box(0, 0, 5, 5, a)], b: [box(9, 9, 19, 19, b)]}
    assert evaluate(objs, meta, lambda found, c: [{a: ca, b: cb}[c]] * len(found))[0]
    ok, reason = evaluate(objs, meta, lambda found, c: [{a: cb, b: ca}[c]] * len(found))  # colours swapped
    assert not ok and len(reason.splitlines()) == 2


def test_summary_is_the_mean_over_tasks():
    s = geneval.summary(["single_object", "single_object", "counting", "counting", "counting", "position"],
                        [1, 0, 1, 1, 0, 0])
    assert s == pytest.approx({"overall": (1 / 2 + 2 / 3 + 0) / 3, "single_object": 0.5, "counting": 2 / 3,
                               "position": 0.0})
    assert s["overall"] != pytest.approx(3 / 6)  # not the share of correct images


# --- the folder layout -----------------------------------------------------------------------------------------------

def official_reads(folder: Path) -> list[tuple[str, dict]]:
    """What evaluate_images.py's main() reads: digit-named folders, json.load of metadata.jsonl, r"\\d+\\.png"."""
    out = []
    for sub in sorted(folder.iterdir()):
        if not sub.is_dir() or not sub.name.isdigit():
            continue
        with open(sub / "metadata.jsonl") as fp:
            meta = json.load(fp)
        for name in sorted(p.name for p in (sub / "samples").iterdir()):
            if (sub / "samples" / name).is_file() and re.match(r"\d+\.png", name):
                out.append((f"{sub.name}/samples/{name}", meta))
    return out


def test_layout_is_genevals(tmp_path, lines):
    prompts = load_geneval(METADATA)[:3]
    img = np.zeros((8, 8, 3), np.uint8)
    for i, p in enumerate(prompts):
        for k in range(2):
            geneval.write_sample(tmp_path, i, k, img + k, geneval.record(p))
    (tmp_path / "cell.json").write_text("{}")  # what a run keeps beside them: the scorer skips it
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["00000/metadata.jsonl", "00000/samples/0000.png", "00000/samples/0001.png",
                     "00001/metadata.jsonl", "00001/samples/0000.png", "00001/samples/0001.png",
                     "00002/metadata.jsonl", "00002/samples/0000.png", "00002/samples/0001.png", "cell.json"]
    read = official_reads(tmp_path)
    assert [m for _, m in read] == [lines[i] for i in (0, 0, 1, 1, 2, 2)]  # each folder: its line of the file
    assert list(read[0][1]) == list(lines[0])  # and its key order
    assert (tmp_path / "00000/metadata.jsonl").read_text().count("\n") == 1
    assert [(str(p.relative_to(tmp_path)), m) for p, m in geneval.read_layout(tmp_path)] == read


def test_run_samples_are_in_genevals_layout(tmp_path, lines):
    """--save-samples writes each cell's folder so the official scorer reads it (flashbench's fields ride along)."""
    from bench.runner import SampleSaver

    ctx = SimpleNamespace(rundir=SimpleNamespace(path=tmp_path), backbone=SimpleNamespace(identity=lambda: {}))
    entry = SimpleNamespace(label="lcm", name="lcm", variant=None, train_seed=None, settings={})
    cell = SimpleNamespace(entry=entry, budget=SimpleNamespace(steps=4, nfe=4), seed=3)
    SampleSaver(ctx, cell).save(0, load_geneval(METADATA)[:2], torch.rand(2, 3, 8, 8))
    read = official_reads(tmp_path / "samples" / "lcm_nfe4")
    assert [path for path, _ in read] == ["00000/samples/0003.png", "00001/samples/0003.png"]
    for (_, meta), line in zip(read, lines):
        assert {k: v for k, v in meta.items() if k != "flashbench"} == line


# --- the models, from local weights ----------------------------------------------------------------------------------

def tiny_detr(folder: Path) -> Path:
    """A random-weight DETR with a two-stage ResNet, saved as save_pretrained lays out a real one."""
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                            out_features=["stage2"])
    labels = ["bench", "clock", "dog"]
    cfg = DetrConfig(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False, d_model=16,
                     encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                     encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=5, id2label=dict(enumerate(labels)),
                     label2id={k: i for i, k in enumerate(labels)})
    torch.manual_seed(0)
    DetrForObjectDetection(cfg).save_pretrained(folder)
    DetrImageProcessor(size={"shortest_edge": 32, "longest_edge": 64}).save_pretrained(folder)
    return folder


def tiny_clip(folder: Path) -> str:
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in open_clip.CLIP(**cfg).state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder}"


def test_transformers_detector_from_a_local_folder(tmp_path):
    det = geneval.TransformersDetector(tiny_detr(tmp_path / "detr"))
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    found = det(image)
    assert len(found) == 5  # one per query; the rules apply the thresholds
    for d in found:
        assert d.label in {"bench", "clock", "dog"} and 0 <= d.score <= 1
        assert -1 <= d.box[0] <= d.box[2] <= 49 and -1 <= d.box[1] <= d.box[3] <= 41
    assert det(image) == found  # deterministic
    assert det.identity()["sha256"] == geneval.weights_hash(tmp_path / "detr")


def test_open_clip_colour_judge_from_a_local_folder(tmp_path):
    from PIL import Image

    judge = geneval.OpenClipColourJudge(tiny_clip(tmp_path / "clip"))
    crops = [Image.new("RGB", (12, 9), c) for c in ("red", "blue", "#999")]
    got = judge(crops, "fire hydrant")
    assert len(got) == 3 and set(got) <= set(geneval.COLORS)
    assert judge(crops[:1], "fire hydrant") == got[:1]  # a crop's colour does not depend on the others
    assert judge.classifier("fire hydrant").shape == (16, len(geneval.COLORS))


def test_crop_paints_outside_the_mask_grey():
    from PIL import Image

    image = Image.new("RGB", (10, 10), (255, 0, 0))
    mask = np.zeros((10, 10), bool)
    mask[2:4, 2:4] = True
    c = np.asarray(geneval.crop(image, Detection("x", (2, 2, 6, 6), 1.0, mask)))
    assert c.shape == (4, 4, 3) and tuple(c[0, 0]) == (255, 0, 0) and tuple(c[3, 3]) == (0x99, 0x99, 0x99)
    assert tuple(np.asarray(geneval.crop(image, box(2, 2, 6, 6)))[3, 3]) == (255, 0, 0)  # no mask: as it is


# --- the metric, end to end ------------------------------------------------------------------------------------------

PALETTE = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 160, 0), "black": (0, 0, 0)}


class LegendDetector(geneval.Detector):
    """A stub: every exact RGB of legend.json in its folder is one object (label, score), boxed where it is painted."""

    def __init__(self, folder, device="cpu"):
        self.legend = {tuple(json.loads(k)): v for k, v in json.loads((Path(folder) / "legend.json").read_text()).items()}

    def __call__(self, image):
        out = []
        for rgb, (label, score) in self.legend.items():
            ys, xs = np.nonzero((image == rgb).all(-1))
            if len(xs):
                out.append(Detection(label, (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), score))
        return out


class MeanColourJudge(geneval.ColourJudge):
    """A stub: the PALETTE colour nearest the crop's mean RGB."""

    def __init__(self, model, weights=None, device="cpu"):
        pass

    def __call__(self, crops, classname):
        means = [np.asarray(c, np.float64).reshape(-1, 3).mean(0) for c in crops]
        return [min(PALETTE, key=lambda n: np.abs(np.subtract(PALETTE[n], m)).sum()) for m in means]


def paint(objects: list[tuple[tuple, tuple]], size=64) -> torch.Tensor:
    """float [3, size, size]: grey, with each (rgb, (x0, y0, x1, y1)) filled."""
    img = np.full((size, size, 3), 153, np.uint8)
    for rgb, (x0, y0, x1, y1) in objects:
        img[y0:y1, x0:x1] = rgb
    return torch.from_numpy(img).permute(2, 0, 1).float() / 255


@pytest.fixture
def stubs(monkeypatch, tmp_path):
    monkeypatch.setitem(geneval.DETECTORS, "legend", LegendDetector)
    monkeypatch.setitem(geneval.COLOUR_JUDGES, "mean", MeanColourJudge)
    legend = {"[0, 0, 255]": ["fire hydrant", 0.8], "[90, 60, 30]": ["bench", 0.6], "[1, 1, 1]": ["clock", 0.95],
              "[2, 2, 2]": ["clock", 0.97], "[3, 3, 3]": ["clock", 0.93], "[200, 200, 0]": ["dog", 0.9],
              "[120, 80, 40]": ["teddy bear", 0.9]}
    (tmp_path / "legend.json").write_text(json.dumps(legend))
    (tmp_path / "clip").mkdir()
    return {"detector": str(tmp_path), "detector_kind": "legend", "colour_model": f"local-dir:{tmp_path / 'clip'}",
            "colour_kind": "mean"}


def test_metric_end_to_end(stubs, first_of_tag):
    cls = registry.get("geneval")
    all_prompts = load_geneval(METADATA)
    tags = ("single_object", "counting", "colors", "position")
    prompts = [all_prompts[first_of_tag[t]] for t in tags]
    assert [p.text for p in prompts] == ["a photo of a bench", "a photo of two clocks",
                                         "a photo of a blue fire hydrant", "a photo of a dog right of a teddy bear"]
    images = torch.stack([
        paint([((90, 60, 30), (10, 10, 40, 30))]),  # a bench: right
        paint([((1, 1, 1), (0, 0, 8, 8)), ((2, 2, 2), (20, 0, 28, 8)), ((3, 3, 3), (40, 0, 48, 8))]),  # 3 clocks: wrong
        paint([((0, 0, 255), (20, 20, 40, 50))]),  # a blue fire hydrant: right
        paint([((200, 200, 0), (0, 20, 15, 40)), ((120, 80, 40), (45, 20, 60, 40))]),  # the dog left of the bear: wrong
    ])
    config = cls.make_config(stubs, "geneval")
    cls.check(prompts, "suite", "real", config)
    metric = cls(SimpleNamespace(device="cpu"), prompts, config=config)
    metric.update(images[:3], prompts[:3])
    metric.update(images[3:], prompts[3:])
    assert metric.local()[:, 0].tolist() == [1, 0, 1, 0]
    row = metric.compute(metric.local())
    assert row["geneval"] == 0.5 and row["geneval_ci_low"] == row["geneval_ci_high"] == 0.5  # one prompt a task
    assert [row[f"geneval_{t}"] for t in tags] == [1, 0, 1, 0]
    assert "geneval_two_object" not in row
    one_batch = cls(SimpleNamespace(device="cpu"), prompts, config=config)
    one_batch.update(images, prompts)
    assert torch.equal(one_batch.local(), metric.local())
    # the same verdicts from the saved PNGs, as the official scorer would read them
    folder = Path(stubs["detector"]) / "out"
    for i, (p, img) in enumerate(zip(prompts, images)):
        png = (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        geneval.write_sample(folder, i, 0, png, geneval.record(p))
    from PIL import Image

    det, judge = LegendDetector(stubs["detector"]), MeanColourJudge("")
    assert [geneval.score_image(np.asarray(Image.open(path)), meta, det, judge).correct
            for path, meta in geneval.read_layout(folder)] == [True, False, True, False]


def test_metric_bootstrap_is_stratified_by_task():
    cls = registry.get("geneval")
    metric = cls.__new__(cls)
    tags = [0] * 50 + [4] * 30
    correct = [1.0] * 40 + [0.0] * 10 + [1.0] * 6 + [0.0] * 24
    row = metric.compute(torch.tensor([correct, tags], dtype=torch.float64).T)
    assert row["geneval_single_object"] == 0.8 and row["geneval_position"] == 0.2 and row["geneval"] == 0.5
    for key in ("geneval", "geneval_single_object", "geneval_position"):
        assert row[f"{key}_ci_low"] < row[key] < row[f"{key}_ci_high"]
    assert row == metric.compute(torch.tensor([correct, tags], dtype=torch.float64).T)  # fixed resamples


def test_check_refuses_in_one_line(stubs, tmp_path):
    cls = registry.get("geneval")
    geneval_prompts = load_geneval(METADATA)[:3]
    shapes = [Prompt("s-1", "a large red circle at the top left")]
    with pytest.raises(UserError, match="geneval needs GenEval prompts.*s-1"):
        cls.check(shapes, "suite", "real", cls.make_config(stubs, "geneval"))
    with pytest.raises(UserError, match="detector = .* is not a folder"):
        cls.check(geneval_prompts, "suite", "real", cls.make_config({**stubs, "detector": str(tmp_path / "no")}, "x"))
    with pytest.raises(UserError, match="unknown geneval detector_kind 'mask2former'"):
        cls.check(geneval_prompts, "suite", "real", cls.make_config({**stubs, "detector_kind": "mask2former"}, "x"))
    colours = [p for p in load_geneval(METADATA) if dict(p.meta)["tag"] == "colors"][:1]
    no_clip = {**stubs, "colour_model": "ViT-L-14", "colour_weights": str(tmp_path / "missing.bin")}
    cls.check(geneval_prompts, "suite", "real", cls.make_config(no_clip, "x"))  # no colour asked: no CLIP needed
    with pytest.raises(UserError, match="colour tasks need a local CLIP"):
        cls.check(colours, "suite", "real", cls.make_config(no_clip, "x"))
    with pytest.raises(UserError) as e:
        cls.check(shapes, "suite", "real", None)
    assert "\n" not in str(e.value)


def test_suite_settings_reach_check_and_tables_read_the_columns(stubs):
    """A suite's [metrics.geneval] table goes through the shared metric check; the columns are declared for the
    tables (read from source) and kept out of the main table."""
    from bench import components, specs

    prompts = load_geneval(METADATA)[:2]
    components.check_metrics(["geneval"], prompts, "geneval.jsonl", "real", {"geneval": stubs})
    with pytest.raises(UserError, match="is not a folder"):
        components.check_metrics(["geneval"], prompts, "geneval.jsonl", "real", {"geneval": {"detector": "/no"}})
    keys = ["geneval", *(f"geneval_{t}" for t in geneval.TAGS)]
    assert all(specs.SPECS[k].direction == "higher" for k in keys)
    assert not set(keys) & set(specs.MAIN_COLUMNS)
