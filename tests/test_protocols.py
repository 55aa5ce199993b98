"""Paper protocols (bench/protocols.py): the COCO draws and their paired references, the GigaGAN/DMD2 crop and
resize, the protocol hash, the FID bootstrap (closed-form coverage, Gram = direct), CLIP score through open_clip's
own transform, refusals before anything is written, and tiny runs under coco2014-30k and teacher-fid.

Everything is built here: a synthetic COCO captions file and its images, a tiny SD pipeline, a random-weight
stand-in for clean-fid's Inception and a tiny open_clip model (tests/tiny_sd.py)."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from bench import protocols, provenance
from bench.metrics import fid
from bench.metrics.bootstrap import BOOTSTRAP_SEED, index_chunks
from core.errors import UserError
from prompts.coco import draw_mlperf, draw_seeded, load_coco_captions
from tests import tiny_sd
from tests.conftest import DATA
from tests.test_cli import flashbench_in_process

SIZES = [(24, 16), (16, 24), (20, 20), (30, 18), (18, 26)]  # (width, height): landscape, portrait and square


def coco(root, n_images: int = 12, captions: int = 5, seed: int = 0):
    """A COCO captions file (ids and captions in scrambled file order) and its images, of mixed sizes and modes."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    ids = rng.permutation(np.arange(100, 100 + 7 * n_images, 7))
    (root / "val2014").mkdir(parents=True, exist_ok=True)
    for k, i in enumerate(ids):
        w, h = SIZES[k % len(SIZES)]
        name = f"COCO_val2014_{int(i):012d}.{'jpg' if k % 2 else 'png'}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "val2014" / name)
        images.append({"id": int(i), "file_name": name, "width": w, "height": h})
        anns += [{"id": int(i) * 10 + c, "image_id": int(i), "caption": f"image {int(i)} caption {c}\n"}
                 for c in range(captions)]
    anns = [anns[j] for j in rng.permutation(len(anns))]
    path = root / "captions_val2014.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


# --- the draws ---------------------------------------------------------------------------------------------------------


def test_coco_draw_is_seeded_and_pairs_prompts_with_their_images(tmp_path):
    images = load_coco_captions(coco(tmp_path))
    a, b = draw_seeded(images, 8), draw_seeded(images, 8)
    assert a == b  # same seed, same draw
    assert [p.id for p in draw_seeded(images, 8, seed=1)] != [p.id for p in a]  # the seed matters
    assert draw_seeded(images, 5) == a[:5]  # a smaller draw is the start of the larger
    assert len({p.id for p in a}) == 8 and [p.id for p in a] != sorted(p.id for p in a)  # distinct images, shuffled
    by_id = {im.id: im for im in images}
    for p in a:
        meta = dict(p.meta)
        image = by_id[int(meta["image_id"])]
        assert p.id == f"coco2014-{image.id}" and meta["file_name"] == image.file_name  # the prompt's own image
        assert (int(meta["caption_id"]), p.text) in [(c, t.strip()) for c, t in image.captions]  # one of its captions
        assert (int(meta["width"]), int(meta["height"])) == Image.open(tmp_path / "val2014" / image.file_name).size
    assert len({dict(p.meta)["caption_id"][-1] for p in draw_seeded(images, 12)}) > 1  # not always the first caption
    with pytest.raises(UserError, match="cannot draw 13"):
        draw_seeded(images, 13)


def test_mlperf_draw_is_the_mlcommons_pandas_code(tmp_path):
    """draw_mlperf equals mlcommons/inference text_to_image/tools/coco.py's pandas steps, run here on the same file."""
    import pandas as pd

    path = coco(tmp_path, n_images=30)
    raw = json.loads(path.read_text())
    df = pd.DataFrame(raw["annotations"]).drop_duplicates(subset=["image_id"], keep="first").sort_values(by=["id"])
    df = df.sample(frac=1, random_state=2023).reset_index(drop=True).iloc[:10]
    df["caption"] = df["caption"].apply(lambda x: x.replace("\n", "").strip())
    df = df.merge(pd.DataFrame(raw["images"]), how="inner", left_on="image_id", right_on="id").drop(
        ["id_y"], axis=1).rename(columns={"id_x": "id"}).sort_values(by=["id"]).reset_index(drop=True)
    ours = draw_mlperf(load_coco_captions(path), 10)
    assert [(int(dict(p.meta)["caption_id"]), p.text, dict(p.meta)["file_name"]) for p in ours] == \
        list(zip(df["id"], df["caption"], df["file_name"]))


# --- preprocessing -----------------------------------------------------------------------------------------------------


def test_centre_crop_and_resize_match_a_hand_computation():
    from bench.real import centre_crop_resize

    h, w = 6, 11
    x = np.stack([*np.meshgrid(np.arange(w) * 20, np.arange(h) * 40), np.full((h, w), 7)], -1).astype(np.uint8)
    # the largest centred square: 6 columns starting at round((11 - 6) / 2) = round(2.5) = 2 (Python rounds to even)
    assert np.array_equal(centre_crop_resize(x, None), x[:, 2:8])
    tall = x.transpose(1, 0, 2)  # 11 x 6: rows 2..7
    assert np.array_equal(centre_crop_resize(tall, None), tall[2:8])
    # then PIL's LANCZOS to the preset's size (GigaGAN / DMD2: image.resize((s, s), Image.LANCZOS))
    want = np.asarray(Image.fromarray(x[:, 2:8]).resize((3, 3), Image.LANCZOS))
    assert np.array_equal(centre_crop_resize(x, 3), want) and want.shape == (3, 3, 3)
    flat = np.full((5, 9, 3), 90, np.uint8)
    assert np.array_equal(centre_crop_resize(flat, 4), np.full((4, 4, 3), 90, np.uint8))


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    d = tmp_path_factory.mktemp("protocols")
    tiny_sd.real_fixtures(d)
    coco(d / "coco")
    return d


def evaluators(fx, protocol: str, **extra):
    from bench.components import load_evaluators

    prompts = extra.pop("prompts", None)
    spec = {"kind": "real", "inception_dir": str(fx / "inception"), "clip_model": f"local-dir:{fx / 'clip'}",
            "protocol": protocol, **extra}
    return load_evaluators(spec, "cpu", prompts)


def test_coco_evaluators_crop_real_and_generated_images_alike(fx):
    """The FID features of a non-square image are clean-fid's of its centre crop resized to 256 (coco2014-30k)."""
    from bench.real import centre_crop_resize

    images = load_coco_captions(fx / "coco" / "captions_val2014.json")
    prompts = draw_seeded(images, 4)
    ev = evaluators(fx, "coco2014-30k", annotations="x", images=str(fx / "coco" / "val2014"), prompts=prompts)
    x = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    by_hand = ev.fid_net.of_uint8([centre_crop_resize(x, 256)])
    assert torch.equal(ev.features_of_uint8([x]), by_hand)
    assert not torch.equal(ev.fid_net.of_uint8([x]), by_hand)  # unlike today's squash of the whole image
    sample = torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255
    assert torch.equal(ev.fid_features(sample), by_hand)  # generated samples go the same way
    assert "centre crop" in ev.identity()["fid_resize"] and "LANCZOS resize to 256x256" in ev.identity()["fid_resize"]
    ref = ev.reference(prompts, None)  # the reference is each prompt's own image, in prompt order
    files = [fx / "coco" / "val2014" / dict(p.meta)["file_name"] for p in prompts]
    want = ev.features_of_uint8([np.asarray(Image.open(f).convert("RGB")) for f in files])
    assert ref.paired and ref.n == 4 and torch.allclose(ref.features, want.double())


# --- the protocol and its hash -----------------------------------------------------------------------------------------


def _variants(obj):
    """One changed copy of `obj` per field (recursively into nested dataclasses), each differing in that field only."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            for inner in _variants(v):
                yield f.name + "." + inner[0], dataclasses.replace(obj, **{f.name: inner[1]})
            continue
        other = {bool: lambda x: not x, int: lambda x: x + 1, str: lambda x: x + "'", tuple: lambda x: (*x, "x"),
                 type(None): lambda x: 7}[type(v)](v)
        yield f.name, dataclasses.replace(obj, **{f.name: other})


def test_the_protocol_hash_changes_with_every_preset_field():
    prompts = {"set": "x", "n": 30000, "sha256": "p", "file_sha256": None}
    ev = {"kind": "real", "fid_feature": "f", "fid_feature_sha256": None, "fid_resize": "r", "clip_model": "c",
          "clip_sha256": None, "clip_score": "s", "accuracy_net_sha256": None, "dtype": "fp32"}

    def pid(preset):
        return provenance.protocol(prompts, ev, None, {}, "cpu", "1", None, preset)["id"]

    for name, base in protocols.PRESETS.items():
        variants = list(_variants(base))
        ids = {field: pid(v) for field, v in variants}
        assert len(variants) >= len(dataclasses.fields(base)), name
        assert pid(base) not in ids.values(), (name, [f for f, i in ids.items() if i == pid(base)])
        assert len(set(ids.values())) == len(ids), name  # every field moves the hash its own way
    assert len({pid(p) for p in protocols.PRESETS.values()}) == len(protocols.PRESETS)
    row = provenance.protocol(prompts, ev, None, {}, "cpu", "1", None, protocols.PRESETS["coco2014-30k"])
    assert row["preset"] == protocols.PRESETS["coco2014-30k"].definition() and not row["preset_warnings"]
    small = provenance.protocol({**prompts, "n": 6}, ev, None, {}, "cpu", "1", None, protocols.PRESETS["coco2014-30k"])
    assert "not the 30000" in small["preset_warnings"][0]


# --- the FID bootstrap -------------------------------------------------------------------------------------------------


def _ref(features: torch.Tensor, paired: bool) -> fid.Reference:
    return fid.cached_reference("t", {"kind": "test", "paired": paired}, [features], features.shape[1], None)


def test_fid_bootstrap_interval_covers_the_true_fid():
    """N(μ1, diag a) vs N(μ2, diag b): FID = ‖μ1 − μ2‖² + Σ(√a − √b)². Over 20 independent data sets the 95 %
    interval (reference resampled) must cover it at least 17 times (a binomial(20, 0.95) falls below 17 with
    probability 1.6 %); holding the reference fixed gives narrower intervals (it ignores half the variance)."""
    mu1, mu2 = torch.tensor([0.0, 0.5, 0.0]), torch.tensor([0.3, 0.0, 0.0])
    a, b = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([1.5, 2.0, 0.5])
    true = float((mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum())
    g = torch.Generator().manual_seed(0)
    covered, wider = 0, 0
    for _ in range(20):
        real = mu1 + a.sqrt() * torch.randn(800, 3, generator=g, dtype=torch.float64)
        gen = mu2 + b.sqrt() * torch.randn(800, 3, generator=g, dtype=torch.float64)
        ref = _ref(real, paired=False)
        point = fid.fid_value(gen, ref)
        lo, hi = fid.bootstrap_fid(gen, ref, point)
        covered += lo <= true <= hi
        fixed = fid.resampled_fids(gen, real, "fixed")
        flo, fhi = np.percentile(fixed - fixed.mean() + point, [2.5, 97.5])
        wider += (hi - lo) > (fhi - flo)
    assert covered >= 17, covered
    assert wider == 20


def test_gram_form_equals_the_direct_form():
    """Fewer samples than features: the n×n Gram form gives the direct d×d Fréchet distance, whole and resampled."""
    g = torch.Generator().manual_seed(1)
    gen = torch.randn(30, 48, generator=g, dtype=torch.float64) * 2 + 1
    real = torch.randn(34, 48, generator=g, dtype=torch.float64) @ torch.randn(48, 48, generator=g, dtype=torch.float64)

    def direct(x, y):
        mu_r, cov_r = fid.gaussian_stats(y)
        mu_g, cov_g = fid.gaussian_stats(x)
        return fid.frechet_distance(mu_r, fid.psd_sqrt(cov_r), float(cov_r.trace()), mu_g, cov_g)

    gram = fid.GramKernel(gen, real)
    assert isinstance(fid.fid_kernel(gen, real), fid.GramKernel)
    assert math.isclose(float(gram(torch.ones(1, 30, dtype=torch.float64), None)), direct(gen, real), rel_tol=1e-7)
    assert math.isclose(direct(gen, real), fid.fid_value(gen.float(), _ref(real.float(), False)), rel_tol=1e-3)
    # resampled: rows drawn as resampled_fids draws them (counts per row), against the direct FD of the drawn rows
    vals = fid.resampled_fids(gen, real, "independent", b=4)
    ig = np.concatenate(list(index_chunks(30, 4, BOOTSTRAP_SEED)))
    ir = np.concatenate(list(index_chunks(34, 4, BOOTSTRAP_SEED + 1)))
    for k in range(4):
        assert math.isclose(vals[k], direct(gen[ig[k]], real[ir[k]]), rel_tol=1e-7)
        wg, wr = (torch.bincount(torch.from_numpy(i), minlength=n).double()[None] for i, n in ((ig[k], 30), (ir[k], 34)))
        assert math.isclose(float(fid.CovarianceKernel(gen, real)(wg, wr)), vals[k], rel_tol=1e-6)  # d×d kernel agrees
    paired = fid.resampled_fids(gen[:30], real[:30], "paired", b=2)
    assert math.isclose(paired[0], direct(gen[ig[0]], real[:30][ig[0]]), rel_tol=1e-7)


# --- CLIP score --------------------------------------------------------------------------------------------------------


def test_clip_score_input_is_open_clips_own_transform(fx):
    import open_clip

    from bench.real import OpenCLIPScore

    scorer = OpenCLIPScore(f"local-dir:{fx / 'clip'}", None)
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{fx / 'clip'}")
    x = (torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0)) * 255).round() / 255  # 8-bit levels
    want = torch.stack([preprocess(Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy())) for im in x])
    assert torch.equal(scorer.image_input(x), want) and want.shape == (2, 3, 32, 32)
    s = scorer(x, ["a photo", "a cat"])
    assert s.shape == (2,) and ((s >= 0) & (s <= 100)).all()


# --- refusals ----------------------------------------------------------------------------------------------------------

SUITE = """
name = "proto"
{prompts}
samples = {samples}
batch_size = 4
grid = 4
metrics = {metrics}
[backbone]
kind = "diffusers"
path = "{fx}/sd"
[evaluators]
kind = "real"
inception_dir = "{fx}/inception"
clip_model = "local-dir:{fx}/clip"
{evaluators}
[[methods]]
name = "teacher"
label = "teacher"
nfe = [2]
"""
COCO = 'protocol = "coco2014-30k"\nannotations = "{fx}/coco/captions_val2014.json"\nimages = "{fx}/coco/val2014"'
TEACHER = 'protocol = "teacher-fid"\nreference_method = "teacher"\nreference_steps = 2'


def write_suite(fx, tmp_path, evaluators=COCO, prompts="", samples=6, metrics='["fid", "clip_score"]'):
    path = tmp_path / "s.toml"
    path.write_text(SUITE.format(fx=fx, evaluators=evaluators.format(fx=fx), prompts=prompts, samples=samples,
                                 metrics=metrics))
    return path


BAD = {
    "unknown protocol": (dict(evaluators='protocol = "coco2014-3k"\nannotations = "a"\nimages = "b"'),
                         "did you mean 'coco2014-30k'"),
    "PartiPrompts with a COCO reference": (dict(prompts=f'prompts = "{DATA / "PartiPrompts.tsv"}"'),
                                           "remove prompts ="),
    "more samples than the set": (dict(samples=13), "hold only 12 captioned images"),
    "annotations missing": (dict(evaluators=COCO.replace("captions_val2014.json", "nope.json")), "not found"),
    "images folder missing": (dict(evaluators=COCO.replace("val2014\"", "val2015\"")), "is not a folder"),
    "a COCO input missing": (dict(evaluators=COCO.split("\nimages")[0]), "needs images = ..."),
    "a folder with a COCO protocol": (dict(evaluators=COCO + '\nreference = "x"'), "does not take reference"),
    "partiprompts with fid": (dict(evaluators='protocol = "partiprompts"', prompts=f'prompts = "{DATA / "PartiPrompts.tsv"}"'),
                              "has no FID reference"),
    "partiprompts without the TSV": (dict(evaluators='protocol = "partiprompts"', metrics='["clip_score"]',
                                          prompts=f'prompts = "{DATA / "geneval_evaluation_metadata.jsonl"}"'),
                                     "needs prompts = a PartiPrompts .tsv"),
    "teacher-fid naming no entry": (dict(evaluators=TEACHER.replace('"teacher"', '"teachr"'),
                                         prompts=f'prompts = "{DATA / "PartiPrompts.tsv"}"'), "did you mean 'teacher'"),
    "shapes protocol at real scale": (dict(evaluators='protocol = "shapes-renders"'), "runs on kind = 'shapes'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_protocol_inputs_are_refused_before_writing(fx, tmp_path, case):
    kwargs, needle = BAD[case]
    code, err = flashbench_in_process("run", write_suite(fx, tmp_path, **kwargs), "--out", tmp_path / "o",
                                      "--cache", tmp_path / "cache", cwd=tmp_path)
    assert code == 2, (case, err[-1500:])
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (case, err)
    assert not (tmp_path / "o").exists() and not (tmp_path / "cache").exists()


def test_a_missing_drawn_image_is_named_before_writing(fx, tmp_path):
    import shutil

    shutil.copytree(fx / "coco", tmp_path / "coco")
    gone = draw_seeded(load_coco_captions(tmp_path / "coco" / "captions_val2014.json"), 6)[3]
    (tmp_path / "coco" / "val2014" / dict(gone.meta)["file_name"]).unlink()
    code, err = flashbench_in_process("run", write_suite(fx, tmp_path, COCO.replace("{fx}/coco", str(tmp_path / "coco"))),
                                      "--out", tmp_path / "o", cwd=tmp_path)
    assert code == 2 and f"of prompt {gone.id} is not in images" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


# --- tiny runs ---------------------------------------------------------------------------------------------------------


def rows(run):
    return [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]


def test_a_coco2014_30k_run_measures_against_the_drawn_images(fx, tmp_path):
    code, err = flashbench_in_process("run", write_suite(fx, tmp_path), "--out", tmp_path / "run", "--cache",
                                      tmp_path / "cache", "--no-progress", cwd=tmp_path)
    assert code == 0, err[-3000:]
    (row,) = rows(tmp_path / "run")
    p = row["protocol"]
    assert row["status"] == "ok" and row["fid_ci_low"] <= row["fid"] <= row["fid_ci_high"]
    assert p["preset"]["name"] == "coco2014-30k" and p["preset"]["version"] == 1
    assert p["fid"]["reference"]["paired"] and p["fid"]["reference"]["images"] == 6
    assert p["fid"]["bootstrap_resamples"] >= 1000 and "paired" in p["fid"]["bootstrap_reference"]
    assert "not the 30000" in p["preset_warnings"][0]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    want = [x.id for x in draw_seeded(load_coco_captions(fx / "coco" / "captions_val2014.json"), 6)]
    assert config["prompts"]["n"] == 6 and config["suite"]["prompts"].endswith("captions_val2014.json")
    assert (tmp_path / "cache" / "metrics" / "fid-ref").is_dir() and want[0].startswith("coco2014-")


def test_a_teacher_fid_run_samples_and_caches_the_teacher_reference(fx, tmp_path):
    from bench import runner, suite
    from bench.components import load_evaluators, suite_prompts
    from bench.rundir import RunDir

    s = write_suite(fx, tmp_path, TEACHER, prompts=f'prompts = "{DATA / "PartiPrompts.tsv"}"', samples=4)
    code, err = flashbench_in_process("run", s, "--out", tmp_path / "a", "--cache", tmp_path / "cache", "--no-progress",
                                      cwd=tmp_path)
    assert code == 0, err[-3000:]
    (a,) = rows(tmp_path / "a")
    ref = a["protocol"]["fid"]["reference"]
    assert ref["kind"].startswith("the teacher's own samples") and ref["steps"] == 2 and ref["paired"]
    assert ref["seed"] == protocols.TEACHER_REFERENCE_SEED and a["protocol"]["preset"]["name"] == "teacher-fid"
    assert a["fid"] > 0 and "paired" in a["protocol"]["fid"]["bootstrap_reference"]  # other noise than the cell's
    (cached,) = (tmp_path / "cache" / "metrics" / "fid-ref").glob("*.safetensors")
    # without a teacher (merge, evaluate) the reference comes from the cache by content, or is refused
    sw = suite.load(str(s))
    prompts = suite_prompts(sw.prompts, sw.samples, sw.evaluators)
    ev = load_evaluators(sw.evaluators, "cpu", prompts)
    ctx = runner.RunContext.scoring(sw, RunDir(tmp_path / "a"), prompts, ev, tmp_path / "a", "cpu", tmp_path / "cache")
    assert runner.teacher_reference(ctx).key == cached.stem
    with pytest.raises(UserError, match="teacher-fid reference .* is not in the cache"):
        runner.check_teacher_reference(sw, prompts, ev, json.loads((tmp_path / "a" / "config.json").read_text())["teacher"],
                                       tmp_path / "other-cache")
