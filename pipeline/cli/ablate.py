"""Handler of ``curriculum ablate`` (wired into ``pipeline.cli``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.options import add_config_options
from pipeline.core.errors import ConfigError
from pipeline.engine.config import load_config


def add_parsers(sub: argparse._SubParsersAction) -> None:
    ablate = sub.add_parser("ablate", help="data ablations by merging models: one model per partition, every "
                            "mixture of up to ablate.max_size scored by the average of its models, a few trained for real")
    ablate.add_argument("config", help="YAML config with an ablate: section (and the train: section the models use)")
    ablate.add_argument("--data", help="run folder (default: runs/<run.name>; written by the config's stages when absent)")
    ablate.add_argument("--out", help="ablation folder (default: runs/<run.name>-ablate); rerun to resume")
    add_config_options(ablate, "--set ablate.real_mixtures=4", "Ray cluster address (for writing the run folder)")


def cmd_ablate(args: argparse.Namespace) -> int:
    from pipeline.engine.ablate import run_ablation
    from pipeline.engine.runner import run_pipeline

    config = load_config(args.config, args.sets)
    if config.ablate is None:
        raise ConfigError(f"{args.config}: ablate: the config has no ablate: section (partition_by, max_size, …)")
    data = Path(args.data) if args.data else Path("runs") / config.run.name
    out = Path(args.out) if args.out else Path("runs") / f"{config.run.name}-ablate"
    if not (data / "manifest.json").is_file():
        run_pipeline(config, data, address=args.ray_address)
    summary = run_ablation(config, config.ablate, data, out)
    rho = summary["spearman"]
    compute = summary["compute"]
    print(f"ablation folder: {out.resolve()}")
    print(f"  {summary['mixtures']} mixtures of {len(summary['partitions'])} partitions of {summary['partition_by']!r}; "
          f"{rho['n']} trained for real")
    print(f"  Spearman proxy vs real {_fmt(rho['proxy_vs_real'])} (baseline: mean of the partition models' losses "
          f"{_fmt(rho['baseline_vs_real'])})")
    print(f"  compute: proxy {compute['proxy_total']['seconds']:.1f} s for all mixtures; real "
          f"{compute['real_mixtures']['seconds']:.1f} s for {compute['real_mixtures']['mixtures']}")
    print(f"  results: {out.resolve() / 'results.md'}")
    return 0


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:+.3f}"
