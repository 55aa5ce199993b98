"""Does an adversarial term learn? Train one student on the shipped embedded teacher and log, per update, the
generator's GAN-gradient norm against the rest of its gradient (distillation / distribution matching) and their
cosine, the discriminator's loss and its held-out accuracy (its scores on each update's batch before it trains on
it; real and fake apart), then the verdict of ``AdversarialTerm.verdict`` (did the discriminator leave chance).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/gan-probe.py --method add --updates 50 --batch 32
    OMP_NUM_THREADS=1 .venv/bin/python scripts/gan-probe.py --method add --set gan_grad_ratio=0.1 --set disc_warmup=50

The gradients are measured by two backward passes (``gan_grad_stats``); their sum is the update the method makes
without the probe, so the student is the one the method trains (up to float rounding). The student is trained
into a fresh temporary cache (never a cached one). ``--json`` writes every update's numbers and the verdict.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from methods import training  # noqa: E402
from methods.base import Context, get  # noqa: E402

# the GAN term is off in Imagine Flash's default; the probe switches it on (the with-discriminator row)
ON = {"imagine-flash": {"adversarial": True, "shared_student": True, "max_steps": 4}}
COLUMNS = ("g_norm_main", "g_norm_gan", "g_cos", "g_scale", "d", "d_acc", "d_acc_real", "d_acc_fake")


def parse_value(text: str):
    """A --set value: JSON when it parses (numbers, true/false, null, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def probe(method: str, teacher: str, updates: int, batch: int, seed: int, sets: dict) -> dict:
    """Train one student with gradient statistics on; its per-update log and the adversarial verdict."""
    from bench.components import load_backbone

    bb = load_backbone({"kind": "shapes", "teacher": teacher}, "cpu")
    cls = get(method)
    settings = {**ON.get(method, {}), "student_updates": updates, "batch_size": batch, "seed": seed,
                "gan_grad_stats": True, **sets}
    config = cls.make_config(settings)
    module = sys.modules[cls.__module__]
    module.run_updates = functools.partial(training.run_updates, log_every=1)  # one log entry per update
    with tempfile.TemporaryDirectory() as cache:
        m = cls(bb, config, Context(cache_dir=Path(cache), progress=False))
        info = m.prepare(min(m.allowed_steps(config)))
    return {"method": method, "teacher": teacher, "settings": settings, "losses": info.losses,
            "adversarial": info.adversarial, "passes": info.passes, "wall_seconds": info.wall_seconds}


def summary(log: dict, lo: int, hi: int) -> str:
    parts = []
    for k in COLUMNS:
        vals = [v for v in log.get(k, [])[lo:hi]]
        if vals:
            parts.append(f"{k} {statistics.median(vals):.3g}")
    g, m = log.get("g_norm_gan", [])[lo:hi], log.get("g_norm_main", [])[lo:hi]
    if g and m:
        parts.append("gan/main " + f"{statistics.median(a / b for a, b in zip(g, m) if b > 0):.3g}")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="add", choices=["add", "dmd2", "imagine-flash"])
    p.add_argument("--teacher", default="vp", choices=["vp", "flow"])
    p.add_argument("--updates", type=int, default=50)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a method setting (repeatable)")
    p.add_argument("--every", type=int, default=5, help="print every k-th update")
    p.add_argument("--json", type=Path, help="write every update's numbers and the verdict here")
    args = p.parse_args(argv)
    sets = dict((k, parse_value(v)) for k, v in (s.split("=", 1) for s in args.set))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = probe(args.method, args.teacher, args.updates, args.batch, args.seed, sets)
    log = out["losses"]
    keys = [k for k in log if k in COLUMNS or k in ("distill", "dm", "g_adv", "g_gan")]
    print(f"# {args.method} on the {args.teacher} teacher, {args.updates} updates x batch {args.batch}, "
          f"seed {args.seed}, settings {sets or 'default'}")
    print("| update | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    n = max(len(v) for v in log.values())
    for i in range(n):
        if i % args.every == 0 or i == n - 1:
            # keys logged only on some updates (the GAN term during a warm-up) are shorter: aligned at the end
            cells = [log[k][i - (n - len(log[k]))] if i >= n - len(log[k]) else None for k in keys]
            print(f"| {i} | " + " | ".join("—" if v is None else f"{v:.4g}" for v in cells) + " |")
    print(f"\nfirst 10 updates (medians): {summary(log, 0, 10)}")
    print(f"last 10 updates (medians): {summary(log, -10, None)}")
    print(f"head start: { {k: v for k, v in log.items() if k.endswith('_head_start')} or 'none'}")
    print(f"verdict: {out['adversarial']}")
    print(f"train passes: {out['passes']}; {out['wall_seconds']} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
