"""A suite at equal compute, derived from a learning-curves run by the rule of ``curves.equal_compute``.

The paper suites train every method for the same number of updates; the ``curves`` run shows that an update costs
each method a different number of network passes and that the methods plateau (or degrade) at different budgets.
``equal_compute_suite(run, base)`` writes the base suite (``bench/suites/BASE.toml``: its prompts, samples,
metrics, latency and teacher entries) with each of the curves' methods trained for the update count that
``equal_compute`` picked at each step count on the validation prompts, so the tables and claims on the
evaluation prompts compare the methods at equal compute past their plateaus. Nothing is chosen by hand:

    python -m bench.results.budgets results/reference/curves --base paper > bench/suites/paper-equal-compute.toml
    python -m bench.results.budgets results/reference/curves --base paper --check bench/suites/paper-equal-compute.toml

Only curves named after their method are taken (the paper suite's entries; e.g. not ``imagine-flash-per-step``).
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

from bench.results import curves
from bench.rundir import load_rows

SUITES_DIR = Path(__file__).resolve().parent.parent / "suites"


def chosen_updates(run: Path) -> dict[str, dict[int, int]]:
    """{curve: {steps: nominal update count}}: the point ``curves.equal_compute`` compares for each curve at each
    step count of a curves run (the suite's update count, ``" u=N"`` in the label; progressive's per-step
    students train a fraction of it). Raises ValueError for a run without curves."""
    import pandas as pd

    df = pd.DataFrame(load_rows(run))
    pts = curves.points(df)
    if not pts:
        raise ValueError(f"{run}: no learning-curve rows (run a suite with [curves], e.g. `flashbench run curves`)")
    out: dict[str, dict[int, int]] = {}
    for (curve, steps), updates in curves.equal_compute_updates(pts).items():
        out.setdefault(curve, {})[steps] = updates
    return out


def equal_compute_suite(run: Path, base: str = "paper") -> str:
    """The TOML text of the base suite with the curves' methods at their equal-compute update counts (one entry per
    method and update count, labelled ``METHOD u=N``, with the step counts it serves there), the training seeds
    of the curves run, and the base suite's untrained entries (the teacher). Raises ValueError as
    ``chosen_updates``, when the base suite has no [[methods]], and when the curves run trained against another
    backbone (teacher) than the base suite's."""
    run = Path(run)
    config = json.loads((run / "config.json").read_text())
    suite = config["suite"]
    chosen = chosen_updates(run)
    path = SUITES_DIR / f"{base}.toml"  # read as text: the suite module imports the methods (torch)
    if not path.is_file():
        raise ValueError(f"no suite {base!r} in {SUITES_DIR}")
    text = path.read_text()
    raw = tomllib.loads(text)
    if "[[methods]]" not in text:
        raise ValueError(f"{path}: no [[methods]] entries")
    ran_on = {"kind": "shapes", **(suite.get("backbone") or {})}
    base_on = {"kind": "shapes", **raw.get("backbone", {})}
    if ran_on != base_on:  # the curves' update counts are a property of the teacher they trained against
        raise ValueError(f"{run} trained against backbone {ran_on} but suite {base!r} runs on {base_on}; "
                         "use the curves run of the base suite's teacher (e.g. curves-flow for paper-flow)")
    head = text[:text.index("[[methods]]")]
    entries = {e["curve"]: e for e in suite["entries"] if e.get("curve")}
    seeds = sorted({e["train_seed"] for e in suite["entries"] if e.get("train_seed") is not None})
    lines = [f'name = "{base}-equal-compute"',
             f'description = "The {base} suite at equal compute: each method trained for the update count the '
             f'learning curves chose at each step count (bench/results/budgets.py from results/reference/{run.name}: per step '
             'count, each curve at its best validation point within the network passes of the last plateau); '
             'generated, do not edit"']
    body = "\n".join(line for line in head.splitlines()  # the base's own name, description and comments go
                     if not line.startswith(("description", "name", "#")))
    body = body.replace(f"student_updates = {raw.get('train', {}).get('student_updates')}\n", "")
    cut = body.find("\n[")  # the top-level keys end at the first table; train_seeds is one of them
    top, tables = (body, "") if cut < 0 else (body[:cut], body[cut:])
    lines += [top.rstrip(), f"train_seeds = {seeds}" if seeds else "", tables.rstrip(), ""]
    for m in raw["methods"]:
        label = m.get("label", m["name"])
        if m["name"] == "teacher":  # untrained: as the base suite has it
            lines += _entry(m["name"], label, m["steps"], m.get("settings", {}), m.get("variant"))
            continue
        if label not in entries:
            continue
        curve = entries[label]
        settings = {k: v for k, v in curve["settings"].items() if k not in ("student_updates", "seed")}
        by_updates: dict[int, list[int]] = {}
        for steps in m["steps"]:
            if steps in chosen.get(label, {}):
                by_updates.setdefault(chosen[label][steps], []).append(steps)
        for updates, steps in sorted(by_updates.items()):
            lines += _entry(m["name"], f"{label} u={updates}", steps, {**settings, "student_updates": updates},
                            m.get("variant"))
    return "\n".join(lines).replace("\n\n\n", "\n\n").rstrip() + "\n"


def _entry(name: str, label: str, steps: list[int], settings: dict, variant: str | None) -> list[str]:
    out = ["[[methods]]", f'name = "{name}"', f'label = "{label}"']
    if variant:
        out.append(f'variant = "{variant}"')
    out.append(f"steps = {sorted(steps)}")
    if settings:
        out.append("settings = { " + ", ".join(f"{k} = {_toml(v)}" for k, v in settings.items()) + " }")
    return out + [""]


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.results.budgets", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a curves run (results/reference/curves)")
    p.add_argument("--base", default="paper", help="the suite whose protocol and teacher entries are kept")
    p.add_argument("--check", metavar="SUITE_TOML", help="exit 1 when this file differs from what the rule derives")
    a = p.parse_args(argv)
    try:
        text = equal_compute_suite(Path(a.run), a.base)
    except (OSError, ValueError, KeyError) as e:
        print(f"budgets: {e}", file=sys.stderr)
        return 2
    if a.check:
        if not Path(a.check).is_file():
            print(f"budgets: --check {a.check}: no such file (a committed suite, e.g. "
                  f"bench/suites/{a.base}-equal-compute.toml)", file=sys.stderr)
            return 2
        if Path(a.check).read_text() != text:
            print(f"{a.check} differs from what {a.run} derives; regenerate it (python -m bench.results.budgets "
                  f"{a.run} --base {a.base} > {a.check})", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
