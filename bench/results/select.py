"""Rows that the tables and the claims single out."""

from __future__ import annotations

import pandas as pd

REFERENCE_STEPS = 25  # the teacher at 25 steps is the reference of Table B, the speedups and claim (a)


def ok(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "ok"] if not df.empty else df


def teacher_row(df: pd.DataFrame, steps: int = REFERENCE_STEPS) -> dict | None:
    """The teacher's row at `steps` steps (DPM-Solver++ preferred when several solvers ran), or None."""
    t = ok(df)
    if t.empty:
        return None
    t = t[(t["method"] == "teacher") & (t["steps"] == steps)]
    if t.empty:
        return None
    dpm = t[t["label"].str.contains("dpm")]
    return (dpm if not dpm.empty else t).iloc[0].to_dict()


def teacher_at_nfe(df: pd.DataFrame, nfe: int) -> dict | None:
    """The teacher's row with the most NFE not above `nfe` (the teacher at equal compute per image, as near as its
    NFE grid allows: with CFG each step is 2 NFE), DPM-Solver++ preferred when several solvers ran, or None."""
    t = ok(df)
    if t.empty:
        return None
    t = t[(t["method"] == "teacher") & (t["nfe"] <= nfe)]
    if t.empty:
        return None
    t = t[t["nfe"] == t["nfe"].max()]
    dpm = t[t["label"].str.contains("dpm")]
    return (dpm if not dpm.empty else t).iloc[0].to_dict()
