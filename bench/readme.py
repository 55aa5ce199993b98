"""Keep the README true: its result blocks are copied from committed reference runs, never typed.

Blocks look like
    <!-- include: results/reference/default/tables/main.md -->
    ...generated...
    <!-- end include -->
`python -m bench.readme` refreshes them; `--check` exits 1 if any block differs from its file
(the test suite runs the check).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATTERN = re.compile(r"(<!-- include: (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- end include -->)", re.S)


INCLUDED_LEVEL = 4  # an included file's top headings become ####, under the README's ### sections
HEADING = re.compile(r"^(#+) ", re.M)


def demote(body: str, level: int = INCLUDED_LEVEL) -> str:
    """Shift an included file's Markdown headings so its shallowest one is at `level`."""
    levels = [len(h) for h in HEADING.findall(body)]
    if not levels:
        return body
    shift = level - min(levels)
    return HEADING.sub(lambda m: "#" * max(1, min(6, len(m[1]) + shift)) + " ", body)


def render(text: str, root: Path = ROOT) -> str:
    def sub(m: re.Match) -> str:
        path = root / m["path"]
        body = demote(path.read_text()) if path.exists() else f"(missing: {m['path']})\n"
        return m.group(1) + body.rstrip("\n") + "\n" + m.group(4)

    return PATTERN.sub(sub, text)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = render(text)
    if "--check" in argv:
        if new != text:
            print("README.md result blocks differ from the committed results; run `python -m bench.readme`")
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
