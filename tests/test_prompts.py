import json

import pytest

from bench.shapes import world
from prompts import PromptFileError, load_prompts, prompt_sets
from bench.shapes.prompt_sets import main as build_main
from tests.conftest import DATA


def test_shipped_sets_match_their_checksums_and_a_rebuild():
    assert set(prompt_sets()) >= {"shapes-eval", "shapes-val"}
    assert build_main(["--check"]) == 0
    ev = load_prompts("shapes-eval")
    assert len(ev) == 2000 and len({p.id for p in ev}) == 2000
    assert all(p.objects and p.scene_seed is not None for p in ev)
    assert sum(len(p.objects) == 2 for p in ev) / len(ev) >= 0.4


def test_partiprompts_loader():
    ps = load_prompts(DATA / "PartiPrompts.tsv")
    assert len(ps) == 1632
    assert ps[0].id == "parti-00001" and ps[0].text == "bond"
    assert dict(ps[0].meta)["category"] == "Abstract"
    assert all(p.objects is None for p in ps)


def test_geneval_loader():
    ps = load_prompts(DATA / "geneval_evaluation_metadata.jsonl")
    assert len(ps) == 553
    assert ps[0].text == "a photo of a bench" and dict(ps[0].meta)["tag"] == "single_object"


def test_caption_file_parses_the_world_grammar(tmp_path):
    f = tmp_path / "caps.txt"
    f.write_text("# comment\na large red circle at the top left\n\na photo of a cat\n")
    ps = load_prompts(f, parse_caption=world.parse_caption)
    assert [p.id for p in ps] == ["caps-00002", "caps-00004"]
    assert ps[0].objects is not None and ps[1].objects is None
    assert all(p.objects is None for p in load_prompts(f))  # no grammar given: no ground truth claimed


@pytest.mark.parametrize("name,content,line", [
    ("bad.tsv", "Prompt\tCategory\tChallenge\tNote\nok\tA\tB\tC\nbroken\tonly-two\n", 3),
    ("bad.jsonl", '{"prompt": "x", "tag": "t"}\n{not json}\n', 2),
    ("bad2.jsonl", '{"prompt": "x", "tag": "t"}\n{"tag": "t"}\n', 2),
    ("bad.txt", "fine\n" + "\x07bell\n", 2),
    ("empty.tsv", "Prompt\tCategory\tChallenge\tNote\n\tA\tB\tC\n", 2),
])
def test_malformed_files_name_the_line(tmp_path, name, content, line):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(PromptFileError, match=rf"{name}:{line}:"):
        load_prompts(f)


def test_non_utf8_and_missing(tmp_path):
    f = tmp_path / "x.txt"
    f.write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(PromptFileError, match="x.txt:2: not valid UTF-8"):
        load_prompts(f)
    with pytest.raises(PromptFileError, match="neither a shipped set"):
        load_prompts(tmp_path / "nope.txt")


def test_shapes_jsonl_roundtrip(tmp_path):
    ev = load_prompts("shapes-eval")[:3]
    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps({"id": p.id, "text": p.text, "scene_seed": p.scene_seed,
                                     "objects": [o.__dict__ for o in p.objects]}) + "\n" for p in ev))
    assert load_prompts(f) == ev


def test_a_tsv_written_by_pandas_with_tabs_quotes_and_line_breaks_in_prompts(tmp_path):
    """pandas quotes a field holding a tab, a quote or a line break, across lines; with or without its index column,
    each prompt is one prompt (its line break and tab read as spaces), and ids count records, not lines."""
    import pandas as pd

    from prompts import load_prompts

    texts = ['a "quoted" cat', "two\tparts", "line one\nline two", "plain"]
    df = pd.DataFrame({"Prompt": texts, "Category": ["A"] * 4, "Challenge": ["B"] * 4, "Note": [""] * 4})
    for index in (False, True):
        path = tmp_path / f"parti-{index}.tsv"
        df.to_csv(path, sep="\t", index=index)
        got = load_prompts(path)
        assert [p.text for p in got] == ['a "quoted" cat', "two parts", "line one line two", "plain"]
        assert [p.id for p in got] == [f"parti-{k:05d}" for k in range(1, 5)]
        assert got[2].meta == (("category", "A"), ("challenge", "B"))
