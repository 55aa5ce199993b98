"""Where each distilled method's student learns, and what one update costs: issue 20's audit, counted.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/training_allocation.py --updates 6 --cache /tmp/alloc-cache

For each method at its defaults on the shapes teacher (Imagine Flash twice: per step count, and as the lr study's
shared 1-4-step student; DMD2 also with ``grid_draw = "pairs"``), trains ``--updates`` updates at batch 32 in a
scratch cache and prints

1. the share of the student's gradient passes at each timestep, counted in training (``TrainInfo.student_timesteps``;
   for a shared student the step count is drawn once per update, so a few updates give a noisy count), beside the
   share its draw rule gives (``methods.student.grid_shares``);
2. network passes per sample per update, forward/backward by role, counted (``TrainCompute``), and scaled to the
   default 150 updates.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench.components import load_backbone
from methods import registry
from methods.base import Context
from methods.student import grid_shares

CASES = [  # (row, method, settings, steps to prepare)
    ("imagine-flash (per step count, 4-step)", "imagine-flash", {"max_steps": 4}, 4),
    ("imagine-flash (shared 1-4)", "imagine-flash", {"max_steps": 4, "shared_student": True}, 4),
    ("imagine-flash (shared 1-4, pairs)", "imagine-flash", {"max_steps": 4, "shared_student": True,
                                                            "grid_draw": "pairs"}, 4),
    ("dmd2 (shared 1-4)", "dmd2", {}, 4),
    ("dmd2 (shared 1-4, pairs)", "dmd2", {"grid_draw": "pairs"}, 4),
    ("lcm", "lcm", {}, 4),
    ("add", "add", {}, 4),
    ("progressive (4 -> 2 -> 1)", "progressive", {}, 1),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--updates", type=int, default=6, help="updates per training (progressive: over all its stages)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--cache", type=Path, help="scratch student cache (default: a temporary folder)")
    ap.add_argument("--only", help="comma-separated row prefixes to run")
    args = ap.parse_args()
    torch.set_num_threads(1)
    bb = load_backbone({"kind": "shapes"}, "cpu")
    cache = args.cache or Path(tempfile.mkdtemp(prefix="alloc-"))
    for row, name, settings, steps in CASES:
        if args.only and not any(row.startswith(p) for p in args.only.split(",")):
            continue
        cls = registry.get(name)
        config = cls.make_config({**settings, "student_updates": args.updates, "batch_size": args.batch})
        method = cls(bb, config, Context(cache_dir=cache / "students", progress=False))
        info = method.prepare(steps)
        print(f"\n## {row}: {info.student_updates} updates x batch {args.batch}, {info.train_seconds:.1f} s in updates")
        counted = {float(t): n for t, n in (info.student_timesteps or {}).items()}
        total = sum(counted.values())
        rule = getattr(config, "grid_draw", None) if getattr(config, "shared_student", False) else None
        expected = grid_shares(config.max_steps, rule, bb.schedule.grid) if rule else {}
        times = sorted(set(counted) | set(expected), reverse=True)
        if len(times) > 12:  # LCM, progressive's CFG stage: many times; print the spread
            print(f"  student trains at {len(counted)} distinct timesteps, {min(counted):g}..{max(counted):g}")
        else:
            print("  t      counted   " + ("rule " + rule if rule else ""))
            for t in times:
                share = counted.get(t, 0) / total if total else 0.0
                exp = f"{expected[t]:6.1%}" if t in expected else ""
                print(f"  {t:5g}  {share:6.1%}    {exp}")
        per = info.network_passes / info.student_updates
        roles = ", ".join(f"{r} {v['forward'] / info.student_updates:.0f}/{v['backward'] / info.student_updates:.0f}"
                          for r, v in (info.passes or {}).items())
        print(f"  passes per sample per update {per:.0f} (fwd/bwd: {roles}); x150 updates = {per * 150:,.0f}")


if __name__ == "__main__":
    main()
