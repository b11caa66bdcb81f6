"""The reversal curse and SPT: the same tiny model trained with and without the permute stage.

One command (``python benchmarks/bench_reversal.py [--seed S]``), about 10 minutes on 2 CPU cores:

1. ``curriculum synth --kind reversal``: ``--facts`` one-way facts about invented people and
   their forward and reverse probes (ten candidates each; chance is 10%).
2. Two runs of the pipeline on it: ``baseline`` (the facts, seeded random order) and ``spt``
   (``permute`` with ``--copies`` copies per fact, default probabilities 1/3 each, originals
   kept, then the same order stage).
3. ``curriculum train`` on each, with the same model, tokenizer (one BPE trained on the facts),
   schedule and **token budget**: the baseline sees each fact more often, SPT sees it in more orders.
4. Accuracy: a probe is right when the answer has the highest log-likelihood (summed over its
   tokens, after the prompt) among the ten candidates, under the final weights.

Writes ``benchmarks/out/reversal.json``. Model size and steps were chosen on seed 0; the figures
in benchmarks/README.md are from ``--seed 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import OUT_DIR, ROOT  # noqa: E402  (first: puts the checkout on sys.path)

OUT = OUT_DIR / "reversal.json"
MODEL = {"model_type": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 2, "n_positions": 64}


def _train_section(tokenizer: Path, steps: int, batch: int, seq_len: int, seed: int) -> dict[str, Any]:
    return {"model": {"config": MODEL}, "tokenizer": str(tokenizer), "seq_len": seq_len, "batch_size": batch,
            "max_tokens": steps * batch * seq_len, "optimizer": {"lr": 3e-3, "weight_decay": 0.1},
            "schedule": {"kind": "wsd", "warmup": 0.05, "decay_fraction": 0.2, "final_lr_ratio": 0.1},
            "averaging": {"method": "none"}, "log_every": 100, "threads": 1, "seed": seed}


def _config(name: str, corpus: Path, stages: list[dict[str, Any]], train: dict[str, Any], seed: int) -> dict[str, Any]:
    return {"run": {"name": name, "seed": seed}, "ray": {"num_cpus": 2},
            "input": {"format": "jsonl", "path": str(corpus), "id_field": "id"},
            "stages": [*stages, {"name": "order", "method": "random"}], "output": {"rows_per_shard": 100_000},
            "train": train}


def score_probes(model_dir: Path, probes: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy of ranking each probe's ten candidates by summed log-likelihood after the prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    right: dict[str, list[int]] = {}
    with torch.inference_mode():
        for probe in probes:
            # Training documents follow an EOS in the packed stream: so does the prompt.
            prompt = [tokenizer.eos_token_id] + tokenizer(probe["prompt"])["input_ids"]
            rows = [prompt + tokenizer(" " + c)["input_ids"] for c in probe["candidates"]]
            width = max(map(len, rows))
            ids = torch.tensor([r + [tokenizer.eos_token_id] * (width - len(r)) for r in rows])
            logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
            scores = []
            for k, row in enumerate(rows):
                positions = range(len(prompt), len(row))
                scores.append(sum(float(logp[k, p - 1, row[p]]) for p in positions))
            best = probe["candidates"][max(range(len(scores)), key=scores.__getitem__)]
            right.setdefault(probe["kind"], []).append(int(best == probe["answer"]))
    every = [x for values in right.values() for x in values]
    return {"accuracy": sum(every) / len(every), "probes": len(every),
            "by_kind": {k: round(sum(v) / len(v), 4) for k, v in sorted(right.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1, help="corpus, order and model seed (0 was used to choose)")
    parser.add_argument("--facts", type=int, default=100)
    parser.add_argument("--copies", type=int, default=3, help="SPT copies per fact")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    from pipeline.engine.config import validate_config
    from pipeline.engine.runner import run_pipeline
    from pipeline.io.synth import write_synthetic
    from pipeline.io.synth_reversal import probe_paths
    from pipeline.models.lm import train_bpe_tokenizer
    from pipeline.train.trainer import run_training

    started = time.time()
    result: dict[str, Any] = {"seed": args.seed, "facts": args.facts, "copies": args.copies, "model": MODEL,
                              "steps": args.steps, "batch_size": args.batch, "seq_len": args.seq_len,
                              "tokens": args.steps * args.batch * args.seq_len, "chance": 0.1, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-reversal-") as tmp:
        tmp_dir = Path(tmp)
        corpus = tmp_dir / "facts.jsonl"
        write_synthetic(corpus, args.facts, seed=args.seed, kind="reversal")
        probes = {d: [json.loads(x) for x in p.read_text().splitlines()] for d, p in probe_paths(corpus).items()}
        texts = [json.loads(x)["text"] for x in corpus.read_text().splitlines()]
        tokenizer_dir = tmp_dir / "tokenizer"
        train_bpe_tokenizer(texts, vocab_size=1024).save_pretrained(tokenizer_dir)
        train = _train_section(tokenizer_dir, args.steps, args.batch, args.seq_len, args.seed)
        arms = {"baseline": [],
                "spt": [{"name": "permute", "copies": args.copies, "keep_original": True}]}
        for name, stages in arms.items():
            t0 = time.time()
            config = validate_config(_config(f"reversal-{name}", corpus, stages, train, args.seed))
            run_dir, train_dir = tmp_dir / name, tmp_dir / f"{name}-train"
            manifest = run_pipeline(config, run_dir, log=lambda m: None)
            t1 = time.time()
            summary = run_training(config, run_dir, train_dir, log=lambda m: None)
            t2 = time.time()
            scores = {d: score_probes(train_dir / "final", rows) for d, rows in probes.items()}
            result["runs"][name] = {
                "stages": stages, "rows": manifest["counts"]["output_rows"],
                "forward": scores["forward"], "reverse": scores["reverse"],
                "train_loss": round(summary["train_loss"], 4), "steps": summary["steps"], "tokens": summary["tokens"],
                "seconds": {"pipeline": round(t1 - t0, 1), "train": round(t2 - t1, 1), "eval": round(time.time() - t2, 1)}}
            print(f"{name}: forward {scores['forward']['accuracy']:.3f} reverse {scores['reverse']['accuracy']:.3f} "
                  f"(loss {summary['train_loss']:.3f}, {t2 - t0:.0f}s)", flush=True)
    base, spt = result["runs"]["baseline"], result["runs"]["spt"]
    result["checks"] = {
        "baseline_reverse_near_chance": base["reverse"]["accuracy"] <= 0.20,
        "spt_reverse_at_least_twice_baseline": spt["reverse"]["accuracy"] >= 2 * base["reverse"]["accuracy"],
        "spt_reverse_at_least_half_forward": spt["reverse"]["accuracy"] >= 0.5 * spt["forward"]["accuracy"]}
    result["seconds"] = round(time.time() - started, 1)
    result["machine"] = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                         "load_average": os.getloadavg()}
    result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                      text=True).stdout.strip()
    result["command"] = "python benchmarks/bench_reversal.py " + " ".join(sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["checks"]), f"-> {args.out}")


if __name__ == "__main__":
    main()
