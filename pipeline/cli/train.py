"""Handlers of ``curriculum train`` and ``curriculum average`` (wired into ``pipeline.cli``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.options import add_config_options
from pipeline.core.errors import ConfigError
from pipeline.engine.config import load_config


def add_parsers(sub: argparse._SubParsersAction) -> None:

    train = sub.add_parser("train", help="train a causal LM on a run folder's shards, in shard order")
    train.add_argument("config", help="YAML config (the same file as `curriculum run`; its train: section)")
    train.add_argument("--data", help="run folder to train on (default: runs/<run.name>)")
    train.add_argument("--out", help="training folder (default: runs/<run.name>-train); rerun to resume")
    add_config_options(train, "--set train.max_tokens=100000", "Ray cluster for train.workers > 1")

    average = sub.add_parser("average", help="average checkpoints (sma/ema/wma) or models (uniform/greedy soup)")
    average.add_argument("checkpoints", nargs="+", metavar="CKPT",
                         help="checkpoint folders or .safetensors files, oldest first")
    average.add_argument("--method", choices=["sma", "ema", "wma", "uniform", "greedy"], default="ema")
    average.add_argument("--alpha", type=float, default=0.2,
                         help="ema: avg <- alpha*ckpt + (1-alpha)*avg from the oldest to the newest, "
                         "so the newest gets alpha (default 0.2)")
    average.add_argument("--out", required=True, help="output folder (Hugging Face layout + averaging.json)")
    average.add_argument("--dtype", choices=["float32", "same"], default="float32",
                         help="store float32 (default) or the newest checkpoint's dtypes")
    average.add_argument("--eval", action="append", default=[], metavar="NAME=PATH",
                         help="greedy: held-out text (jsonl, parquet, text or a run folder) to rank the models by")
    average.add_argument("--seq-len", type=int, default=256, help="greedy: eval sequence length")
    average.add_argument("--eval-tokens", type=int, default=32768, help="greedy: tokens per eval set")


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.train.trainer import default_paths, run_training

    config = load_config(args.config, args.sets)
    summary = run_training(config, args.data, args.out, ray_address=args.ray_address)

    _, out = default_paths(config, args.data, args.out)
    print(f"training folder: {out.resolve()}")
    print(f"  {summary['steps']} steps, {summary['tokens']} tokens, last train loss {summary['train_loss']:.4f}")
    for name in ("final", "averaged"):
        losses = summary.get(name)
        if losses:
            print(f"  {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    return 0


def _parse_eval(items: list[str]) -> dict[str, str]:
    sets = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--eval {item!r}: expected NAME=PATH")
        if not Path(path).exists():
            raise ConfigError(f"--eval {name}: {path!r} does not exist")
        sets[name] = path
    return sets


def cmd_average(args: argparse.Namespace) -> int:
    from pipeline.train.averaging import WeightsFile, average_checkpoints, greedy_soup

    for c in args.checkpoints:
        if not Path(c).exists():
            raise ConfigError(f"checkpoint {c!r} does not exist")
    if args.method == "ema" and not 0 < args.alpha <= 1:
        raise ConfigError(f"--alpha must be in (0, 1] (got {args.alpha})")
    if args.method != "greedy":
        if args.eval:
            raise ConfigError("--eval is only used by --method greedy")
        record = average_checkpoints(args.checkpoints, args.out, args.method, args.alpha, args.dtype)
    else:
        sets = _parse_eval(args.eval)
        if not sets:
            raise ConfigError("--method greedy needs at least one --eval NAME=PATH to rank the models by")
        folder = WeightsFile(args.checkpoints[0]).hf_folder
        if folder is None:
            raise ConfigError(f"--method greedy needs Hugging Face model folders (config.json + tokenizer); "
                              f"{args.checkpoints[0]} is not one")
        record = greedy_soup(args.checkpoints, _soup_evaluator(folder, sets, args.seq_len, args.eval_tokens),
                             args.out, args.dtype)
    print(f"averaged {len(record['checkpoints'])} checkpoint(s) with {record['method']} into {Path(args.out).resolve()}")
    print("  weights: " + ", ".join(f"{w:.4f}" for w in record["weights"]))
    if "soup_loss" in record:
        print(f"  soup eval loss {record['soup_loss']:.4f} (models alone: "
              + ", ".join(f"{s:.4f}" for s in record["scores"]) + ")")
    return 0


def _soup_evaluator(folder: Path, sets: dict[str, str], seq_len: int, max_tokens: int):
    """state_dict -> mean eval loss over the sets, with the architecture and tokenizer of ``folder``."""
    import torch

    from pipeline.models.lm import load_causal_lm, resolve_device
    from pipeline.train.evaluation import evaluate, load_eval_sets

    model, tokenizer = load_causal_lm(str(folder), dtype=torch.float32)
    device = resolve_device("auto")
    model.to(device)
    data = load_eval_sets(sets, tokenizer, seq_len, max_tokens)

    def score(state: dict) -> float:
        model.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()},
                              strict=False)
        losses = evaluate(model, data, 8, device)
        return sum(losses.values()) / len(losses)

    return score
