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
from bench.results import compare, gate, history, reference  # light: tables (pandas, plots) load where used
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
    r.add_argument("--device", help="cpu (default) or cuda[:N]")
    r.add_argument("--cache", type=Path, help="cache of trained students and FID references "
                   "(default $FLASHBENCH_CACHE or ~/.cache/flashbench)")
    r.add_argument("--dry-run", action="store_true", help="validate and print the plan; write nothing")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's, one per core); "
                   "recorded with every latency")
    r.add_argument("--shard", metavar="I/N", help="sample only the I-th of N prompt shards (0-based; e.g. "
                   "$SLURM_ARRAY_TASK_ID/8); join the shards with `flashbench merge`")
    r.add_argument("--save-samples", action="store_true", help="write every sample as PNG (GenEval layout) under "
                   "RUN/samples/, for `flashbench evaluate`")
    r.add_argument("--device-memory", metavar="SIZE", help="plan a real-scale suite for a device of SIZE (e.g. 80GB, "
                   "79.6GiB; default the CUDA device's own) and refuse a plan that does not fit it")

    mg = sub.add_parser("merge", help="one run's results from the shards of a split run (--shard)")
    mg.add_argument("runs", nargs="+", type=Path, help="the shard run directories")
    _scoring_options(mg)

    ev = sub.add_parser("evaluate", help="score saved samples (GenEval layout) under a suite's protocol")
    ev.add_argument("folders", nargs="+", metavar="FOLDER [SUITE]",
                    help="one or more folders of samples (a cell's, a run's or a shard's samples/, or several shards'), "
                    "then optionally the suite whose evaluators and metrics to use (a name or a .toml; default: default)")
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

    bl = sub.add_parser("baseline", help="derive a run's regression tolerances from its seed-to-seed spread "
                        "(with --store: file it as the reference of its device key)")
    bl.add_argument("run", type=Path)
    bl.add_argument("--store", type=Path, help="file RUN as the reference of its key (suite, device class, torch and "
                    "diffusers versions) in this folder, e.g. results/reference/gate (docs/gpu-ci.md)")
    bl.add_argument("--bootstrap", action="store_true",
                    help="with --store: file RUN only if its key has no reference yet (else keep that one, exit 0)")
    bl.add_argument("--image-threshold", type=float, help="with --store: tier (a)'s lowest SSIM of a sample to the "
                    f"reference's, in (0, 1] (default {reference.IMAGE_THRESHOLD}: measured on a CPU; re-measure per GPU)")
    _device_class_option(bl)
    cp = sub.add_parser("compare", help="regression gate: exit 1 if RUN is worse than BASELINE beyond tolerance",
                        usage="flashbench compare BASELINE RUN | flashbench compare RUN --store DIR [--bootstrap]")
    cp.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="BASELINE RUN, or RUN with --store")
    cp.add_argument("--store", type=Path, help="compare RUN with the reference of its own key in this folder")
    cp.add_argument("--bootstrap", action="store_true", help="with --store: when RUN's key has no reference, file RUN "
                    "as it and exit 0 with a notice")
    _device_class_option(cp)
    lg = sub.add_parser("latency-gate", help="latency gate: exit 1 if a cell of RUN is slower than the median of the "
                        "last main-branch runs of its key by more than both limits")
    lg.add_argument("run", type=Path)
    lg.add_argument("--history", type=Path, required=True, help="folder of latency histories, one <key>.jsonl per key")
    lg.add_argument("--main", action="store_true", help="RUN is of the main branch: append it to the history "
                    "(after comparing); never pass it for a pull request")
    lg.add_argument("--window", type=int, default=history.Limits.window,
                    help="the median is over this many last main-branch runs (default %(default)s)")
    lg.add_argument("--max-slower-pct", type=float, default=history.Limits.max_slower_pct,
                    help="relative limit, %% of the median (default %(default)s)")
    lg.add_argument("--max-slower-ms", type=float, default=history.Limits.max_slower_ms,
                    help="absolute limit, ms (default %(default)s); a cell regresses only beyond both")
    lg.add_argument("--benchmark-json", type=Path, help="also gate the medians of a pytest-benchmark "
                    "--benchmark-json file, as cells 'bench:<name>'")
    _device_class_option(lg)

    sub.add_parser("list", help="registered methods and available suites")

    t = sub.add_parser("table", help="rebuild a run's tables, plots and grid overview from its results")
    t.add_argument("run", type=Path)

    rp = sub.add_parser("report", help="one self-contained HTML page of one or more runs (tables, plots, samples, "
                        "claims, provenance); needs the `report` extra")
    rp.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directories; several only when measured "
                    "under one protocol (prompt set, evaluators, FID reference)")
    rp.add_argument("--out", type=Path, help="folder for index.html (default: the first run's folder)")
    rp.add_argument("--prompts", type=int, default=8, metavar="K", help="show the samples of the first K prompts "
                    "(default %(default)s)")

    tt = sub.add_parser("train-teacher", help="train an embedded shapes teacher (reproduces the shipped weights)")
    tt.add_argument("--kind", choices=("vp", "flow"), default="vp",
                    help="vp: ε-prediction on SD's schedule (teacher.safetensors); flow: rectified flow (teacher-flow)")
    tt.add_argument("--out", type=Path, default=Path("artifacts/teacher"))
    tt.add_argument("--steps", type=int)
    tt.add_argument("--device", default="cpu")

    te = sub.add_parser("train-evaluators", help="train the frozen evaluators (reproduces the shipped weights)")
    te.add_argument("--out", type=Path, default=Path("artifacts/evaluators"))

    cc = sub.add_parser("convert-checkpoint", help="rewrite a pickled tensor state dict (.bin, e.g. DMD2's UNet) as "
                        "safetensors, for the pretrained method (see docs/recipes.md)")
    cc.add_argument("src", type=Path, metavar="IN", help="the .bin / .pt file: a flat {name: tensor} state dict")
    cc.add_argument("dst", type=Path, metavar="OUT", help="the .safetensors file to write (must not exist)")
    return p


def cmd_run(args) -> int:
    device = suite_mod.check_device_name(args.device or "cpu")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be 1 or more, got {args.threads}")
    save_samples = args.save_samples
    if args.resume is not None:
        config = read_config(args.resume)
        given = [flag for flag, value in (("a suite", args.suite), ("--methods", args.methods), ("--nfe", args.nfe),
                                          ("--samples", args.samples), ("--seeds", args.seeds), ("--shard", args.shard),
                                          ("--save-samples", args.save_samples)) if value]
        if given:
            raise UserError(f"--resume {args.resume} finishes the run as it was started (its suite, budgets, samples, seeds "
                            f"and shard are in its config.json); drop {', '.join(given)}, or start a new run with --out")
        was = str(config.get("device", "cpu"))
        if args.device is not None and device.split(":")[0] != was.split(":")[0]:
            raise UserError(f"--resume {args.resume}: the run was started on {was}; resume it there (drop --device), or "
                            "start a new run with --out")
        device = device if args.device is not None else was
        s = suite_mod.from_dict(config["suite"])
        out, resume = args.resume, True
        shard = tuple(config.get("shard") or ()) or None
        save_samples = bool(config.get("save_samples", False))
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
    from bench import runner  # torch and the models: only once the arguments and the suite are good

    opts = runner.Options(out=out, device=device, cache=args.cache, resume=resume,
                          progress=not args.no_progress, dry_run=args.dry_run,
                          command=getattr(args, "command_line", None), shard=shard, save_samples=save_samples,
                          device_memory=args.device_memory, threads=getattr(args, "threads", None))
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

    folders, suite = split_suite(args.folders)
    path = evaluate.evaluate(folders, suite_mod.load(suite), args.out, args.cache, args.device)
    print((path / "tables" / "main.md").read_text())
    return 0


def split_suite(args: list[str]) -> tuple[list[Path], str | None]:
    """(sample folders, suite or None) of `evaluate`'s arguments: the last one names the suite when it is not a
    folder (a suite name or a .toml file)."""
    if len(args) > 1 and not Path(args[-1]).is_dir():
        return [Path(a) for a in args[:-1]], args[-1]
    return [Path(a) for a in args], None


def cmd_study(args) -> int:
    study = study_mod.load(args.study)
    suite_mod.check_device_name(args.device)
    if args.resume is not None:
        config = read_config(args.resume)
        if config.get("study") != study["name"]:
            raise UserError(f"--resume {args.resume} is a run of {config.get('study') or 'no study'!r}, not of study "
                            f"{study['name']!r}; resume it with its own study, or start a new run with --out")
        given = [f for f, v in (("--samples", args.samples), ("--train-seeds", args.train_seeds)) if v is not None]
        if given:
            raise UserError(f"--resume {args.resume} finishes the study run as it was started; drop {', '.join(given)}")
        s = suite_mod.from_dict(config["suite"])
    else:
        seeds = _int_csv(args.train_seeds, "--train-seeds") if args.train_seeds else None
        if args.samples is not None and args.samples < 1:
            raise UserError(f"--samples must be a positive integer, got {args.samples}")
        s = study_mod.build_suite(study, args.samples, seeds)
    from bench import runner

    opts = runner.Options(out=args.resume or args.out, device=args.device, cache=args.cache, resume=args.resume is not None,
                          progress=not args.no_progress, dry_run=args.dry_run,
                          command=getattr(args, "command_line", None), study=study["name"])
    path = runner.run(s, opts)
    if path is not None:
        study_mod.choose(path, study)
        print((path / "tables" / "study.md").read_text())
    return 0


def _device_class_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device-class", metavar="GPU", help="the GPU model the run ran on (e.g. 'NVIDIA H200'), when its "
                   "config.json names none; a CPU run's class is 'cpu'")


def cmd_baseline(args) -> int:
    if args.store is None:
        if args.bootstrap or args.image_threshold is not None or args.device_class is not None:
            raise UserError("--bootstrap, --image-threshold and --device-class file a reference: give --store DIR too")
        tol = compare.make_baseline(args.run)
        print(f"{args.run / compare.TOLERANCES}: tolerances for {len(tol['cells'])} cells")
        return 0
    key = reference.run_key(args.run, args.device_class)
    found = reference.find(args.store, key)
    if found is not None and args.bootstrap:
        print(f"notice: {key.name} already has a reference ({found}); left as it is")
        return 0
    threshold = reference.IMAGE_THRESHOLD if args.image_threshold is None else args.image_threshold
    path = reference.file(args.run, args.store, key, threshold)
    print(f"{path}: the reference of {key.name} (tier (a) threshold {threshold:g})")
    return 0


def cmd_compare(args) -> int:
    want = 1 if args.store is not None else 2
    if len(args.runs) != want:
        raise UserError("compare takes BASELINE RUN, or RUN with --store DIR; got "
                        f"{len(args.runs)} path(s){' and --store' if args.store is not None else ''}")
    if args.store is None and args.bootstrap:
        raise UserError("--bootstrap files a missing reference in a store: give --store DIR and RUN alone")
    if args.store is not None:
        report, regressed = gate.check_in_store(args.store, args.runs[0], args.device_class, args.bootstrap)
    elif (args.runs[0] / reference.REFERENCE).exists():  # a filed reference: its key is checked, both tiers
        report, regressed = gate.check(args.runs[0], args.runs[1], args.device_class)
    elif args.device_class is not None:
        raise UserError(f"--device-class keys a run to a filed reference; {args.runs[0]} has no {reference.REFERENCE} "
                        "(a plain `flashbench baseline` checks no key): drop --device-class")
    else:
        report, regressed = compare.compare(*args.runs)
    print(report)
    return 1 if regressed else 0


def cmd_latency_gate(args) -> int:
    limits = history.Limits(args.window, args.max_slower_pct, args.max_slower_ms)
    report, regressed = history.gate(args.run, args.history, limits, args.main, args.device_class, args.benchmark_json)
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
    from bench.results import tables

    if not (args.run / RESULTS_FILE).exists():
        raise UserError(f"{args.run} has no {RESULTS_FILE}; give a run directory written by `flashbench run`")
    tables.write_all(args.run)
    config = read_config(args.run, "rebuild the tables of")
    if config.get("study"):  # a study run: its choice is derived from the results too, by the study's rule
        study_mod.choose(args.run, study_mod.load(config["study"]))
        print((args.run / "tables" / "study.md").read_text())
        return 0
    print((args.run / "tables" / "main.md").read_text())
    return 0


def cmd_report(args) -> int:
    from bench.results import html  # plotly, itables: only here (the `report` extra)

    print(html.build(args.runs, args.out, args.prompts))
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


def cmd_convert_checkpoint(args) -> int:
    from methods.pretrained import convert_checkpoint

    out = convert_checkpoint(args.src, args.dst)
    print(f"{args.dst}: {out['tensors']} tensors, sha256 {out['sha256']}")
    return 0


COMMANDS = {"run": cmd_run, "study": cmd_study, "merge": cmd_merge, "evaluate": cmd_evaluate,
            "baseline": cmd_baseline, "compare": cmd_compare, "latency-gate": cmd_latency_gate, "list": cmd_list,
            "table": cmd_table, "report": cmd_report, "train-teacher": cmd_train_teacher,
            "train-evaluators": cmd_train_evaluators, "convert-checkpoint": cmd_convert_checkpoint}


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
