"""Every real-scale suite the README and docs/ show loads and plans as written: `flashbench run --dry-run` on each
```toml block with [[methods]], its local paths pointed at tiny random-weight stand-ins of the same kind (a path of
no known kind fails the test: a doc cannot show a suite this test cannot check)."""

import re

import pytest

from tests import tiny_flow, tiny_sd
from tests.conftest import DATA, ROOT
from tests.test_cli import flashbench_in_process
from tests.test_protocols import coco

BLOCK = re.compile(r"```toml\n(.*?)```", re.S)
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks() -> list[tuple[str, int, str]]:
    out = []
    for doc in DOCS:
        for k, m in enumerate(BLOCK.finditer(doc.read_text())):
            if "[[methods]]" in m.group(1) and re.search(r'kind = "(diffusers|real)"', m.group(1)):
                out.append((doc.name, k, m.group(1)))
    return out


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Tiny stand-ins by the kind a path names (the rules below); built once."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("stand-ins")
    sdxl = tiny_sd.build(d / "sdxl", sdxl=True)
    from diffusers import UNet2DConditionModel

    single = d / "sdxl_lightning_4step_unet.safetensors"
    unet = UNet2DConditionModel.from_pretrained(sdxl, subfolder="unet")
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(single))
    fx = tiny_sd.real_fixtures(d / "real")
    coco_json = coco(d / "coco", n_images=8)
    return [
        (r"stable-diffusion-xl", sdxl),
        (r"stable-diffusion-v1-5|stable-diffusion-1", fx / "sd"),
        (r"stable-diffusion-3", tiny_flow.build_sd3(d / "sd3")),
        (r"FLUX\.1-dev$", tiny_flow.build_flux(d / "flux-dev")),
        (r"FLUX\.1-schnell$", tiny_flow.build_flux(d / "flux-schnell", guidance_embeds=False)),
        (r"(?i)lightning.*unet\.safetensors$", single),
        (r"/cleanfid$", fx / "inception"),
        (r"captions_val2014\.json$", coco_json),
        (r"/val2014$", d / "coco" / "val2014"),
        (r"laion-subset$", tiny_sd.image_folder(d / "laion", 8)),
        (r"PartiPrompts\.tsv$", DATA / "PartiPrompts.tsv"),
        ("clip", fx / "clip"),
    ]


def pointed(text: str, stand_ins) -> str:
    """The suite with every quoted path replaced by its stand-in, and its open_clip model by the tiny local one."""
    clip = dict(stand_ins)["clip"]
    text = re.sub(r'clip_model = "[^"]+"', f'clip_model = "local-dir:{clip}"', text)
    text = re.sub(r'clip_pretrained = "[^"]+"\n', "", text)

    def sub(m):
        path = m.group(1)
        for rule, target in stand_ins:
            if rule != "clip" and re.search(rule, path):
                return f'"{target}"'
        if path.startswith("/") or path.endswith((".tsv", ".jsonl", ".txt")):
            raise AssertionError(f"the docs show a path of no known kind: {path} (add a stand-in rule)")
        return m.group(0)

    return re.sub(r'"([^"\n]*(?:/|\.tsv)[^"\n]*)"', sub, text)  # one string at a time: never across a line


def test_the_docs_show_real_scale_suites():
    names = {(doc, k) for doc, k, _ in blocks()}
    assert ("real-scale.md", 0) in names and len(names) >= 4


@pytest.mark.parametrize("doc, k, text", blocks(), ids=lambda v: v if isinstance(v, (str, int)) else "")
def test_each_real_scale_suite_in_the_docs_loads_and_plans_as_written(stand_ins, tmp_path, doc, k, text):
    suite = tmp_path / "suite.toml"
    suite.write_text(pointed(text, stand_ins))
    code, err = flashbench_in_process("run", suite, "--dry-run", "--samples", "4", "--device-memory", "80GB",
                                      "--cache", tmp_path / "cache", cwd=tmp_path)
    assert code == 0, (doc, k, err)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))
