"""Prompt loaders. Every prompt has a stable id; noise seeds are a function of (id, seed) only.

Formats:
* shipped sets (``shapes-eval``, ``shapes-val``): JSONL written by ``bench/shapes/prompt_sets.py``, checked
  against the sha256 in ``prompts/data/manifest.json``;
* PartiPrompts TSV (header ``Prompt  Category  Challenge  Note``);
* GenEval metadata JSONL (``{"tag", "include", "prompt", ...}`` per line);
* plain caption files (one prompt per line; blank lines and ``#`` comments skipped);
* COCO captions JSON (``prompts.coco``): read only through a protocol's seeded draw, never as a plain file.
A caller that knows a grammar (the shapes world) passes ``parse_caption``: caption lines it parses
get their objects as ground truth, so accuracy can be measured. A malformed file raises
PromptFileError naming the file and line.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import re
import unicodedata
from collections.abc import Callable
from pathlib import Path

from core.errors import UserError, unknown
from core.io import sha256_file

DATA = Path(__file__).parent / "data"
MANIFEST = DATA / "manifest.json"
MAX_PROMPT_CHARS = 2000


class PromptFileError(UserError):
    """A malformed prompt file; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Obj:
    """One object a prompt names, with its attributes: compositional ground truth (as GenEval's ``include``)."""

    shape: str
    color: str
    size: str
    position: str


ParseCaption = Callable[[str], "tuple[Obj, ...] | None"]


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A prompt with a stable id; its noise is a function of (id, seed) only.

    ``objects``: ground truth (the objects it names), when known; ``scene_seed``: the seed of the
    embedded world's scene whose render is this prompt's real reference image; ``meta``: the
    source file's other fields as (key, value) string pairs.
    """

    id: str
    text: str
    objects: tuple[Obj, ...] | None = None
    scene_seed: int | None = None
    meta: tuple[tuple[str, str], ...] = ()


def prompt_sets() -> dict[str, dict]:
    """The shipped sets: name -> manifest entry (file, sha256, counts)."""
    return json.loads(MANIFEST.read_text())["sets"]


def _read_text(path: Path) -> str:
    """A prompt file's text as people save it: UTF-8 with or without a BOM, any line endings (to \\n)."""
    if not path.is_file():
        raise PromptFileError(f"prompt file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise PromptFileError(f"{path.name}:{line}: not valid UTF-8; prompt files must be UTF-8 text") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


# Unicode spaces (no-break, thin, ideographic, ...) and zero-width characters that editors and spreadsheets insert
_SPACES = re.compile(r"[\s\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))


def normalize_text(text: str) -> str:
    """NFC, zero-width characters dropped, every run of (Unicode) whitespace one space, stripped."""
    return _SPACES.sub(" ", unicodedata.normalize("NFC", text).translate(_ZERO_WIDTH)).strip()


def _check_text(text: str, where: str) -> str:
    text = normalize_text(text)
    if not text:
        raise PromptFileError(f"{where}: empty prompt; every entry needs a non-empty prompt")
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptFileError(f"{where}: prompt is {len(text)} characters; at most {MAX_PROMPT_CHARS} are allowed")
    if any(ord(c) < 32 and c not in "\t" for c in text):
        raise PromptFileError(f"{where}: prompt contains control characters; expected plain text")
    return text


def load_shipped(name: str) -> list[Prompt]:
    sets = prompt_sets()
    if name not in sets:
        raise unknown("prompt set", name, sets)
    entry = sets[name]
    path = DATA / entry["file"]
    if not path.is_file() or sha256_file(path) != entry["sha256"]:
        raise PromptFileError(f"prompt set {name!r} ({entry['file']}) is missing or fails its checksum; "
                              "rebuild it with `python -m bench.shapes.prompt_sets`")
    return load_shapes_jsonl(path)


def load_shapes_jsonl(path: Path) -> list[Prompt]:
    out = []
    for n, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path.name}:{n}"
        try:
            d = json.loads(line)
            objs = tuple(Obj(**o) for o in d["objects"])
            out.append(Prompt(d["id"], _check_text(d["text"], where), objs, int(d["scene_seed"])))
        except PromptFileError:
            raise
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise PromptFileError(f"{where}: malformed shapes prompt ({type(e).__name__}: {e}); "
                                  "expected JSON with id, text, objects, scene_seed") from None
    return out


def split_tsv_line(line: str) -> list[str]:
    """Fields of one TSV line, in both dialects: a line written by a spreadsheet or pandas (a field that
    holds tabs or quotes is wrapped in quotes, inner quotes doubled) is read as CSV; a line that is not
    valid quoted TSV, such as the original PartiPrompts' `"G I G G L E" painted ...`, keeps its quotes
    literally and splits at every tab."""
    try:
        return next(csv.reader([line], delimiter="\t", strict=True))
    except (csv.Error, StopIteration):
        return line.split("\t")


def tsv_rows(text: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of a TSV text. The whole text is read as CSV first, so a field a spreadsheet or pandas
    quoted because it holds tabs, quotes or line breaks is one field; a text that is not valid quoted TSV (the
    original PartiPrompts' `"G I G G L E" painted ...`) is split line by line (``split_tsv_line``)."""
    try:
        reader = csv.reader(io.StringIO(text), delimiter="\t", strict=True)
        rows, start = [], 1
        for row in reader:
            rows.append((start, row))
            start = reader.line_num + 1
        return rows
    except csv.Error:
        return [(n, split_tsv_line(line) if line else []) for n, line in enumerate(text.split("\n"), 1)]


def load_partiprompts(path: Path) -> list[Prompt]:
    rows = tsv_rows(_read_text(path))
    while rows and not rows[-1][1]:
        rows.pop()
    header = ["Prompt", "Category", "Challenge", "Note"]
    if rows and rows[0][1][:1] == [""] and rows[0][1][1:5] == header:  # pandas' index column (to_csv(index=True))
        rows = [(n, row[1:]) for n, row in rows]
    if not rows or rows[0][1][: len(header)] != header:
        raise PromptFileError(f"{path.name}:1: expected the PartiPrompts header {' / '.join(header)} (tab-separated)")
    out = []
    for k, (n, row) in enumerate(rows[1:], 1):
        if not row:
            continue
        where = f"{path.name}:{n}"
        if len(row) != len(header):
            raise PromptFileError(f"{where}: expected {len(header)} tab-separated fields, got {len(row)}")
        meta = (("category", row[1]), ("challenge", row[2]))
        out.append(Prompt(f"parti-{k:05d}", _check_text(row[0], where), meta=meta))
    return out


def load_geneval(path: Path) -> list[Prompt]:
    out = []
    for n, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path.name}:{n}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{where}: invalid JSON ({e.msg}); expected one GenEval object per line") from None
        if not isinstance(d, dict) or not isinstance(d.get("prompt"), str) or "tag" not in d:
            raise PromptFileError(f"{where}: expected a GenEval object with string 'prompt' and 'tag'")
        # every field is kept (strings as they are, others as JSON): GenEval's scorer needs include, exclude, ...
        meta = tuple((k, v if isinstance(v, str) else json.dumps(v, sort_keys=True))
                     for k, v in sorted(d.items()) if k != "prompt")
        out.append(Prompt(f"geneval-{n - 1:05d}", _check_text(d["prompt"], where), meta=meta))
    return out


def load_captions(path: Path, parse_caption: ParseCaption | None = None) -> list[Prompt]:
    out = []
    for n, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        text = _check_text(line, f"{path.name}:{n}")
        out.append(Prompt(f"{path.stem}-{n:05d}", text, parse_caption(text) if parse_caption else None))
    return out


def prompts_sha256(prompts: list[Prompt]) -> str:
    """sha256 of a prompt list by content (ids, texts, ground truth, metadata): the prompt set's identity in
    every protocol, whatever file encoding, BOM or line endings carried it."""
    rows = [[p.id, p.text, None if p.objects is None else [dataclasses.astuple(o) for o in p.objects],
             p.scene_seed, list(p.meta)] for p in prompts]
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def load_prompts(spec: str | Path, parse_caption: ParseCaption | None = None) -> list[Prompt]:
    """A shipped set by name, or a file by extension (.tsv Parti, .jsonl GenEval/shapes, else captions).

    Raises PromptFileError (a UserError) naming the file and line of anything malformed.
    """
    spec = str(spec)
    path = Path(spec)
    if spec in prompt_sets():
        return load_shipped(spec)
    if not path.exists():
        raise PromptFileError(f"prompts {spec!r}: neither a shipped set ({', '.join(prompt_sets())}) nor an existing file")
    if path.suffix == ".json":  # COCO captions pair prompts with images: a protocol draws them (bench/protocols.py)
        raise PromptFileError(f"{path.name}: a .json prompt file is read only by a COCO protocol; set [evaluators] "
                              f"protocol = \"coco2014-30k\" and annotations = \"{path}\" instead of prompts = ...")
    if path.suffix == ".tsv":
        prompts = load_partiprompts(path)
    elif path.suffix == ".jsonl":
        first = next((ln for ln in _read_text(path).split("\n") if ln.strip()), "")
        prompts = load_shapes_jsonl(path) if '"scene_seed"' in first else load_geneval(path)
    else:
        prompts = load_captions(path, parse_caption)
    if not prompts:
        raise PromptFileError(f"{path.name}: no prompts found; expected at least one")
    return prompts
