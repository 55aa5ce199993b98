"""Hostile input: property-based tests over the suite loader, the prompt loaders and the CLI.

Only clear one-line errors (exit status 2), never a traceback, never a partial write.
"""

import os
import re
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bench import suite as suite_mod
from core.errors import UserError
from prompts import PromptFileError, load_prompts
from tests.conftest import ROOT
from tests.test_cli import flashbench_in_process

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["teacher", "lcm", "ddim", "shapes-eval", "nfe", "steps"]))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                   st.dictionaries(st.text(max_size=8), c, max_size=4)), max_leaves=12)
keys = st.sampled_from(sorted(suite_mod.TOP_KEYS) + ["bogus"])
entry_keys = st.sampled_from(sorted(suite_mod.ENTRY_KEYS) + ["bogus"])
entries = st.dictionaries(entry_keys, values, max_size=5)


@SETTINGS
@given(st.dictionaries(keys, values, max_size=6), st.lists(entries, max_size=3))
def test_suite_parser_raises_only_user_errors(raw, methods):
    if methods:
        raw = {**raw, "methods": methods}
    try:
        s = suite_mod.parse(raw, "fuzz.toml")
    except UserError as e:
        assert "\n" not in str(e)
    else:
        assert s.entries and all(n > 0 for e in s.entries for n in e.nfe)


@SETTINGS
@given(st.binary(max_size=400), st.sampled_from([".tsv", ".jsonl", ".txt"]))
def test_prompt_loaders_raise_only_prompt_file_errors(tmp_path, data, suffix):
    f = tmp_path / f"fuzz{suffix}"
    f.write_bytes(data)
    try:
        ps = load_prompts(f)
    except PromptFileError as e:
        assert "\n" not in str(e)
    else:
        assert ps and all(p.text.strip() and p.id for p in ps)


WORDS = ["run", "--dry-run", "--nfe", "--methods", "--samples", "--seeds", "--device", "--out", "--resume", "table",
         "list", "compare", "baseline", "default", "paper", "teacher", "lcm", "cuda", "cpu", "1,2", "0", "-1", "x",
         "2,3", "nosuch.toml", "--bogus", "", "--scale"]


@SETTINGS
@given(st.lists(st.one_of(st.sampled_from(WORDS), st.text(max_size=6)), min_size=1, max_size=6))
@example(["run", "run", "\r"])  # a control character in an argument argparse echoes back: still one line
@example(["run", "no\nsuch"])
def test_cli_never_tracebacks_and_never_writes(tmp_path, argv):
    if argv[0] == "run" and "--dry-run" not in argv:
        argv = argv + ["--dry-run"]  # a valid argv would start a real run; the property is about bad input
    if argv[0] in ("train-teacher", "train-evaluators", "sweep"):
        return
    before = set(tmp_path.rglob("*"))
    code, err = flashbench_in_process(*argv, cwd=tmp_path)
    assert code in (0, 1, 2), (argv, code)
    assert "Traceback" not in err
    if code == 2:
        assert len(err.strip().splitlines()) == 1, (argv, err)
    assert set(tmp_path.rglob("*")) == before  # nothing written


def test_nothing_unpickles_and_hubs_are_offline():
    bad = []
    for path in [p for pkg in ("core", "prompts", "methods", "bench") for p in (ROOT / pkg).rglob("*.py")]:
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                bad.append(f"{path.name}: torch.load without weights_only=True")
        if re.search(r"^\s*import pickle|^\s*from pickle|allow_pickle=True", text, re.M):
            bad.append(f"{path.name}: pickle")
    assert not bad, bad
    import bench  # noqa: F401

    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert Path(ROOT / "bench" / "shapes" / "assets").exists()
