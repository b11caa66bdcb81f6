"""The ``curriculum`` command line. The only place that turns errors into exit codes.

Exit codes: 0 success; 2 a usage or config error (nothing written); 1 a runtime failure.

Each command imports what it runs when it runs: building the parser and validating a config cost
no torch, transformers or Ray import, so a mistyped key or ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.cli.ablate import add_parsers as add_ablate_parsers
from pipeline.cli.ablate import cmd_ablate
from pipeline.cli.options import add_config_options
from pipeline.cli.study import add_parsers as add_study_parsers
from pipeline.cli.study import cmd_study
from pipeline.cli.tokens import add_parsers as add_token_parsers
from pipeline.cli.tokens import cmd_export, cmd_tokenize
from pipeline.cli.train import add_parsers as add_train_parsers
from pipeline.cli.train import cmd_average, cmd_train
from pipeline.cli.whatif import add_parsers as add_whatif_parsers
from pipeline.cli.whatif import cmd_whatif
from pipeline.core.errors import ConfigError, CurriculumError
from pipeline.core.faults import planned_kill
from pipeline.core.storage import is_uri
from pipeline.engine.config import load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curriculum", description="Score, select, augment and order a corpus into curricula.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the curation stages and write a run folder")
    run.add_argument("config", help="YAML config")
    run.add_argument("--out", help="run folder (default: runs/<run.name>)")
    add_config_options(run, "--set run.seed=3 or --set stages.order.key=ppl", "Ray cluster address")

    select = sub.add_parser("select", help="iterative kMQ: the stages, then the select: section's rounds "
                            "(select, train a proxy, re-weight the clusters), then the order stage")
    select.add_argument("config", help="YAML config with a select: section")
    select.add_argument("--out", help="run folder (default: runs/<run.name>); rerun to resume")
    add_config_options(select, "--set select.rounds=3 or --set select.budget=0.2", "Ray cluster address")

    synth = sub.add_parser("synth", help="write a synthetic corpus with known ground truth")
    synth.add_argument("--out", required=True, help="output .jsonl or .jsonl.gz")
    synth.add_argument("--docs", type=int, required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--kind", choices=["graded", "reversal", "reasoning"], default="graded",
                       help="graded: topic documents with a hidden quality; reversal: --docs one-way facts about "
                       "invented people, plus OUT-probes-forward.jsonl and OUT-probes-reverse.jsonl beside OUT "
                       "(OUT without .jsonl/.gz), ten candidates per probe; reasoning: arithmetic word problems "
                       "(prompt, response, text, answer), --docs of them in OUT and a held-out tenth "
                       "(at least 1) in OUT-test.jsonl beside it (NAME-test.jsonl.gz for NAME.jsonl.gz)")

    inspect = sub.add_parser("inspect", help="summarise a run, training or study folder and write DIR/report/index.html")
    inspect.add_argument("run_dir")

    verify = sub.add_parser("verify", help="recheck a run folder against its manifest: every shard's sha256 and rows, "
                            "the quarantine, the stage cache and token shards; exit 1 naming each damaged file")
    verify.add_argument("run_dir")

    add_train_parsers(sub)
    add_token_parsers(sub)
    add_ablate_parsers(sub)
    add_study_parsers(sub)
    add_whatif_parsers(sub)
    return parser


def _run_folder(out: str | None, name: str) -> Path | str:
    """``--out`` as a local path, or as it is when it is an object-storage URI (``s3://bucket/runs/x``)."""
    if out and is_uri(out):
        return out.rstrip("/")
    return Path(out) if out else Path("runs") / name


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.engine.runner import run_pipeline

    config = load_config(args.config, args.sets)
    out = _run_folder(args.out, config.run.name)
    manifest = run_pipeline(config, out, address=args.ray_address)
    counts = manifest["counts"]
    print(f"run folder: {out if isinstance(out, str) else out.resolve()}")
    print(f"  {counts['input_rows']} input rows, {counts['quarantined']} quarantined, "
          f"{counts['output_rows']} rows in {len(manifest['shards'])} shard(s); config {manifest['config_hash'][:12]}")
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    from pipeline.engine.runner import run_pipeline
    from pipeline.engine.select import rounds_table

    config = load_config(args.config, args.sets)
    if config.select is None:
        raise ConfigError(f"{args.config}: select: the config has no select: section (rounds, budget, scorer, proxy)")
    out = _run_folder(args.out, config.run.name)
    manifest = run_pipeline(config, out, address=args.ray_address, select=True)
    counts, select = manifest["counts"], manifest["select"]
    print(f"run folder: {out if isinstance(out, str) else out.resolve()}")
    print(f"  {counts['input_rows']} input rows; {select['selected']} selected of {select['rows']} in "
          f"{select['rounds']} round(s) over {select['clusters']} cluster(s); {counts['output_rows']} rows in "
          f"{len(manifest['shards'])} shard(s)")
    for line in rounds_table(select):
        print(f"  {line}")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from pipeline.io.synth import write_synthetic
    from pipeline.io.synth_reasoning import held_out_path

    if args.docs < 1:
        raise ConfigError("--docs must be at least 1")
    n = write_synthetic(Path(args.out), args.docs, seed=args.seed, kind=args.kind)
    print(f"wrote {n} {args.kind} documents to {args.out}")
    if args.kind == "reasoning":
        print(f"wrote the held-out split to {held_out_path(Path(args.out))}")
    return 0


def _local_run_dir(path: str, command: str) -> Path:
    if is_uri(path):
        raise ConfigError(f"curriculum {command} takes a local run folder, not {path!r}; copy it down first "
                          "(e.g. `aws s3 sync`)")
    return Path(path)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline.engine.report import inspect_run
    from pipeline.engine.report_study import inspect_study, is_study_folder

    run_dir = _local_run_dir(args.run_dir, "inspect")
    summary, report = inspect_study(run_dir) if is_study_folder(run_dir) else inspect_run(run_dir)
    print(summary)
    print(f"report: {report}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.engine.verify import verify_run

    report = verify_run(_local_run_dir(args.run_dir, "verify"))
    for note in report.notes:
        print(f"note: {note}")
    for problem in report.problems:
        print(f"DAMAGED {problem}")
    state = "whole" if report.ok else f"{len(report.problems)} problem(s)"
    print(f"{report.run_dir}: {report.checked} file(s) checked, {state}")
    return 0 if report.ok else 1


COMMANDS = {"run": _cmd_run, "verify": _cmd_verify,
            "select": _cmd_select, "synth": _cmd_synth, "inspect": _cmd_inspect, "train": cmd_train,
            "average": cmd_average, "tokenize": cmd_tokenize, "export": cmd_export, "ablate": cmd_ablate,
            "study": cmd_study, "whatif": cmd_whatif}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        planned_kill()  # a malformed CURRICULUM_KILL_AT is a config error before any work starts
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"curriculum: config error: {exc}", file=sys.stderr)
        return exc.exit_code
    except CurriculumError as exc:
        print(f"curriculum: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("curriculum: interrupted; rerun the same command to resume from the stage cache", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
