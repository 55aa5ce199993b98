"""`flashbench run` end to end on rectified-flow teachers: a suite with [backbone] path = a tiny random FLUX.1-dev
(or SD3) directory, real evaluators at small scale (random-weight Inception file, tiny open_clip), and rows for the
teacher, a distilled method at a tiny training budget and a published-checkpoint recipe."""

import json

import pytest

from tests import tiny_flow, tiny_sd
from tests.test_cli import flashbench

SUITE = """
name = "{name}"
prompts = "{caps}"
samples = 4
batch_size = 4
grid = 2
metrics = ["fid", "clip_score"]
[backbone]
kind = "diffusers"
path = "{pipe}"
train_data = "{data}"
train_workers = 0
max_sequence_length = 16
{extra}
[evaluators]
kind = "real"
inception_dir = "{inc}"
clip_model = "local-dir:{clip}"
reference = "{ref}"
[[methods]]
name = "teacher"
label = "teacher"
steps = [2]
settings = {{ solver = "euler", guidance = "{guidance}", guidance_scale = 3.5 }}
[[methods]]
name = "lcm"
label = "lcm"
steps = [1]
settings = {{ student_updates = 2, batch_size = 2 }}
[[methods]]
name = "pretrained"
label = "recipe"
steps = [{recipe_steps}]
settings = {{ recipe = "{recipe}", path = "{ckpt}", resolution = 16 }}
"""


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    d = tmp_path_factory.mktemp("flowcli")
    tiny_sd.real_fixtures(d)  # inception/, clip/, ref16/ (and a tiny SD pipeline, unused here)
    (d / "caps.txt").write_text("\n".join(f"a photo of object {i}" for i in range(4)) + "\n")
    tiny_sd.image_folder(d / "data", 8)
    return d


def rows(run_dir):
    return [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["flux", "sd3"])
def test_run_on_a_flow_teacher(fx, layout):
    if layout == "flux":
        pipe = tiny_flow.build_flux(fx / "flux")
        ckpt = tiny_flow.flux_lora(pipe, fx / "lora")
        params = dict(guidance="embedded", recipe="flux1-turbo-alpha-lora", recipe_steps=8, extra="resolution = 16",
                      nfe={"teacher": 2, "lcm": 1, "recipe": 8})
    else:
        pipe = tiny_flow.build_sd3(fx / "sd3")
        ckpt = pipe / "transformer"  # a transformer directory in the turbo recipe's format
        params = dict(guidance="cfg", recipe="sd35-large-turbo", recipe_steps=4, extra="",
                      nfe={"teacher": 4, "lcm": 1, "recipe": 4})
    nfe = params.pop("nfe")
    suite = fx / f"{layout}.toml"
    suite.write_text(SUITE.format(name=layout, caps=fx / "caps.txt", pipe=pipe, data=fx / "data", inc=fx / "inception",
                                  clip=fx / "clip", ref=fx / "ref16", ckpt=ckpt, **params))
    out = fx / f"run-{layout}"
    r = flashbench("run", suite, "--out", out, "--cache", fx / "cache", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    got = {x["label"]: x for x in rows(out)}
    assert set(got) == set(nfe)
    for label, n in nfe.items():
        row = got[label]
        assert row["status"] == "ok" and row["nfe"] == n and row["fid"] >= 0 and row["clip_score"] is not None, row
    assert got["lcm"]["train"]["student_updates"] == 2
    assert got["teacher"]["protocol"]["teacher"]["family"] == layout
