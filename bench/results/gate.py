"""The regression gate against per-device references: `flashbench compare RUN --store DIR [--bootstrap]`.

A run is compared only with the reference of its own key (``bench.results.reference``), in two tiers:

  (a) near-bitwise: each sample of seed 0 in the run's grids against the reference's, by SSIM, with
      the reference's threshold (``bench.results.images``);
  (b) distributions: per cell, the mean over seeds of FID, CLIP score and accuracy within max(K · std
      over the reference's seeds, floor) (``bench.results.compare``).

Either tier failing fails the gate. With ``--bootstrap``, a run whose key has no reference yet is filed
as it and passes with a notice. Latency is gated apart, against main-branch history (``bench.results.history``).
"""

from __future__ import annotations

from pathlib import Path

from bench.results import compare, images, reference
from bench.rundir import load_rows, read_config
from core import io
from core.errors import UserError


def check(ref: Path, run: Path, device: str | None = None) -> tuple[str, bool]:
    """(Markdown report, failed?) of RUN against the filed reference REF, both tiers; also written to
    RUN/compare.md. UserError when their keys or protocols differ; `device`: ``--device-class``."""
    meta = reference.load(ref)
    want, key = reference.Key(**meta["key"]), reference.run_key(run, device)
    if key != want:
        raise UserError(f"{run} is {key.name} but the reference {ref} is {want.name}; a reference answers only for "
                        "its own suite, device and versions (use --store to find the run's own)")
    tol = compare.read_tolerances(ref)
    base_rows, new_rows = load_rows(ref), load_rows(run)
    compare.check_protocol(tol, new_rows, ref, run)
    cells = [c for c in compare.ok_cells(base_rows) if images.grid_path(ref, *c).exists()]
    counts = (images.grid_count(read_config(ref)), images.grid_count(read_config(run)))
    a_lines, a_failed = images.tier_a(ref, run, cells, counts, float(meta["images"]["threshold"]))
    b_lines, b_failed = compare.tier_b(tol, base_rows, new_rows)
    failed = a_failed or b_failed
    verdict = "**PASS**" if not failed else "**FAIL: " + " and ".join(
        t for t, f in (("tier (a) samples differ", a_failed), ("tier (b) regression", b_failed)) if f) + "**"
    lines = [f"# Regression gate: {Path(run).name} vs reference {want.name}", "", *a_lines, "",
             "## Tier (b): distributions over seeds", "", compare.window_note(tol), "", *b_lines, "", verdict, ""]
    report = "\n".join(lines)
    io.write_text(Path(run) / "compare.md", report)
    return report, failed


def check_in_store(store: Path, run: Path, device: str | None = None, bootstrap: bool = False) -> tuple[str, bool]:
    """(report, failed?) of RUN against the reference of its key in STORE (``check``).

    When the key has none: with `bootstrap`, RUN is filed as it and the report is one notice line (not
    failed); without, UserError naming the key and how to make one.
    """
    key = reference.run_key(run, device)
    ref = reference.find(store, key)
    if ref is not None:
        return check(ref, run, device)
    if not bootstrap:
        have = sorted(p.parent.name for p in Path(store).glob(f"*/{reference.REFERENCE}"))
        raise UserError(f"no reference for {key.name} in {store} (it has: {', '.join(have) or 'none'}); pass "
                        f"--bootstrap to file this run as it, or `flashbench baseline {run} --store {store}`")
    path = reference.file(run, store, key)
    return (f"notice: no reference for {key.name} in {store}: filed {run} as it at {path} (bootstrap); "
            "nothing was compared — commit it to make the gate bite"), False
