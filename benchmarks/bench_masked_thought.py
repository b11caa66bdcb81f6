"""Masked Thought on synthetic word problems: the same tiny model fine-tuned with and without masking.

1. **Data.** ``curriculum synth --kind reasoning`` problems (2-3 additions/subtractions of 1-6 from
   a start of 1-12): ``--docs`` for training, a held-out tenth whose arithmetic never
   occurs in training. The training file goes through ``curriculum run`` (no scoring stages, a
   seeded random order) so the trainer reads a real run folder.
2. **Training.** ``curriculum train``'s loop (``run_training``) with ``data.format: prompt_response``
   (loss on the response only), a tiny GPT-2 built from a config, the same steps, batch and schedule
   for both arms; the masked arm adds ``augment: {masked_thought: {ratio: R}}``. One training per
   (seed, arm); the seed sets the model's initialisation, dropout and the masks.
3. **Evaluation.** Greedy decoding from each held-out prompt with the final weights; a problem is
   right when the number after "The answer is" equals its answer (exact match).

The trainings run ``--parallel`` at a time (default 2, one per core, one torch thread each), each
in its own process. Reports each seed's accuracy, mean ± sd over the seeds for each arm, and the paired difference.
Writes ``benchmarks/out/masked_thought.json`` and prints a markdown table.

``python benchmarks/bench_masked_thought.py [--docs 4000] [--steps 1000] [--ratio 0.2] [--seeds 0,1,2] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import OUT_DIR, ROOT  # noqa: E402  (first: puts the checkout on sys.path)

MODEL = {"model_type": "gpt2", "n_layer": 2, "n_embd": 96, "n_head": 4, "n_positions": 128,
         "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
ANSWER = re.compile(r"The answer is (-?\d+)\.")


def train_config(steps: int, batch: int, seq_len: int, ratio: float, seed: int, threads: int) -> dict:
    train = {
        "model": {"config": MODEL},
        "tokenizer_vocab_size": 512,
        "seq_len": seq_len,
        "batch_size": batch,
        "max_tokens": steps * batch * seq_len,
        "packing": "pack",
        "data": {"format": "prompt_response"},
        "optimizer": {"lr": 3e-3, "weight_decay": 0.1},
        "schedule": {"kind": "cosine", "warmup": 0.05, "final_lr_ratio": 0.1},
        "averaging": {"method": "none", "last_k": 1, "every": steps},
        "eval": {"sets": {}},
        "log_every": 50,
        "threads": threads,
        "seed": seed,
    }
    if ratio > 0:
        train["augment"] = {"masked_thought": {"ratio": ratio}}
    return train


def build_run(folder: Path, docs: int, data_seed: int) -> tuple[Path, Path]:
    """(run folder, held-out jsonl): the problems through `curriculum run` on a local Ray cluster."""
    from pipeline.engine.config import validate_config
    from pipeline.engine.runner import run_pipeline
    from pipeline.io.synth import write_synthetic
    from pipeline.io.synth_reasoning import held_out_path

    problems = folder / "problems.jsonl"
    write_synthetic(problems, docs, seed=data_seed, kind="reasoning")
    config = validate_config({"run": {"name": "masked-thought", "seed": data_seed},
                              "ray": {"num_cpus": 2},
                              "input": {"format": "jsonl", "path": str(problems), "id_field": "id"},
                              "stages": [{"name": "order", "method": "random"}],
                              "output": {"rows_per_shard": 100_000}})
    run_pipeline(config, folder / "run", log=lambda m: None)
    import ray

    if ray.is_initialized():  # the trainings below do not need it; free its processes' memory and CPU
        ray.shutdown()
    return folder / "run", held_out_path(problems)


def exact_match(model_dir: Path, test_file: Path, threads: int, batch: int = 128) -> dict:
    """Greedy decoding from every held-out prompt; the share whose stated answer is right."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir.parent / "tokenizer"))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    records = [json.loads(x) for x in test_file.read_text().splitlines() if x.strip()]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    right = 0
    samples = []
    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        # Tokenized without special tokens, as the loader tokenizes a prompt; left-padded for batching.
        prompts = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=48, do_sample=False,
                                 eos_token_id=eos, pad_token_id=pad)
        for r, row in zip(chunk, out[:, width:].tolist()):
            row = row[: row.index(eos)] if eos in row else row
            text = tokenizer.decode(row, skip_special_tokens=True)
            found = ANSWER.search(text)
            ok = found is not None and int(found.group(1)) == r["answer"]
            right += ok
            if len(samples) < 3:
                samples.append({"prompt": r["prompt"], "generated": text, "answer": r["answer"], "right": ok})
    return {"accuracy": right / len(records), "problems": len(records), "samples": samples}


def run_arm(run_dir: Path, out: Path, test_file: Path, args: argparse.Namespace, ratio: float, seed: int) -> dict:
    from pipeline.engine.config import validate_config
    from pipeline.train.trainer import run_training

    config = validate_config({"run": {"name": "masked-thought", "seed": seed},
                              "train": train_config(args.steps, args.batch, args.seq_len, ratio, seed, args.threads)})
    started = time.time()
    summary = run_training(config, run_dir, out, log=lambda m: None)
    seconds = time.time() - started
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    result = exact_match(out / "final", test_file, args.threads)
    result.update({"ratio": ratio, "seed": seed, "train_seconds": round(seconds, 1), "steps": summary["steps"],
                   "tokens": summary["tokens"], "epochs": summary["epochs"],
                   "final_train_loss": round(metrics[-1]["train_loss"], 4)})
    return result


def run_arms(run_dir: Path, folder: Path, test_file: Path, args: argparse.Namespace, seeds: list[int]) -> list[dict]:
    """Every (seed, arm) training in its own process, ``args.parallel`` at a time; results in launch order."""
    jobs = [(seed, ratio) for seed in seeds for ratio in (0.0, args.ratio)]
    running: list[tuple[subprocess.Popen, Path]] = []
    outputs = []
    for seed, ratio in jobs:
        result = folder / f"arm-{seed}-{ratio:g}.json"
        argv = [sys.executable, __file__, "--arm", f"{seed},{ratio}", "--run-dir", str(run_dir), "--test-file",
                str(test_file), "--arm-out", str(result), "--steps", str(args.steps), "--batch", str(args.batch),
                "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
        running.append((subprocess.Popen(argv), result))
        outputs.append(result)
        while len([p for p, _ in running if p.poll() is None]) >= args.parallel:
            time.sleep(1)
    for proc, _ in running:
        if proc.wait() != 0:
            raise SystemExit(f"a training failed: {proc.args}")
    results = [json.loads(path.read_text()) for path in outputs]
    for r in results:
        print(f"seed {r['seed']} ratio {r['ratio']:g}: accuracy {r['accuracy']:.3f} "
              f"(train loss {r['final_train_loss']}, {r['train_seconds']} s)", flush=True)
    return results


def _commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return done.stdout.strip() + ("+uncommitted" if dirty else "")
    except OSError:
        return "unknown"


def summarize(results: list[dict], ratio: float) -> dict:
    def stats(values: list[float]) -> dict:
        return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                "values": values}

    by_seed = {r["seed"]: {} for r in results}
    for r in results:
        by_seed[r["seed"]]["masked" if r["ratio"] > 0 else "plain"] = r["accuracy"]
    seeds = sorted(by_seed)
    plain = [by_seed[s]["plain"] for s in seeds]
    masked = [by_seed[s]["masked"] for s in seeds]
    return {"seeds": seeds, "plain": stats(plain), f"masked_{ratio:g}": stats(masked),
            "difference": stats([m - p for m, p in zip(masked, plain)])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=4000, help="training problems (the held-out split is a tenth)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training")
    parser.add_argument("--parallel", type=int, default=2, help="trainings at a time")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 400 problems, 40 steps, one seed")
    parser.add_argument("--out", default=str(OUT_DIR / "masked_thought.json"))
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # internal: SEED,RATIO of one training
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--test-file", help=argparse.SUPPRESS)
    parser.add_argument("--arm-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        seed, ratio = args.arm.split(",")
        out = Path(args.arm_out)
        result = run_arm(Path(args.run_dir), out.with_suffix(""), Path(args.test_file), args, float(ratio), int(seed))
        out.write_text(json.dumps(result) + "\n")
        return
    if args.quick:
        args.docs, args.steps, args.seeds = 400, 40, "0"
    seeds = [int(s) for s in args.seeds.split(",")]
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-mt-") as tmp:
        folder = Path(tmp)
        run_dir, test_file = build_run(folder, args.docs, args.data_seed)
        prepared = time.time() - started
        results = run_arms(run_dir, folder, test_file, args, seeds)
    summary = summarize(results, args.ratio)
    report = {
        "benchmark": "masked_thought",
        "command": " ".join(["python", "benchmarks/bench_masked_thought.py", *sys.argv[1:]]),
        "settings": {k: getattr(args, k) for k in ("docs", "steps", "batch", "seq_len", "ratio", "data_seed", "threads",
                                                   "parallel")}
        | {"seeds": seeds, "model": MODEL, "train": train_config(args.steps, args.batch, args.seq_len, args.ratio, 0,
                                                                  args.threads)},
        "summary": summary,
        "runs": results,
        "seconds": {"data": round(prepared, 1), "total": round(time.time() - started, 1)},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "commit": _commit(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print("| seed | plain | masked |")
    print("|---|---|---|")
    for s in summary["seeds"]:
        row = {r["ratio"] > 0: r["accuracy"] for r in results if r["seed"] == s}
        print(f"| {s} | {row[False]:.3f} | {row[True]:.3f} |")
    m = summary[f"masked_{args.ratio:g}"]
    print(f"| mean ± sd | {summary['plain']['mean']:.3f} ± {summary['plain']['sd']:.3f} | "
          f"{m['mean']:.3f} ± {m['sd']:.3f} |")
    print(f"\nwrote {out} in {report['seconds']['total']} s")


if __name__ == "__main__":
    main()
