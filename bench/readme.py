"""Keep the README true: its result blocks are copied from committed reference runs, never typed, and
a block whose run was made from other numeric source than the code's is marked stale.

Blocks look like
    <!-- include: results/reference/default/tables/main.md -->
    ...generated...
    <!-- end include -->
A block may also name a generator instead of a file (``<!-- include: generated:recipes -->``, see
``GENERATED``): a table built from the code itself, so it cannot drift from it.
`python -m bench.readme` refreshes them; `--check` exits 1 if any block differs from its file, or if the prose
quotes a figure with its CI that no committed table holds (the test suite runs it); `--check-fresh` exits 1 while
any cited reference run was made from other numeric source than the current code (``bench.source.source_hash``;
run by `tox -e fresh` before an issue that moves numbers is closed).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from bench.source import source_hash

ROOT = Path(__file__).resolve().parent.parent
PATTERN = re.compile(r"(<!-- include: (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- end include -->)", re.S)
REFERENCE = "results/reference/"

INCLUDED_LEVEL = 4  # an included file's top headings become ####, under the README's ### sections
HEADING = re.compile(r"^(#+) ", re.M)


def demote(body: str, level: int = INCLUDED_LEVEL) -> str:
    """Shift an included file's Markdown headings so its shallowest one is at `level`."""
    levels = [len(h) for h in HEADING.findall(body)]
    if not levels:
        return body
    shift = level - min(levels)
    return HEADING.sub(lambda m: "#" * max(1, min(6, len(m[1]) + shift)) + " ", body)


def recipes_table() -> str:
    """The `pretrained` method's recipes (``methods.pretrained.RECIPES``) as a Markdown table."""
    from methods.pretrained import RECIPES

    rows = ["| recipe | kind | scheduler | guidance | steps | other settings |", "|---|---|---|---|---|---|"]
    for name, r in RECIPES.items():
        guidance = r["guidance"] + (f" ({r['guidance_scale']:g})" if "guidance_scale" in r else "")
        other = ", ".join(f"{k} = {v}" for k, v in r.items() if k not in ("kind", "scheduler", "guidance",
                                                                           "guidance_scale", "steps"))
        rows.append(f"| `{name}` | {r['kind']} | {r['scheduler']} | {guidance} | "
                    f"{', '.join(map(str, r['steps']))} | {other or '—'} |")
    return "\n".join(rows) + "\n"


def families_table() -> str:
    """The paper suite on the VP teacher beside the paper-flow suite on the flow teacher (``bench.results.families``)."""
    from bench.results import families

    ref = ROOT / REFERENCE
    vp, flow = ref / "paper", ref / "paper-flow"
    if not (vp / "results.jsonl").exists() or not (flow / "results.jsonl").exists():
        return "No reference runs of both `paper` and `paper-flow` yet.\n"
    return (families.side_by_side(vp, flow) + "\nThe best distilled student at each step count, on each teacher:\n\n"
            + families.winners(vp, flow))


def field_comments(cls) -> dict[str, str]:
    """A dataclass's fields' trailing comments in its source (``name: type = default  # comment``)."""
    import inspect
    import io
    import tokenize

    out, line_field = {}, {}
    src = inspect.getsource(cls)
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.start[0] not in line_field:
            line_field[tok.start[0]] = tok.string
        elif tok.type == tokenize.COMMENT and tok.start[0] in line_field:
            out[line_field[tok.start[0]]] = tok.string.lstrip("# ").strip()
    return out


def settings_rows(cls, skip: set[str] = frozenset()) -> list[str]:
    """Markdown rows `| name | default | comment |` of a settings dataclass's fields (inherited ones first)."""
    import dataclasses

    notes = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            notes.update(field_comments(klass))
    rows = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else "—"
        rows.append(f"| `{f.name}` | `{default!r}` | {notes.get(f.name, '').replace('|', '/')} |")
    return rows


def backbones_table() -> str:
    """The diffusers families (``methods.backbones``): what they load, their own [backbone] settings, their
    conventions; then the settings every family takes."""
    import dataclasses

    from methods import backbones
    from methods.backbones.directory import DirectorySettings

    shared = {f.name for f in dataclasses.fields(DirectorySettings)}
    rows = ["| family | loads (model_index.json) | its own settings | conventions (unset method settings) |",
            "|---|---|---|---|"]
    for name in backbones.names():
        cls = backbones.get(name)
        own = [f"`{f.name}`" for f in dataclasses.fields(cls.Settings) if f.name not in shared]
        doc = " ".join((cls.conventions.__doc__ or "").split())
        rows.append(f"| `{name}` | {', '.join(cls.pipelines)} | {', '.join(own) or '—'} | {doc} |")
    rows += ["", "Settings of every family (`[backbone]`, kind = \"diffusers\"):", "", "| setting | default | meaning |",
             "|---|---|---|", *settings_rows(DirectorySettings)]
    own_rows = []
    for name in backbones.names():
        cls = backbones.get(name)
        own_rows += [r.replace("| `", f"| `{name}`: `", 1) for r in settings_rows(cls.Settings, shared)]
    return "\n".join(rows + sorted(set(own_rows))) + "\n"


def metrics_table() -> str:
    """Every registered metric (``bench.metrics.registry``, read from the source): its name as a suite lists it, its
    columns, what it needs, its definition (its class's first docstring line), source, weights and their license."""
    from bench.metrics import registry

    rows = ["| metric | columns | needs | definition | source | weights | license |", "|---|---|---|---|---|---|---|"]
    for name, d in registry.declared().items():
        cols = ", ".join(f"`{c['key']}`" for c in d["columns"])
        needs = (", ".join(d["needs"]) or "—") + ("; measured always, where it applies" if d["always"] else "")
        cells = [f"`{name}`", cols, needs, d["description"].replace("``", "`"), d.get("source", ""), d.get("weights", ""),
                 d.get("license", "")]
        rows.append("| " + " | ".join(c.replace("|", "/") or "—" for c in cells) + " |")
    rows += ["", "Settings (a suite's `[metrics.<name>]` table):", "", "| metric: setting | default | meaning |",
             "|---|---|---|"]
    for name in registry.declared():
        cls = registry.get(name)
        if cls.Config is not None:
            rows += [r.replace("| `", f"| `{name}`: `", 1) for r in settings_rows(cls.Config)]
    return "\n".join(rows) + "\n"


def metrics_summary() -> str:
    """The README's metric table: each registered metric's definition, source, weights and license (no settings)."""
    from bench.metrics import registry

    rows = ["| metric | definition | source | weights | license |", "|---|---|---|---|---|"]
    for name, d in registry.declared().items():
        cells = [f"`{name}`", d["description"].replace("``", "`"), d.get("source", ""), d.get("weights", ""),
                 d.get("license", "")]
        rows.append("| " + " | ".join(c.replace("|", "/") or "—" for c in cells) + " |")
    return "\n".join(rows) + "\n"


GENERATED = {"generated:recipes": recipes_table, "generated:families": families_table,
             "generated:backbones": backbones_table, "generated:metrics": metrics_table,
             "generated:metrics-summary": metrics_summary}


def run_of(include: str, root: Path = ROOT) -> Path | None:
    """The reference run directory an included file belongs to (None for files outside a run)."""
    if not include.startswith(REFERENCE):
        return None
    run = root / REFERENCE / include[len(REFERENCE):].split("/", 1)[0]
    return run if (run / "config.json").exists() else None


def stale_runs(text: str, root: Path = ROOT, current: str | None = None) -> dict[str, str | None]:
    """Cited reference runs whose recorded numeric source differs from the code's: run name -> its hash.

    Study runs are exempt: a study is made before its choice is written into the defaults, so its
    source always differs; it documents how a default was chosen (tests check the default still is it)."""
    current = current or source_hash(root)
    out = {}
    for m in PATTERN.finditer(text):
        run = run_of(m["path"], root)
        if run is not None:
            config = json.loads((run / "config.json").read_text())
            is_study = config.get("study") is not None or (run / "choice.json").exists()
            if not is_study and config.get("source_sha256") != current:
                out[run.name] = config.get("source_sha256")
    return out


def render(text: str, root: Path = ROOT, current: str | None = None) -> str:
    stale = stale_runs(text, root, current)
    current = current or source_hash(root)

    def sub(m: re.Match) -> str:
        path = root / m["path"]
        if m["path"] in GENERATED:
            body = GENERATED[m["path"]]()
        else:
            body = demote(path.read_text()) if path.exists() else f"(missing: {m['path']})\n"
        run = run_of(m["path"], root)
        if run is not None and run.name in stale:
            body = (f"> **Stale:** `{run.name}` was made from numeric source `{stale[run.name]}`; the code now hashes "
                    f"to `{current}`. Re-run it before trusting these figures.\n\n" + body)
        return m.group(1) + body.rstrip("\n") + "\n" + m.group(4)

    return PATTERN.sub(sub, text)


def documents(root: Path = ROOT) -> list[Path]:
    """README.md and every docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


FIGURE = re.compile(r"(-?\d+\.\d+)\s+\[(-?\d+\.\d+),\s+(-?\d+\.\d+)\]")  # "2.16 [1.89, 2.46]", maybe over 2 lines


def unquoted_figures(root: Path = ROOT) -> list[str]:
    """"doc:line: figure" for every figure with a CI that the docs' prose (outside generated blocks) quotes and no
    committed reference table (``results/reference/**/*.md``) holds: a sentence whose run was re-made under it."""
    known = {m for p in sorted((root / REFERENCE).rglob("*.md")) for m in FIGURE.findall(p.read_text())}
    out = []
    for doc in documents(root):
        text = doc.read_text()
        prose = PATTERN.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # blocks blanked, line numbers kept
        out += [f"{doc.relative_to(root).as_posix()}:{prose[:m.start()].count(chr(10)) + 1}: {' '.join(m.group(0).split())}"
                for m in FIGURE.finditer(prose) if m.groups() not in known]
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--check-fresh" in argv:
        stale = {}
        for doc in documents():
            stale.update(stale_runs(doc.read_text()))
        for name, made in stale.items():
            print(f"stale reference: results/reference/{name} (made from source {made}, code is {source_hash()})")
        return 1 if stale else 0
    differ = []
    for doc in documents():
        text = doc.read_text()
        new = render(text)
        if new != text:
            differ.append(doc.relative_to(ROOT).as_posix())
            if "--check" not in argv:
                doc.write_text(new)
    if "--check" in argv and differ:
        print(f"{', '.join(differ)}: result blocks differ from the committed results; run `python -m bench.readme`")
        return 1
    if "--check" in argv and (quoted := unquoted_figures()):
        print("figures quoted in prose that no committed reference table holds (re-read them from the tables):\n"
              + "\n".join(quoted))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
