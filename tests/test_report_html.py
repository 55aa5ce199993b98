"""`flashbench report`: one self-contained page of a tiny run made here (samples saved) and of the reference runs
(grids decoded); bad input and runs under different protocols refused (one line, exit 2, nothing written); the
page the same bytes every time; and, where a system chromium is installed, the page opened headless: no console
error, no request off the machine, every table, plot and sample present, a column sorted by a click."""

import json
import re
import shutil
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

from tests.conftest import ROOT
from tests.test_cli import flashbench_in_process

pytest.importorskip("plotly", reason="the `report` extra is not installed: pip install -e '.[report]'")
pytest.importorskip("itables", reason="the `report` extra is not installed: pip install -e '.[report]'")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
REFERENCE = [ROOT / "results" / "reference" / n for n in ("paper", "paper-flow")]

SUITE = """
name = "tiny-report"
prompts = "shapes-eval"
samples = 10
seeds = [0]
batch_size = 10
grid = 4
metrics = ["fid", "clip_score", "accuracy", "latency"]
latency = { repeats = 1, warmup = 0, throughput_batch = 2 }
[[methods]]
name = "teacher"
label = "teacher-ddim"
steps = [1, 2]
settings = { solver = "ddim" }
[[methods]]
name = "teacher"
label = "teacher-dpm"
steps = [1, 2]
settings = { solver = "dpmsolver++" }
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    (d / "suite.toml").write_text(SUITE)
    code, err = flashbench_in_process("run", d / "suite.toml", "--save-samples", "--no-progress", "--cache", d / "cache",
                                      "--out", d / "run", cwd=d)
    assert code == 0, err
    return d / "run"


@pytest.fixture(scope="module")
def tiny_page(tiny_run):
    code, err = flashbench_in_process("report", tiny_run, cwd=tiny_run.parent)
    assert code == 0, err
    return tiny_run / "index.html"


def _refuse(args, cwd, match):
    code, err = flashbench_in_process("report", *args, cwd=cwd)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and re.search(match, err), err


def test_pareto_front():
    from bench.results.html import pareto_front

    pts = [(1, 30.0), (2, 10.0), (2, 12.0), (4, 11.0), (8, 1.0), (50, 0.5)]
    assert pareto_front(pts, lower_is_better=True) == [(1, 30.0), (2, 10.0), (8, 1.0), (50, 0.5)]
    assert pareto_front([(1, 0.5), (2, 0.4), (4, 0.9)], lower_is_better=False) == [(1, 0.5), (4, 0.9)]


def test_tiny_page_holds_every_part(tiny_run, tiny_page):
    text = tiny_page.read_text()
    for part in ('id="run0-main"', 'id="run0-latency"', 'id="run0-plot-nfe"', 'id="run0-plot-latency"',
                 'id="run0-claims"', 'class="provenance"', 'class="protocol"'):
        assert part in text, part
    assert 'id="run0-table-a"' not in text  # no 25-step teacher in the tiny run: no Table A/B, and no error
    # the first 8 prompts (K; the suite's grid = 4 does not limit saved samples) × 2 methods × 2 NFE, each linked to its PNG
    imgs = [unquote(h) for h in re.findall(r'<a href="([^"]+)"><img class="sample pixelated" src="data:image/png;base64,',
                                           text)]
    assert len(imgs) == 8 * 2 * 2
    assert all((tiny_run / h).is_file() for h in imgs)
    assert "a large red square at the top right" in text  # the prompt, from the sample's metadata
    assert text.count('class="provenance"') == len((tiny_run / "results.jsonl").read_text().splitlines())


def test_page_is_deterministic_and_offline(tiny_run, tiny_page, tmp_path):
    code, err = flashbench_in_process("report", tiny_run, "--out", tmp_path / "again", cwd=tmp_path)
    assert code == 0, err
    a, b = tiny_page.read_text(), (tmp_path / "again" / "index.html").read_text()
    # the same page but for the links to the samples, which are relative to where the page lies
    strip = re.compile(r'href="[^"#][^"]*"')
    assert strip.sub("", a) == strip.sub("", b)
    assert not re.search(r'<(script|link|img|iframe)[^>]+(src|href)="(https?:)?//', a)  # nothing loaded from a server
    assert "<script>" in a and "Plotly" in a and "_itables_" in a


def test_reference_runs_side_by_side(tmp_path):
    if not all((r / "results.jsonl").exists() for r in REFERENCE):
        pytest.skip("results/reference/paper and paper-flow are not in this checkout")
    code, err = flashbench_in_process("report", *REFERENCE, "--out", tmp_path, cwd=tmp_path)
    assert code == 0, err
    text = (tmp_path / "index.html").read_text()
    for i in (0, 1):
        for part in ("main", "latency", "table-a", "table-b", "plot-nfe", "plot-latency", "curves", "claims"):
            assert f'id="run{i}-{part}"' in text, (i, part)
    # the samples were not saved: decoded from grids/*.png (16 per cell), the first 8 prompts, linked to the grids
    links = [unquote(h) for h in re.findall(r'<a href="([^"]+)"><img class="sample pixelated"', text)]
    assert len(links) == 8 * sum(len(list((r / "grids").glob("*_nfe*.png"))) for r in REFERENCE)  # every cell
    assert {Path(h).name for h in links} >= {"imagine-flash_nfe3.png", "teacher-dpm++_nfe50.png"}
    assert all((tmp_path / h).resolve().is_file() for h in set(links))


@pytest.mark.parametrize("case, match", [
    ("missing", "no such run directory"),
    ("not-a-run", "is not a run directory"),
    ("twice", "is given twice"),
    ("out-is-file", "is a file, not a folder"),
    ("prompts", "--prompts must be a positive integer"),
])
def test_bad_input_is_refused_before_anything_is_written(tiny_run, tmp_path, case, match):
    args = {"missing": [tmp_path / "nope"], "not-a-run": [tmp_path], "twice": [tiny_run, tiny_run],
            "out-is-file": [tiny_run, "--out", tmp_path / "file"], "prompts": [tiny_run, "--prompts", "0"]}[case]
    (tmp_path / "file").write_text("x")
    before = sorted(p.name for p in tmp_path.iterdir())
    _refuse([*args, "--out", tmp_path / "out"] if case != "out-is-file" else args, tmp_path, match)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_runs_under_different_protocols_are_refused(tiny_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other, ignore=shutil.ignore_patterns("index.html", "samples"))
    rows = [json.loads(line) for line in (other / "results.jsonl").read_text().splitlines()]
    for r in rows:  # as if measured on other prompts
        r["protocol"]["prompts"]["sha256"] = "0" * 64
        r["protocol"]["id"] = "another"
    (other / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _refuse([tiny_run, other, "--out", tmp_path / "out"], tmp_path, r"different protocols .*fields that differ: prompts")
    assert not (tmp_path / "out").exists() and not (other / "index.html").exists()


def test_a_missing_extra_is_named(tiny_run, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "plotly", None)  # import plotly now raises ImportError
    _refuse([tiny_run, "--out", tmp_path / "out"], tmp_path, re.escape("pip install -e '.[report]'"))
    assert not (tmp_path / "out").exists()


# --- in a browser ----------------------------------------------------------------------------------


def _browser():
    if not CHROMIUM.exists():
        pytest.skip(f"no system chromium at {CHROMIUM} (apt-get install -y chromium; .ci/run tries it)")
    return pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the `report` extra)")


def _check_in_browser(page_path: Path, runs: int, tables: int, screenshot: Path, adversarial: bool = False):
    """Open the page headless: no console error, nothing fetched but the file itself (and the blob itables makes
    of its embedded bundle), every table initialised, every plot drawn, every sample decoded, a sort by click."""
    sync_api = _browser()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors, requests = [], []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.resolve().as_uri())
            page.wait_for_function(f"document.querySelectorAll('table.dataTable').length === {tables}", timeout=30_000)
            drawn = "[...document.querySelectorAll('.plotly-graph-div')].every(d => d.querySelector('svg.main-svg'))"
            page.wait_for_function(drawn, timeout=30_000)
            assert page.locator("section.run-section").count() == runs
            assert page.locator(".plotly-graph-div").count() >= 2 * runs
            assert page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
            assert page.locator("img.sample").count() > 0
            heads = page.locator("#run0-claims h2").all_inner_texts()  # claims (a)-(d), then the GAN verdicts
            assert [h[:3] for h in heads[:4]] == ["(a)", "(b)", "(c)", "(d)"], heads
            assert heads[4:] == ["Adversarial terms"] * adversarial, heads
            # sort the main table by its FID column: a click orders it ascending by value, a second descending
            col = page.locator("#run0-main thead th").all_inner_texts().index("FID ↓") + 1
            cells, header = page.locator(f"#run0-main tbody tr td:nth-child({col})"), f"#run0-main thead th:nth-child({col})"
            page.locator(header).click()
            page.wait_for_selector(f"{header}[aria-sort=ascending]")
            up = [float(t.split()[0]) for t in cells.all_inner_texts()]
            page.wait_for_timeout(600)  # an immediate second click was once not taken as a sort (flaky without a pause)
            page.locator(header).click()
            page.wait_for_selector(f"{header}[aria-sort=descending]")
            down = [float(t.split()[0]) for t in cells.all_inner_texts()]
            assert up == sorted(up) and down == sorted(up, reverse=True) and len(up) > 2
            page.screenshot(path=str(screenshot))
        finally:
            browser.close()
    assert errors == []
    assert [u for u in requests if not u.startswith(("file:", "blob:", "data:"))] == []
    from PIL import Image

    img = Image.open(screenshot).convert("L")
    assert img.size == (1280, 900)
    lo, hi = img.getextrema()
    assert hi - lo > 100 and len(np.unique(np.asarray(img))) > 20  # not blank: text, table rules, colour


def test_tiny_page_in_a_browser(tiny_page, tmp_path):
    _check_in_browser(tiny_page, runs=1, tables=2, screenshot=tmp_path / "tiny.png")


def test_reference_page_in_a_browser(tmp_path):
    if not all((r / "results.jsonl").exists() for r in REFERENCE):
        pytest.skip("results/reference/paper and paper-flow are not in this checkout")
    code, err = flashbench_in_process("report", *REFERENCE, "--out", tmp_path, cwd=tmp_path)
    assert code == 0, err
    _check_in_browser(tmp_path / "index.html", runs=2, tables=8, screenshot=tmp_path / "reference.png",
                      adversarial=True)  # ADD and DMD2 rows: their GAN verdicts
