"""Handlers of ``curriculum tokenize`` and ``curriculum export`` (wired into ``pipeline.cli``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.core.errors import ConfigError
from pipeline.core.files import write_json_atomic


def add_parsers(sub: argparse._SubParsersAction) -> None:
    tokenize = sub.add_parser("tokenize", help="pre-tokenize a run folder's shards into RUN_DIR/tokens "
                              "(flat memory-mappable arrays, curriculum order kept)")
    tokenize.add_argument("run_dir")
    tokenize.add_argument("--tokenizer", help="Hugging Face tokenizer folder or hub name, or all-MiniLM-L6-v2 "
                          "(default: the run's reference LM)")
    tokenize.add_argument("--text-column", default="text")
    tokenize.add_argument("--ray-address", help="Ray cluster address")

    export = sub.add_parser("export", help="export RUN_DIR/tokens for another trainer")
    export.add_argument("run_dir")
    export.add_argument("--format", choices=["megatron"], required=True,
                        help="megatron: the .bin/.idx pair of Megatron-LM's indexed dataset (also read by NeMo)")
    export.add_argument("--out", help="output prefix, without .bin/.idx "
                        "(default: RUN_DIR/export/megatron/curriculum_text_document)")


def cmd_tokenize(args: argparse.Namespace) -> int:
    from pipeline.engine.tokenize import tokenize_run

    record = tokenize_run(Path(args.run_dir), args.tokenizer, args.text_column, args.ray_address)
    print(f"token shards: {(Path(args.run_dir) / 'tokens').resolve()}")
    print(f"  {record['documents']} documents, {record['tokens']} tokens ({record['dtype']}) in "
          f"{len(record['shards'])} shard(s); separator {record['separator']['token']!r}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.format != "megatron":
        raise ConfigError(f"--format {args.format!r} is not supported")
    from pipeline.io.megatron import export_megatron

    record = export_megatron(Path(args.run_dir), args.out)
    write_json_atomic(record["prefix"] + ".json", record, indent=2)
    print(f"megatron dataset: {record['prefix']} (.bin, .idx)")
    print(f"  {record['documents']} documents, {record['tokens']} tokens ({record['dtype']})")
    return 0
