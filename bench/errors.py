"""User-facing errors: one line naming what is wrong and what would be right; the CLI exits 2."""

from __future__ import annotations

import difflib


class UserError(Exception):
    """Bad input from the user (arguments, suite, prompt file, weights). Printed as one line, exit 2."""


def did_you_mean(name: str, known: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def unknown(kind: str, name: str, known) -> UserError:
    known = sorted(known)
    return UserError(f"unknown {kind} {name!r}; known: {', '.join(known)}{did_you_mean(name, known)}")
