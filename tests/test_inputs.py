"""Inputs and provenance that cannot lie: the practitioners' cases of ../shared/cases (copied to
tests/data/cases) and at least one more input of each kind.

Kinds: (1) validation before anything is written; (2) text normalisation and file dialects;
(3) provenance by content; (4) real checkpoint layouts; (5) partitioning across processes;
(6) real-scale reference folders as they come.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from bench.shapes import world
from prompts import load_prompts
from prompts.loaders import normalize_text, prompts_sha256, split_tsv_line
from tests import tiny_sd
from tests.conftest import DATA, ROOT
from tests.test_cli import flashbench
from tests.test_faults import assert_close, comparable

CASES = DATA / "cases"


def one_line_exit_2(r, needle: str):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def suite(tmp_path, text: str, name: str = "s.toml"):
    (tmp_path / name).write_text(text)
    return tmp_path / name


# --- (1) validation before writing ------------------------------------------------------------------------

PARTI = """
name = "partifid"
prompts = "{prompts}"
samples = 3
batch_size = 3
grid = 3
[[methods]]
name = "teacher"
nfe = [2]
"""


@pytest.mark.parametrize("dry", [True, False])
def test_case_01_prompt_only_file_with_fid_is_refused_before_writing(tmp_path, dry):
    s = suite(tmp_path, PARTI.format(prompts=CASES / "parti3_crlf.tsv"))
    r = flashbench("run", s, "--out", tmp_path / "run", "--cache", tmp_path / "cache", *(["--dry-run"] if dry else []))
    one_line_exit_2(r, "no ground-truth scene")
    assert '"fid"' in r.stderr and "parti-00001" in r.stderr
    assert not (tmp_path / "run").exists()
    r = flashbench("run", s, "--out", tmp_path / "run", "--cache", tmp_path / "cache")  # the same command again
    one_line_exit_2(r, "no ground-truth scene")


def test_case_04_one_sample_fid_is_refused_before_writing(tmp_path):
    r = flashbench("run", "default", "--methods", "teacher-ddim", "--nfe", "2", "--samples", "1",
                   "--out", tmp_path / "run", "--cache", tmp_path / "cache")
    one_line_exit_2(r, "FID needs at least 2 samples")
    assert not (tmp_path / "run").exists()


def test_accuracy_without_ground_truth_names_the_lines(tmp_path):
    """A requested metric is never dropped: accuracy on GenEval prompts (no shapes ground truth) is refused."""
    s = suite(tmp_path, f"""
prompts = "{DATA / 'geneval_evaluation_metadata.jsonl'}"
samples = 4
metrics = ["clip_score", "accuracy"]
[[methods]]
name = "teacher"
nfe = [2]
""")
    r = flashbench("run", s, "--out", tmp_path / "run", "--dry-run")
    one_line_exit_2(r, "accuracy needs each prompt's ground-truth objects")
    assert "geneval-00001" in r.stderr


def test_a_failure_while_setting_up_leaves_nothing_behind(tmp_path):
    s = suite(tmp_path, PARTI.format(prompts="shapes-eval").replace("samples = 3", "samples = 4"))
    env = {"FLASHBENCH_FAULT": "raise:setup:0"}
    r = flashbench("run", s, "--out", tmp_path / "run", "--cache", tmp_path / "cache", env_extra=env)
    assert r.returncode != 0 and "failpoint raise:setup:0" in r.stderr
    assert not (tmp_path / "run").exists()
    r = flashbench("run", s, "--out", tmp_path / "run", "--cache", tmp_path / "cache")  # the same --out works now
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_broken_teacher_directory_is_one_line(tmp_path):
    pipe = tiny_sd.build(tmp_path / "pipe")
    (pipe / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    s = suite(tmp_path, f"""
prompts = "{CASES / 'real8.txt'}"
samples = 2
metrics = ["clip_score"]
[backbone]
kind = "diffusers"
path = "{pipe}"
[[methods]]
name = "teacher"
nfe = [2]
""")
    r = flashbench("run", s, "--out", tmp_path / "run", "--dry-run")
    one_line_exit_2(r, "no safetensors weights")
    assert not (tmp_path / "run").exists()


# --- (2) text normalisation and dialects --------------------------------------------------------------------

CAPS = """
name = "caps"
prompts = "{prompts}"
samples = 8
batch_size = 8
grid = 8
metrics = ["clip_score", "accuracy"]
[[methods]]
name = "teacher"
label = "teacher-ddim"
nfe = [2]
settings = {{ solver = "ddim" }}
"""


def test_case_02_bom_and_nbsp_caption_files_keep_their_accuracy(tmp_path):
    rows = {}
    for v in ("clean", "bom", "nbsp"):
        (tmp_path / v).mkdir()
        caps = tmp_path / v / "caps8.txt"  # one name, as the case has it: prompt ids (and so noise) follow the name
        caps.write_bytes((CASES / f"caps8_{v}.txt").read_bytes())
        s = suite(tmp_path, CAPS.format(prompts=caps), f"{v}.toml")
        r = flashbench("run", s, "--out", tmp_path / v / "run", "--cache", tmp_path / "cache", "--no-progress")
        assert r.returncode == 0, r.stderr[-2000:]
        rows[v] = json.loads((tmp_path / v / "run" / "results.jsonl").read_text().splitlines()[0])
    for v in ("bom", "nbsp"):
        assert rows[v]["accuracy"] == rows["clean"]["accuracy"] and rows[v]["clip_score"] == rows["clean"]["clip_score"]
    # the same prompts by content, whatever the encoding
    assert len({rows[v]["protocol"]["prompts"]["sha256"] for v in rows}) == 1
    assert len({rows[v]["protocol"]["prompts"]["file_sha256"] for v in rows}) == 3


def test_unicode_spaces_zero_width_and_line_endings(tmp_path):
    f = tmp_path / "c.txt"
    f.write_bytes("\ufeffa large\u2009red circle\u200b at the top left\r\na\u3000small blue square in the center\r"
                  "a small green cross at the bottom right\n".encode())
    ps = load_prompts(f, parse_caption=world.parse_caption)
    assert [p.text for p in ps] == ["a large red circle at the top left", "a small blue square in the center",
                                    "a small green cross at the bottom right"]
    assert all(p.objects is not None for p in ps)
    assert normalize_text(" a\u00a0\u00a0b\t c ") == "a b c"


def test_partiprompts_written_by_a_spreadsheet_or_pandas_reads_as_the_original(tmp_path):
    import pandas as pd

    original = load_prompts(DATA / "PartiPrompts.tsv")
    df = pd.read_csv(DATA / "PartiPrompts.tsv", sep="\t", quoting=3, keep_default_na=False)  # QUOTE_NONE: as published
    df.to_csv(tmp_path / "pandas.tsv", sep="\t", index=False)  # quotes fields holding quotes, doubles inner ones
    again = load_prompts(tmp_path / "pandas.tsv")
    assert [p.text for p in again] == [p.text for p in original]
    assert '""' in (tmp_path / "pandas.tsv").read_text()  # the dialect really differs
    # a quote mid-field stays literal, a wrapped field with doubled quotes is unwrapped, a tab inside quotes survives
    assert split_tsv_line('"G I G" painted.\tA\tB\t') == ['"G I G" painted.', "A", "B", ""]
    assert split_tsv_line('"""G I G"" painted."\tA\tB\t') == ['"G I G" painted.', "A", "B", ""]
    assert split_tsv_line('"a\tb"\tA\tB\t') == ["a\tb", "A", "B", ""]


def test_geneval_keeps_every_field():
    p = load_prompts(DATA / "geneval_evaluation_metadata.jsonl")[0]
    meta = dict(p.meta)
    assert meta["tag"] == "single_object" and json.loads(meta["include"])
    line = json.loads((DATA / "geneval_evaluation_metadata.jsonl").read_text().splitlines()[0])
    assert set(meta) == set(line) - {"prompt"}


# --- (3) provenance by content ------------------------------------------------------------------------------------


def test_case_12_compare_and_resume_refuse_edited_prompt_files(tmp_path):
    caps = tmp_path / "caps.txt"
    caps.write_bytes((CASES / "prompts_v1.txt").read_bytes())
    s = suite(tmp_path, CAPS.format(prompts=caps).replace("nfe = [2]", "nfe = [4]"))
    r = flashbench("run", s, "--seeds", "0,1", "--out", tmp_path / "A", "--cache", tmp_path / "cache", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert flashbench("baseline", tmp_path / "A").returncode == 0
    caps.write_bytes((CASES / "prompts_v2.txt").read_bytes())  # edited in place
    r = flashbench("run", s, "--out", tmp_path / "B", "--cache", tmp_path / "cache", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    one_line_exit_2(flashbench("compare", tmp_path / "A", tmp_path / "B"), "another protocol")
    # a run resumed after its prompt file changed is refused
    (tmp_path / "A" / "results.jsonl").write_text((tmp_path / "A" / "results.jsonl").read_text().splitlines()[0] + "\n")
    one_line_exit_2(flashbench("run", "--resume", tmp_path / "A", "--no-progress"), "other contents now")


def test_case_06_truncated_prompts_are_recorded_per_encoder_with_ids(tmp_path):
    long = " and ".join(["a large red circle at the top left"] * 4)  # 32 words: over both encoders' 20 tokens
    caps = tmp_path / "long.txt"
    caps.write_text(f"a small dog\n{long}\n")
    s = suite(tmp_path, f"""
prompts = "{caps}"
samples = 2
metrics = ["clip_score"]
[[methods]]
name = "teacher"
nfe = [2]
""")
    r = flashbench("run", s, "--out", tmp_path / "run", "--cache", tmp_path / "cache", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    truncated = json.loads((tmp_path / "run" / "config.json").read_text())["truncated"]
    assert truncated == {"teacher": {"text_encoder": ["long-00002"]}, "clip_score": ["long-00002"]}


def test_prompt_content_hash_ignores_encoding_and_follows_content(tmp_path):
    a = load_prompts(CASES / "prompts_v1.txt")
    (tmp_path / "prompts_v1.txt").write_bytes(b"\xef\xbb\xbf" + (CASES / "prompts_v1.txt").read_bytes().replace(b"\n", b"\r\n"))
    assert prompts_sha256(load_prompts(tmp_path / "prompts_v1.txt")) == prompts_sha256(a)
    assert prompts_sha256(load_prompts(CASES / "prompts_v2.txt")) != prompts_sha256(a)


# --- (4) real checkpoint layouts ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """One tiny SD pipeline saved three ways: plain, only as an fp16 variant, and with a sharded UNet."""
    from diffusers import UNet2DConditionModel

    d = tmp_path_factory.mktemp("layouts")
    plain = tiny_sd.build(d / "plain")
    variant = tiny_sd.build(d / "variant")
    for comp, cls_name in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL")):
        cls = getattr(__import__("diffusers"), cls_name)
        m = cls.from_pretrained(variant / comp)
        (variant / comp / "diffusion_pytorch_model.safetensors").unlink()
        m.save_pretrained(variant / comp, variant="fp16", safe_serialization=True)
    from transformers import CLIPTextModel

    te = CLIPTextModel.from_pretrained(variant / "text_encoder")
    (variant / "text_encoder" / "model.safetensors").unlink()
    te.save_pretrained(variant / "text_encoder", variant="fp16", safe_serialization=True)
    sharded = tiny_sd.build(d / "sharded")
    unet = UNet2DConditionModel.from_pretrained(sharded / "unet")
    (sharded / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    unet.save_pretrained(sharded / "unet", max_shard_size="20KB", safe_serialization=True)
    assert len(list((sharded / "unet").glob("*.safetensors"))) > 1
    return d, plain, variant, sharded


def test_variant_only_and_sharded_folders_load_and_sample_like_the_plain_one(pipes, tmp_path):
    from methods import base
    from methods.backbones import load_dir

    _, plain, variant, sharded = pipes
    out = {}
    for name, path in (("plain", plain), ("variant", variant), ("sharded", sharded)):
        bb = load_dir(path)
        cls = base.get("teacher")
        m = cls(bb, cls.make_config({"solver": "ddim"}), base.Context(tmp_path))
        out[name] = (m.sample(["a red apple"], [("p", 0)], 2), bb.identity())
    assert out["variant"][1]["variant"] == "fp16"
    files = out["variant"][1]["files"]
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in files
    assert not any(f.endswith("unet/diffusion_pytorch_model.safetensors") for f in files)
    assert any("index" in f for f in out["sharded"][1]["files"])
    # fp16 storage rounds the weights; the sharded copy holds the same weights as the plain one
    assert torch.equal(out["sharded"][0], out["plain"][0])
    assert torch.allclose(out["variant"][0], out["plain"][0], atol=2e-2)
    assert len({out[k][1]["sha256"] for k in out}) == 3


def test_a_replaced_teacher_never_reuses_an_old_student(pipes, tmp_path):
    from methods import base
    from methods.backbones import load_dir

    _, plain, _, sharded = pipes
    cls = base.get("lcm")
    cfg = cls.make_config(cls.smoke_settings())
    a = cls(load_dir(plain), cfg, base.Context(tmp_path))
    b = cls(load_dir(sharded), cfg, base.Context(tmp_path))
    assert a.cache_stem(2) != b.cache_stem(2)  # same weights, other files: the identity is of what was loaded


@pytest.fixture(scope="module")
def loras(pipes):
    d, plain, _, _ = pipes
    return tiny_sd.make_loras(plain, d / "loras")


def test_case_07_kohya_lora_equals_peft_lora_and_a_zero_lora_is_the_base(pipes, loras, tmp_path):
    from methods import base
    from methods.backbones import load_dir

    _, plain, _, _ = pipes
    bb = load_dir(plain)
    cls = base.get("pretrained")
    out = {}
    for name in ("peft", "kohya", "zero"):
        m = cls(bb, cls.make_config({"kind": "lcm-lora", "path": str(loras / f"lora_{name}.safetensors"), "max_steps": 4}),
                base.Context(tmp_path))
        out[name] = m.sample(["a red apple", "a blue car"], [("p", 0), ("q", 0)], 2)
        assert m.info.checkpoint_sha256  # the LoRA file's sha256 goes into the row
    assert torch.allclose(out["peft"], out["kohya"], atol=1e-5)
    assert not torch.allclose(out["peft"], out["zero"], atol=1e-3)


def test_a_lora_that_does_not_fit_is_refused(pipes, loras, tmp_path):
    from safetensors.torch import load_file, save_file

    from core.errors import UserError
    from methods import base
    from methods.backbones import load_dir

    _, plain, _, _ = pipes
    state = load_file(str(loras / "lora_peft.safetensors"))
    bad = {k.replace("down_blocks", "down_blockz"): v for k, v in state.items()}  # keys this UNet does not have
    save_file(bad, str(tmp_path / "bad.safetensors"))
    cls = base.get("pretrained")
    m = cls(load_dir(plain), cls.make_config({"kind": "lcm-lora", "path": str(tmp_path / "bad.safetensors"),
                                                            "max_steps": 4}), base.Context(tmp_path))
    with pytest.raises(UserError, match="not injected|not recognised"):
        m.prepare(2)


def test_recipes_carry_their_model_cards_settings():
    from methods import base

    cls = base.get("pretrained")
    one = cls.make_config({"recipe": "sdxl-lightning-1step", "path": "x"})
    assert (one.scheduler, one.prediction_type, one.steps, one.guidance) == ("euler", "sample", (1,), "none")
    dmd2 = cls.make_config({"recipe": "dmd2-sdxl-4step", "path": "x"})
    assert dmd2.timesteps == (999, 749, 499, 249) and cls.budget(dmd2, steps=4).nfe == 4
    cfg = cls.make_config({"recipe": "hyper-sdxl-8step-cfg-lora", "path": "x"})
    assert cls.budget(cfg, steps=8).nfe == 16  # CFG: 2 NFE per step
    assert cls.make_config({"recipe": "lcm-sdxl", "path": "x", "guidance_scale": 4.0}).guidance_scale == 4.0  # yours win


def test_sample_prediction_checkpoint_equals_its_epsilon_twin(tiny):
    """An x̂_0-predicting network (prediction_type sample) gives the same sampler step as its ε twin."""
    from methods.sampling import Denoiser

    x, t = torch.randn(2, *tiny.sample_shape), 500
    cond = tiny.encode_text(["a large red circle at the top left"] * 2)
    eps = Denoiser(tiny.net, tiny.schedule, "epsilon")
    x0, e = eps.predict(x, t, cond)
    as_sample = Denoiser(lambda *a, **k: type("O", (), {"sample": x0})(), tiny.schedule, "sample")
    x0b, eb = as_sample.predict(x, t, cond)
    assert torch.allclose(x0b, x0) and torch.allclose(eb, e, atol=1e-4)


# --- (5) partitioning ------------------------------------------------------------------------------------------------


def test_balanced_shards_cover_every_item_once():
    from bench.dist import Dist

    for n in range(0, 12):
        for world_size in range(1, 7):
            d = Dist()
            d.world = world_size
            shards = [d.shard(n, r) for r in range(world_size)]
            assert [i for s in shards for i in s] == list(range(n))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1


DIST5 = """
name = "dist5"
prompts = "shapes-eval"
samples = {n}
batch_size = 4
grid = 4
metrics = ["clip_score", "accuracy"]
[[methods]]
name = "teacher"
label = "teacher-dpm"
nfe = [2]
"""


@pytest.mark.parametrize("n", [5, pytest.param(3, marks=pytest.mark.slow)])
def test_case_10_any_sample_count_on_four_processes_equals_one(tmp_path, n):
    s = suite(tmp_path, DIST5.format(n=n))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("FLASHBENCH_FAULT", None)
    one = subprocess.run([sys.executable, "-m", "bench", "run", str(s), "--out", str(tmp_path / "one"), "--cache",
                          str(tmp_path / "cache"), "--no-progress"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert one.returncode == 0, one.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "-m", "bench", "run",
                        str(s), "--out", str(tmp_path / "four"), "--cache", str(tmp_path / "cache"), "--no-progress"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    # the same rows; the shards sample in other batch shapes, so floats agree to 1e-3, not bit for bit
    assert_close(comparable(tmp_path / "four"), comparable(tmp_path / "one"))


# --- (6) real-scale reference folders as they come -------------------------------------------------------------------

REAL = """
name = "real"
prompts = "{prompts}"
samples = 8
batch_size = 8
grid = 8
metrics = ["fid", "clip_score"]
[backbone]
kind = "diffusers"
path = "{pipe}"
[evaluators]
kind = "real"
inception_dir = "{inc}"
clip_model = "local-dir:{clip}"
reference = "{ref}"
[[methods]]
name = "teacher"
label = "teacher-dpm"
nfe = [2]
"""


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return tiny_sd.real_fixtures(tmp_path_factory.mktemp("fx"))


@pytest.mark.slow
def test_case_05_and_mixed_modes_references_are_read_by_the_protocol(fixtures, tmp_path):
    from PIL import Image

    ref = tmp_path / "ref"
    ref.mkdir()
    for i, src in enumerate(sorted((fixtures / "ref16").glob("*.png"))):
        im = Image.open(src)
        if i == 0:
            im = im.resize((24, 16))  # landscape, as in COCO val (case 05)
        if i == 1:
            im = im.convert("RGBA")
        if i == 2:
            im = im.convert("L")
        if i == 3:
            im.convert("CMYK").save(ref / f"{i}.jpg")
            continue
        im.save(ref / f"{i}.png")
    s = suite(tmp_path, REAL.format(prompts=CASES / "real8.txt", pipe=fixtures / "sd", inc=fixtures / "inception",
                                    clip=fixtures / "clip", ref=ref))
    r = flashbench("run", s, "--out", tmp_path / "run", "--cache", tmp_path / "cache", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads((tmp_path / "run" / "results.jsonl").read_text().splitlines()[0])
    assert row["status"] == "ok" and row["fid"] >= 0
    assert row["protocol"]["fid"]["reference"]["images"] == 8 and row["protocol"]["fid"]["reference"]["folder_sha256"]


def test_an_unreadable_reference_image_is_named_before_writing(fixtures, tmp_path):
    import shutil

    ref = tmp_path / "ref"
    shutil.copytree(fixtures / "ref16", ref)
    (ref / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    s = suite(tmp_path, REAL.format(prompts=CASES / "real8.txt", pipe=fixtures / "sd", inc=fixtures / "inception",
                                    clip=fixtures / "clip", ref=ref))
    r = flashbench("run", s, "--out", tmp_path / "run", "--cache", tmp_path / "cache")
    one_line_exit_2(r, "broken.png cannot be read")
    assert not (tmp_path / "run").exists()
