"""The `flashbench` command. Bad input: one line on stderr, exit status 2, nothing written.

Commands that run networks import torch only when called, so ``--help`` and ``list`` stay instant.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from bench import suite as suite_mod
from bench import study as study_mod
from bench.results import compare, tables
from bench.rundir import RESULTS_FILE, read_config
from core.errors import UserError
from methods import registry


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"flashbench: error: {one_line(message)} (see `{self.prog} --help`)\n")


def one_line(message: str) -> str:
    """A message as one printable line: control characters from user input (\\r, \\n, ...) are escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message))


def _csv(text: str, what: str, kind=int) -> list:
    """Comma-separated integers (kind=int) or numbers (kind=float); a one-line error otherwise."""
    example, noun = ("1,2,4", "integers") if kind is int else ("0.25,0.5", "numbers")
    try:
        vals = [kind(v) for v in text.split(",") if v.strip() != ""]
    except ValueError:
        raise UserError(f"{what} must be comma-separated {noun} like {example}; got {text!r}") from None
    if not vals:
        raise UserError(f"{what} must name at least one {noun[:-1]}; got {text!r}")
    return vals


def _int_csv(text: str, what: str) -> list[int]:
    return _csv(text, what, int)


def _scoring_options(p: argparse.ArgumentParser) -> None:
    """The options of the commands that only measure (`merge`, `evaluate`)."""
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cache", type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true", help="(no progress bars are shown here)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="flashbench", description="Few-step text-to-image distillation at fixed NFE budgets.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="run a suite (default: the default suite)")
    r.add_argument("suite", nargs="?", default=None, help="suite name (see `flashbench list`) or a .toml path")
    r.add_argument("--methods", help="comma-separated method names or labels of the suite to run")
    r.add_argument("--nfe", help="comma-separated NFE budgets, replacing the suite's")
    r.add_argument("--samples", type=int, help="number of prompts (the first N of the suite's set, or of its protocol's draw)")
    r.add_argument("--seeds", help="comma-separated seeds")
    r.add_argument("--out", type=Path, help="run directory (default results/<suite>-<time>); never overwritten")
    r.add_argument("--resume", type=Path, metavar="RUN", help="finish an interrupted run in RUN")
    r.add_argument("--device", default="cpu", help="cpu or cuda")
    r.add_argument("--cache", type=Path, help="cache of trained students and FID references "
                   "(default $FLASHBENCH_CACHE or ~/.cache/flashbench)")
    r.add_argument("--dry-run", action="store_true", help="validate and print the plan; write nothing")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--shard", metavar="I/N", help="sample only the I-th of N prompt shards (0-based; e.g. "
                   "$SLURM_ARRAY_TASK_ID/8); join the shards with `flashbench merge`")
    r.add_argument("--save-samples", action="store_true", help="write every sample as PNG (GenEval layout) under "
                   "RUN/samples/, for `flashbench evaluate`")

    mg = sub.add_parser("merge", help="one run's results from the shards of a split run (--shard)")
    mg.add_argument("runs", nargs="+", type=Path, help="the shard run directories")
    _scoring_options(mg)

    ev = sub.add_parser("evaluate", help="score saved samples (GenEval layout) under a suite's protocol")
    ev.add_argument("folder", type=Path, help="a folder of samples, or a run's samples/ folder")
    ev.add_argument("suite", nargs="?", default=None, help="the suite whose evaluators and metrics to use (default: default)")
    _scoring_options(ev)

    st = sub.add_parser("study", help="choose a default by the study's rule, on validation prompts (see `list`)")
    st.add_argument("study", help="a study name (bench/studies/NAME.toml) or a .toml path")
    st.add_argument("--samples", type=int, help="validation prompts (default: the study's)")
    st.add_argument("--train-seeds", help="comma-separated training seeds (default: the study's)")
    st.add_argument("--out", type=Path)
    st.add_argument("--resume", type=Path, metavar="RUN", help="finish an interrupted study run in RUN")
    st.add_argument("--device", default="cpu")
    st.add_argument("--cache", type=Path)
    st.add_argument("--dry-run", action="store_true", help="validate and print the plan; write nothing")
    st.add_argument("--no-progress", action="store_true")

    bl = sub.add_parser("baseline", help="derive a run's regression tolerances from its seed-to-seed spread")
    bl.add_argument("run", type=Path)
    cp = sub.add_parser("compare", help="regression gate: exit 1 if RUN is worse than BASELINE beyond tolerance")
    cp.add_argument("baseline", type=Path)
    cp.add_argument("run", type=Path)

    sub.add_parser("list", help="registered methods and available suites")

    t = sub.add_parser("table", help="rebuild a run's tables, plots and grid overview from its results")
    t.add_argument("run", type=Path)

    tt = sub.add_parser("train-teacher", help="train an embedded shapes teacher (reproduces the shipped weights)")
    tt.add_argument("--kind", choices=("vp", "flow"), default="vp",
                    help="vp: ε-prediction on SD's schedule (teacher.safetensors); flow: rectified flow (teacher-flow)")
    tt.add_argument("--out", type=Path, default=Path("artifacts/teacher"))
    tt.add_argument("--steps", type=int)
    tt.add_argument("--device", default="cpu")

    te = sub.add_parser("train-evaluators", help="train the frozen evaluators (reproduces the shipped weights)")
    te.add_argument("--out", type=Path, default=Path("artifacts/evaluators"))
    return p


def cmd_run(args) -> int:
    from bench import runner

    if args.resume is not None:
        s = suite_mod.from_dict(read_config(args.resume)["suite"])
        out, resume = args.resume, True
    else:
        s = suite_mod.load(args.suite)
        s = suite_mod.override(
            s,
            methods=[m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None,
            nfe=_int_csv(args.nfe, "--nfe") if args.nfe else None,
            samples=args.samples,
            seeds=_int_csv(args.seeds, "--seeds") if args.seeds else None,
        )
        out, resume = args.out, False
    shard = _shard(args.shard) if args.shard else None
    if resume:
        shard = tuple(read_config(args.resume).get("shard") or ()) or None
    opts = runner.Options(out=out, device=args.device, cache=args.cache, resume=resume,
                          progress=not args.no_progress, dry_run=args.dry_run,
                          command=getattr(args, "command_line", None), shard=shard, save_samples=args.save_samples)
    path = runner.run(s, opts)
    if path is not None and shard is None:
        print(f"results: {path}/results.jsonl\ntable:   {path}/tables/main.md")
        print((path / "tables" / "main.md").read_text())
    elif path is not None:
        print(f"shard {shard[0]}/{shard[1]}: {path}; join the shards with `flashbench merge SHARD_RUNS... --out RUN`")
    return 0


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--shard must be I/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise UserError(f"--shard must be I/N with 0 <= I < N, got {text!r}")
    return i, n


def cmd_merge(args) -> int:
    from bench import merge

    path = merge.merge(args.runs, args.out, args.cache, args.device)
    print((path / "tables" / "main.md").read_text())
    return 0


def cmd_evaluate(args) -> int:
    from bench import evaluate

    path = evaluate.evaluate(args.folder, suite_mod.load(args.suite), args.out, args.cache, args.device)
    print((path / "tables" / "main.md").read_text())
    return 0


def cmd_study(args) -> int:
    from bench import runner

    study = study_mod.load(args.study)
    if args.resume is not None:
        s = suite_mod.from_dict(read_config(args.resume)["suite"])
    else:
        seeds = _int_csv(args.train_seeds, "--train-seeds") if args.train_seeds else None
        if args.samples is not None and args.samples < 1:
            raise UserError(f"--samples must be a positive integer, got {args.samples}")
        s = study_mod.build_suite(study, args.samples, seeds)
    opts = runner.Options(out=args.resume or args.out, device=args.device, cache=args.cache, resume=args.resume is not None,
                          progress=not args.no_progress, dry_run=args.dry_run,
                          command=getattr(args, "command_line", None), study=study["name"])
    path = runner.run(s, opts)
    if path is not None:
        study_mod.choose(path, study)
        print((path / "tables" / "study.md").read_text())
    return 0


def cmd_baseline(args) -> int:
    tol = compare.make_baseline(args.run)
    print(f"{args.run / compare.TOLERANCES}: tolerances for {len(tol['cells'])} cells")
    return 0


def cmd_compare(args) -> int:
    report, regressed = compare.compare(args.baseline, args.run)
    print(report)
    return 1 if regressed else 0


def cmd_list(_args) -> int:
    print("methods:")
    for n in registry.names():
        print(f"  {n:15s} {registry.summary(n)}")
    print("studies:")
    for name, path in study_mod.available().items():
        print(f"  {name:26s} {_description(path)}")
    print("suites:")
    for name, path in suite_mod.available().items():
        print(f"  {name:15s} {_description(path)}")
    return 0


def _description(path: Path) -> str:
    """The description line of a suite or study file (read as text: no TOML parse, no import)."""
    for line in path.read_text().splitlines():
        if line.startswith("description"):
            return line.split("=", 1)[1].strip().strip('"')
    return ""


def cmd_table(args) -> int:
    if not (args.run / RESULTS_FILE).exists():
        raise UserError(f"{args.run} has no {RESULTS_FILE}; give a run directory written by `flashbench run`")
    tables.write_all(args.run)
    print((args.run / "tables" / "main.md").read_text())
    return 0


def _fresh_out(out: Path, product: str) -> None:
    if (out / product).exists():
        raise UserError(f"{out / product} already exists; choose another --out")


def cmd_train_teacher(args) -> int:
    from bench.components import check_device
    from bench.shapes.train_teacher import TeacherTrainConfig, train_teacher

    from bench.shapes import TEACHER_FILES

    check_device(args.device)
    _fresh_out(args.out, TEACHER_FILES[args.kind][0])
    cfg = TeacherTrainConfig(kind=args.kind)
    if args.steps is not None:
        if args.steps < 1:
            raise UserError(f"--steps must be a positive integer, got {args.steps}")
        cfg.steps = args.steps
    path = train_teacher(cfg, args.out, device=args.device)
    print(f"teacher: {path}")
    return 0


def cmd_train_evaluators(args) -> int:
    from bench.shapes.train_evaluators import EvaluatorTrainConfig, train_evaluators

    _fresh_out(args.out, "attribute_net.safetensors")
    report = train_evaluators(EvaluatorTrainConfig(), args.out)
    print(json.dumps(report, indent=2))
    return 0


COMMANDS = {"run": cmd_run, "study": cmd_study, "merge": cmd_merge, "evaluate": cmd_evaluate,
            "baseline": cmd_baseline, "compare": cmd_compare, "list": cmd_list, "table": cmd_table,
            "train-teacher": cmd_train_teacher, "train-evaluators": cmd_train_evaluators}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["flashbench", *argv])
    try:
        return COMMANDS[args.cmd](args)
    except UserError as e:
        print(f"flashbench: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flashbench: interrupted; finished cells are kept — continue with `flashbench run --resume RUN`",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
