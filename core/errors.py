"""User-facing errors: one line naming what is wrong and what would be right; the CLI exits 2."""

from __future__ import annotations

import difflib


class UserError(Exception):
    """Bad input from the user (arguments, suite, prompt file, weights). Printed as one line, exit 2."""


class WeightsError(UserError):
    """Missing or corrupt weight files (shipped or given): the message names the file and how to remake it."""


def did_you_mean(name: str, known: list[str] | tuple[str, ...]) -> str:
    """"; did you mean 'x'?" for the closest known name, or "" when none is close."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def unknown(kind: str, name: str, known) -> UserError:
    """The one-line error for an unknown name: the known names and a "did you mean"."""
    known = sorted(known)
    return UserError(f"unknown {kind} {name!r}; known: {', '.join(known)}{did_you_mean(name, known)}")
