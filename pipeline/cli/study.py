"""Handler of ``curriculum study`` (wired into ``pipeline.cli``)."""

from __future__ import annotations

import argparse

from pipeline.cli.options import add_config_options


def add_parsers(sub: argparse._SubParsersAction) -> None:
    study = sub.add_parser("study", help="order x LR schedule x averaging over seeds, on the same data and model: "
                           "tables, curriculum effect per schedule and plots; rerun to resume")
    study.add_argument("config", help="YAML config with a study: section (see configs/study.yaml)")
    study.add_argument("--out", help="study folder (default: runs/<run.name>-study); rerun to resume")
    add_config_options(study, "--set study.seeds=[0,1,2,3] or --set train.model.config.n_layer=6",
                       "Ray cluster address")


def cmd_study(args: argparse.Namespace) -> int:
    from pipeline.engine.study import default_out, load_study_config, run_study

    study = load_study_config(args.config, args.sets)
    out = default_out(study) if args.out is None else args.out
    report = run_study(study, out, address=args.ray_address)
    print(f"study folder: {out}")
    print(f"  {len(report['runs']) // max(1, len(study.study.averaging))} runs finished ({report['trained']} trained "
          f"now, {report['skipped']} reused), {len(report['failed'])} failed; results.md, results.csv, plots/")
    print(f"  {report['verdict']}")
    for line in report["comparisons"]:
        print(f"  {line}")
    for failed in report["failed"]:
        print(f"  FAILED {failed['order']} + {failed['schedule']}, seed {failed['seed']}: {failed['error']}")
    return 1 if report["failed"] else 0
