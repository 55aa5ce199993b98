"""The README's figures about the reference runs, derived from files — never typed.

``python -m bench.report [results/reference]`` reads every run directory under the reference folder
(``config.json``: the command that made it and the machine's thread count; ``summary.json``: wall
time; ``results.jsonl``: the rows; ``floor.json``: the real-vs-real FID floor) plus the shipped
weight cards, and writes ``FIGURES.md`` there: how long each reference run took and with which
command, the shipped teacher's and evaluators' figures, and the checks the spine's issue asks of the
teacher (accuracy at 25 steps, 3 steps worse than 25 outside the CIs), decided by rule.
``python -m bench.readme`` then copies it into the README.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.rundir import load_rows
from bench.shapes import ASSETS, ATTRIBUTE_NET_CARD, TEACHER_FILES
from bench.specs import fmt
from core import io

ROOT = Path(__file__).resolve().parent.parent
ACCURACY_AIM = 0.8


def _runs(ref: Path) -> list[Path]:
    return sorted(p for p in ref.iterdir() if (p / "config.json").exists() and (p / "summary.json").exists())


def _minutes(s: float) -> str:
    return f"{s / 60:.1f} min"


def run_table(ref: Path) -> list[str]:
    """Wall time per run; students an earlier run had trained were loaded from the cache (not in that time)."""
    lines = ["| run | command | wall time | cells | students trained / loaded from cache | torch threads |",
             "|---|---|---|---|---|---|"]
    for p in _runs(ref):
        cfg = json.loads((p / "config.json").read_text())
        summ = json.loads((p / "summary.json").read_text())
        resumed = " (resumed)" if cfg.get("resumed") else ""
        students = {}
        for r in load_rows(p):
            t = r.get("train") or {}
            if t.get("checkpoint"):
                students.setdefault(t["checkpoint"], bool(t.get("cached")))
        cached = sum(students.values())
        lines.append(f"| `{p.name}` | `{cfg.get('command') or '(not recorded)'}` | "
                     f"{_minutes(summ['wall_seconds_this_session'])}{resumed} | {summ['cells']} | "
                     f"{len(students) - cached} / {cached} | {cfg.get('threads')} |")
    return lines


def _row(rows: list[dict], label: str, steps: int) -> dict | None:
    hits = [r for r in rows if r["label"] == label and r["steps"] == steps and r.get("status") == "ok"]
    return hits[0] if hits else None


def teacher_checks(run: Path, label: str = "teacher-dpm++") -> list[str]:
    """The teacher's figures at 25 and 1-4 steps, and the spine's two checks, by rule."""
    rows = load_rows(run)
    r25, r3 = _row(rows, label, 25), _row(rows, label, 3)
    if r25 is None:
        return [f"(no `{label}` row at 25 steps in `{run.name}`)"]
    w = (r25.get("settings") or {}).get("guidance_scale")
    lines = [f"Teacher, DPM-Solver++ with CFG{'' if w is None else f' (guidance {w:g})'}, {r25['n_samples']} evaluation prompts "
             f"(from `{run.name}`; 95% bootstrap CIs):", "",
             "| steps | NFE | FID ↓ | CLIP ↑ | accuracy ↑ | two-object accuracy ↑ |", "|---|---|---|---|---|---|"]
    for steps in (1, 2, 3, 4, 8, 25):
        r = _row(rows, label, steps)
        if r is not None:
            two = r.get("accuracy_two_object")
            lines.append(f"| {steps} | {r['nfe']} | {fmt(r, 'fid')} | {fmt(r, 'clip_score')} | {fmt(r, 'accuracy')} | "
                         f"{'—' if two is None else f'{two:.3f}'} |")
    acc_ok = r25["accuracy"] >= ACCURACY_AIM
    lines += ["", f"- Whole-prompt accuracy at 25 steps ≥ {ACCURACY_AIM}: **{'yes' if acc_ok else 'no'}** "
                  f"({r25['accuracy']:.3f})."]
    if r3 is not None:
        fid_sep = r3["fid_ci_low"] > r25["fid_ci_high"]
        acc_sep = r3["accuracy_ci_high"] < r25["accuracy_ci_low"]
        lines.append(f"- 3 steps worse than 25 outside the CIs: FID **{'yes' if fid_sep else 'no'}** "
                     f"({r3['fid']:.2f} [{r3['fid_ci_low']:.2f}, {r3['fid_ci_high']:.2f}] vs "
                     f"{r25['fid']:.2f} [{r25['fid_ci_low']:.2f}, {r25['fid_ci_high']:.2f}]), "
                     f"accuracy **{'yes' if acc_sep else 'no'}**.")
    floor_path = run / "floor.json"
    if floor_path.exists():
        f = json.loads(floor_path.read_text())
        fr = f["real_vs_real"]
        lines.append(f"- FID floor (real renders of the same {f['n']} prompts, other nuisance draws, against the "
                     f"reference): {fr['fid']:.2f} [{fr['fid_ci_low']:.2f}, {fr['fid_ci_high']:.2f}]; "
                     f"CLIP score of real renders {fr['clip_score']:.2f}, accuracy {fr['accuracy']:.3f}.")
    return lines


def weight_cards() -> list[str]:
    e = json.loads(ATTRIBUTE_NET_CARD.read_text())
    h = e["heldout"]
    out = []
    for kind, what in (("vp", "ε-prediction, SD's schedule"), ("flow", "rectified-flow velocity")):
        weights, card = (ASSETS / f for f in TEACHER_FILES[kind])
        if not card.exists():
            continue
        t = json.loads(card.read_text())
        tc = t["train_config"]
        out.append(f"- Teacher `{kind}` ({what}; `{weights.relative_to(ROOT)}`, sha256 `{t['sha256'][:12]}…`): "
                   f"{t['params'] / 1e6:.2f} M parameters (UNet + text encoder), {tc['steps']} steps at batch "
                   f"{tc['batch_size']}, {_minutes(t['train_seconds_last_session'])} on this machine (its last "
                   f"session); `{t['command']}` reproduces it.")
    return out + [
        f"- Attribute network (held-out real renders, n = {h['n']}): shape {h['shape']:.4f}, colour {h['color']:.4f}, "
        f"size {h['size']:.4f}, whole image {h['whole_image']:.4f}. Tiny CLIP: retrieval top-1 among 2000 captions "
        f"{h['clip_retrieval_top1']:.3f}; CLIP score of matched pairs {h['clip_score_matched']:.1f} vs shuffled "
        f"{h['clip_score_shuffled']:.1f}. `{e['command']}` reproduces both.",
    ]


def build(ref: Path) -> str:
    lines = ["### Where the figures come from", "",
             "Each reference run below was made on this project's machine (2 CPU cores, no GPU) with the command "
             "shown, into `results/reference/`; tables are copied from its files by `python -m bench.readme`, this "
             "block by `python -m bench.report`. Wall times include building FID reference statistics where a run's "
             "cache lacked them; a student loaded from the cache was trained by an earlier run (a study's, with the "
             "same settings and seed). Runs with 1 torch thread (`--threads 1`, or `OMP_NUM_THREADS=1` for a study) "
             "sometimes ran beside one or two others, so a run's wall time, and the training seconds of the students "
             "it trained, can be longer than alone would take; network passes are exact. A student is bit-reproducible"
             " at the thread count it trained with, and a training continued from a cached shorter one equals the "
             "straight training bit for bit, except ADD's: its discriminator head start draws its batches at indices "
             "after the run's last update, so a continued ADD student differs from a straight one (`paper`'s ADD at 1 "
             "step: FID 44.33 continued, 43.79 straight; its rows continue `curves`' 100-update students, and "
             "`paper-flow`'s `curves-flow`'s, because the references ran in that order; to reproduce those rows "
             "exactly, run `curves` before `paper` and `curves-flow` before `paper-flow` with the same cache). With "
             "another thread count the float reduction order differs and, after 150 updates, so does the student, by "
             "about as much as another training seed (docs/studies.md, imagine-flash-srl). To reproduce a row's "
             "students exactly, train them with the thread count in the last column.", ""]
    lines += run_table(ref) + ["", "### Shipped weights", ""] + weight_cards()
    default = ref / "default"
    if (default / "results.jsonl").exists():
        lines += ["", "### The teacher's quality", ""] + teacher_checks(default)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ref = Path(argv[0]) if argv else ROOT / "results" / "reference"
    if not ref.is_dir():
        print(f"bench.report: error: {ref} is not a directory of reference runs", file=sys.stderr)
        return 2
    io.write_text(ref / "FIGURES.md", build(ref))
    return 0


if __name__ == "__main__":
    sys.exit(main())
