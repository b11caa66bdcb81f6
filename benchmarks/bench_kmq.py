"""kMQ selection at scale, and iterative kMQ against static kMQ and random selection (issue 11).

1. **Selection at ``--rows`` rows (default 1M).** Ray tasks generate the rows (id, a cluster out
   of 1,000 with skewed sizes, a quality in [0, 1], 100 characters of text) and write them to
   parquet under ``benchmarks/out/kmq_data_<rows>/`` (reused by later runs); nothing is built in the
   driver. Then, each in a fresh subprocess that joins the local Ray cluster started here:
   - ``stage``: the ``kmq`` stage reads the parquet, selects 20% (temperature 0.1) and writes its
     output as the runner does (``StageCache.write``);
   - ``in_process``: the same selection in one process with polars and numpy: read everything,
     the same Gumbel keys and budgets, a per-cluster top-k by sort, write the same table.
   Each reports its wall seconds and its driver's peak RSS (``getrusage``: Ray's workers are other
   processes); the selected id sets must be identical. A discarded warm-up run goes first.
2. **Iterative kMQ** on the synthetic graded corpus (``--docs``): the quality, perplexity
   (reference LM) and combine stages run once; then three selections of 20% of the rows, from the
   same scored rows, clusters = the 10 topics, key = the composite ``quality``:
   ``random`` (kMQ with one cluster and temperature 1e9: a uniform random draw), ``static``
   (the kmq stage) and ``iterative`` (``curriculum select``, 3 rounds, a tiny proxy). The same
   small GPT-2 is trained on each selection (same tokenizer: the reference LM's, same steps, same
   seeds) and evaluated on held-out synthetic documents (all qualities, and clean ones).

Writes ``benchmarks/out/kmq.json`` (``kmq_quick.json`` with ``--quick``) and prints tables.

``python benchmarks/bench_kmq.py [--rows 1000000] [--docs 3000] [--only selection,iterative] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import OUT_DIR, ROOT  # noqa: E402  (first: puts the checkout on sys.path)

OUT = OUT_DIR
CLUSTERS = 1000
BUDGET, TEMPERATURE = 0.2, 0.1


# --------------------------------------------------------------------------- 1. selection at scale


def _generate(batch: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from pipeline.core.hashing import uniform

    index = batch["id"]
    ids = [f"doc-{i:09d}" for i in index]
    u = uniform(ids, 11, "bench.cluster")
    return {
        "id": np.array(ids, dtype=object),
        "text": np.array([f"document {i} " + "lorem ipsum dolor sit amet " * 3 for i in index], dtype=object),
        "cluster": np.floor(CLUSTERS * u ** 2).astype(np.int32),  # skewed: low labels are large clusters
        "quality": uniform(ids, 12, "bench.quality"),
    }


def build_data(rows: int) -> Path:
    import ray.data

    folder = OUT / f"kmq_data_{rows}"
    if (folder / "_DONE").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.time()
    ray.data.range(rows, override_num_blocks=max(4, rows // 100_000)).map_batches(
        _generate, batch_format="numpy").write_parquet(str(folder))
    (folder / "_DONE").write_text(str(rows))
    print(f"[data] {rows} rows in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    return folder


def _selected_digest(ids: list[str]) -> dict[str, Any]:
    from pipeline.core.hashing import hash64

    return {"selected": len(ids), "ids_hash": f"{int(sum(int(h) for h in hash64(ids, 0, 'bench.ids'))) % 2**64:016x}"}


def one_stage(data: Path, address: str) -> dict[str, Any]:
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import ray
    import ray.data
    from ray.data.context import ShuffleStrategy

    from pipeline.engine.cache import StageCache
    from stages.base import StageContext
    from stages.kmq import KMQParams, KMQStage

    ray.init(address=address, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED  # as the runner sets it
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        t0 = time.time()
        ds = ray.data.read_parquet(str(data))
        ctx = StageContext(run_dir=Path(tmp), artifact_dir=Path(tmp), seed=0, input_columns=list(ds.schema().names))
        stage = KMQStage(KMQParams(name="kmq", budget=BUDGET, key="quality", temperature=TEMPERATURE))
        rows_out = StageCache.write(stage.apply(ds, ctx), Path(tmp), "data")
        seconds = time.time() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        table = pads.dataset(str(Path(tmp) / "data"), format="parquet").to_table(columns=["id", "_drop_reason"])
        ids = table.filter(pc.is_null(table["_drop_reason"]))["id"].to_pylist()
    return {"variant": "stage", "seconds": round(seconds, 1), "rows_out": rows_out, "driver_peak_rss_mb": round(peak, 1),
            "load_avg_1m": round(os.getloadavg()[0], 1), **_selected_digest(ids),
            "clusters": ctx.info["clusters"], "budget_rows": ctx.info["budget_rows"]}


def one_in_process(data: Path) -> dict[str, Any]:
    import numpy as np
    import polars as pl

    from stages.kmq import allocate, budget_rows, gumbel, minimums

    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        t0 = time.time()
        df = pl.read_parquet(str(data / "*.parquet"))
        z = df["quality"].to_numpy() / TEMPERATURE + gumbel(df["id"].to_list(), 0)
        counts = df.group_by("cluster").len().sort("cluster")
        labels, sizes = counts["cluster"].to_numpy(), counts["len"].to_numpy()
        total = budget_rows(BUDGET, df.height)
        budgets = allocate(total, sizes, lower=minimums(sizes, total, 1))
        budget_of = pl.DataFrame({"cluster": labels, "_budget": budgets}).cast({"cluster": df["cluster"].dtype})
        marked = (df.with_columns(pl.Series("_z", z))
                  .sort(["cluster", "_z", "id"], descending=[False, True, False])
                  .with_columns(pl.int_range(pl.len()).over("cluster").alias("_rank"))
                  .join(budget_of, on="cluster")
                  .with_columns(pl.when(pl.col("_rank") < pl.col("_budget")).then(None)
                                .otherwise(pl.lit("kmq.unselected")).alias("_drop_reason"))
                  .drop(["_z", "_rank", "_budget"]))
        marked.write_parquet(str(Path(tmp) / "out.parquet"))
        seconds = time.time() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ids = marked.filter(pl.col("_drop_reason").is_null())["id"].to_list()
    assert int(np.sum(budgets)) == len(ids)
    return {"variant": "in_process", "seconds": round(seconds, 1), "rows_out": marked.height,
            "driver_peak_rss_mb": round(peak, 1), "load_avg_1m": round(os.getloadavg()[0], 1), **_selected_digest(ids)}


def selection(rows: int, address: str, repeat: int) -> dict[str, Any]:
    data = build_data(rows)
    runs: dict[str, list[dict[str, Any]]] = {"stage": [], "in_process": []}
    for name in ["warm-up"] + [n for _ in range(repeat) for n in runs]:
        variant = "stage" if name == "warm-up" else name
        child = subprocess.run([sys.executable, __file__, "--one", variant, "--data", str(data), "--address", address],
                               capture_output=True, text=True, cwd=ROOT)
        lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
        if child.returncode or not lines:
            raise RuntimeError(f"[{variant}] failed:\n{child.stderr[-3000:]}")
        if name == "warm-up":
            continue
        runs[name].append(json.loads(lines[-1]))
        r = runs[name][-1]
        print(f"[selection {name}] {r['seconds']}s, driver peak RSS {r['driver_peak_rss_mb']} MB, "
              f"{r['selected']} selected, load {r['load_avg_1m']}", file=sys.stderr, flush=True)
    best = {name: dict(min(rs, key=lambda r: r["seconds"]), all_seconds=[r["seconds"] for r in rs])
            for name, rs in runs.items()}
    same = len({r["ids_hash"] for rs in runs.values() for r in rs}) == 1
    return {"rows": rows, "budget": BUDGET, "temperature": TEMPERATURE, "clusters": CLUSTERS, **best,
            "ratio_stage_to_in_process": round(best["stage"]["seconds"] / best["in_process"]["seconds"], 2),
            "same_selection": same}


# --------------------------------------------------------------------------- 2. iterative kMQ


def _train_config(quick: bool, tokenizer: str, seed: int) -> dict[str, Any]:
    return {
        "model": {"config": {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 128}},
        "tokenizer": tokenizer, "seq_len": 128, "batch_size": 16,
        "max_tokens": (60 if quick else 200) * 16 * 128,
        "optimizer": {"lr": 0.003}, "schedule": {"kind": "wsd", "warmup": 0.05, "decay_fraction": 0.2},
        "averaging": {"method": "none", "last_k": 1, "window": 0.25},
        "eval": {"every": 10_000, "max_tokens": 16_384, "sets": {
            "all": {"synthetic": {"docs": 300, "seed": 1000}},
            "clean": {"synthetic": {"docs": 300, "seed": 1000, "min_quality": 0.7}}}},
        "threads": 2, "seed": seed, "log_every": 50,
    }


def iterative(docs: int, quick: bool, address: str, train_seeds: int) -> dict[str, Any]:
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.engine.config import validate_config
    from pipeline.engine.runner import run_pipeline
    from pipeline.train.trainer import run_training

    def log(message: str) -> None:
        if message.startswith(("[select]", "[train] step", "[read]", "[1/", "[2/", "[3/", "[4/", "[5/")):
            print(message, file=sys.stderr, flush=True)

    folder = OUT / f"kmq_iter_{docs}"
    base_dir = folder / "base"
    reference_steps = 60 if quick else 300
    base = validate_config({
        "run": {"name": "kmq-base", "seed": 0},
        "input": {"format": "synthetic", "synthetic": {"docs": docs, "kind": "graded"}},
        "stages": [{"name": "quality"},
                   {"name": "perplexity", "model": "reference", "max_length": 128,
                    "reference": {"steps": reference_steps, "vocab_size": 2048, "seq_len": 128}},
                   {"name": "combine"}, {"name": "order", "method": "random"}],
        "output": {"rows_per_shard": 100_000},
    })
    t0 = time.time()
    manifest = run_pipeline(base, base_dir, address=address, log=log)
    reference = str(base_dir / manifest["artifacts"]["reference_lm"])
    print(f"[iterative] base run in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    selection = {"budget": BUDGET, "key": "quality", "temperature": TEMPERATURE}
    proxy = {**_train_config(quick, reference, 0), "max_tokens": (30 if quick else 80) * 16 * 128}
    proxy.pop("eval")
    variants = {
        "random": {"stages": [{"name": "kmq", "cluster": "source", **selection, "temperature": 1e9},
                              {"name": "order", "method": "random"}]},
        "static": {"stages": [{"name": "kmq", "cluster": "topic", **selection}, {"name": "order", "method": "random"}]},
        "iterative": {"stages": [{"name": "order", "method": "random"}],
                      "select": {"rounds": 3, "cluster": "topic", **selection, "proxy": proxy,
                                 "scorer": {"kind": "ppl_ratio", "reference_column": "ppl", "max_length": 128}}},
    }
    results: dict[str, Any] = {"docs": docs, "budget": BUDGET, "temperature": TEMPERATURE, "cluster": "topic",
                               "key": "quality (the combine stage's composite)", "train_seeds": train_seeds}
    truth = {}
    for name, spec in variants.items():
        cfg = validate_config({"run": {"name": f"kmq-{name}", "seed": 0},
                               "input": {"format": "parquet", "path": str(base_dir / "shards"), "id_field": "id"},
                               **spec, "output": {"rows_per_shard": 100_000},
                               "train": _train_config(quick, reference, 0)})
        run_dir = folder / name
        t0 = time.time()
        m = run_pipeline(cfg, run_dir, address=address, log=log, select="select" in spec)
        select_seconds = time.time() - t0
        table = pq.read_table(run_dir / m["shards"][0]["path"], columns=["topic", "true_quality", "quality"])
        topics = np.unique(np.array(table["topic"].to_pylist()), return_counts=True)[1] / table.num_rows
        truth[name] = {
            "selected": table.num_rows, "selection_seconds": round(select_seconds, 1),
            "mean_true_quality": round(float(np.mean(table["true_quality"].to_numpy())), 4),
            "mean_quality": round(float(np.mean(table["quality"].to_numpy())), 4),
            "topic_entropy_bits": round(float(-(topics * np.log2(topics)).sum()), 4), "topics": int(len(topics)),
        }
        if "select" in spec:
            truth[name]["rounds"] = [{k: r.get(k) for k in ("round", "rows", "weights", "budgets", "scores",
                                                            "mean_score", "weights_after", "proxy", "seconds")}
                                     for r in m["select"]["round_detail"]]
        losses = []
        for seed in range(train_seeds):
            train_cfg = cfg.model_copy()
            train_cfg.train = _train_config(quick, reference, seed)
            t0 = time.time()
            summary = run_training(train_cfg, run_dir, folder / f"{name}-train-{seed}", log=log)
            losses.append({"seed": seed, **summary["final"], "train_loss": round(summary["train_loss"], 4),
                           "steps": summary["steps"], "epochs": summary["epochs"],
                           "seconds": round(time.time() - t0, 1)})
            print(f"[iterative] {name} seed {seed}: {losses[-1]}", file=sys.stderr, flush=True)
        truth[name]["final_model"] = losses
        for key in ("eval_all", "eval_clean"):
            values = [x[key] for x in losses]
            truth[name][f"mean_{key}"] = round(float(np.mean(values)), 4)
    results["variants"] = truth
    return results


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--docs", type=int, default=3000)
    parser.add_argument("--quick", action="store_true", help="50k rows and 800 documents, for a smoke run")
    parser.add_argument("--only", help="selection and/or iterative (comma-separated; default both)")
    parser.add_argument("--repeat", type=int, default=1, help="selection runs per variant; the fastest is reported")
    parser.add_argument("--train-seeds", type=int, default=None, help="final models per selection (default 2, quick 1)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = one_stage(Path(args.data), args.address) if args.one == "stage" else one_in_process(Path(args.data))
        print(json.dumps(result))
        return 0
    rows = 50_000 if args.quick else args.rows
    docs = 800 if args.quick else args.docs
    seeds = args.train_seeds or (1 if args.quick else 2)
    parts = args.only.split(",") if args.only else ["selection", "iterative"]

    import ray
    import ray.data

    OUT.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    address = ray.get_runtime_context().gcs_address
    path = OUT / ("kmq_quick.json" if args.quick else "kmq.json")
    report: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    report.update({"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                               "platform": platform.platform()}, "ray": ray.__version__})
    if "selection" in parts:
        report["selection"] = selection(rows, address, args.repeat)
        path.write_text(json.dumps(report, indent=2))
    if "iterative" in parts:
        report["iterative"] = iterative(docs, args.quick, address, seeds)
        path.write_text(json.dumps(report, indent=2))
    ray.shutdown()

    if "selection" in report:
        s = report["selection"]
        print(f"\nselection of {s['budget']} of {s['rows']:,} rows ({s['clusters']} clusters), same ids: {s['same_selection']}")
        print("| variant | seconds | driver peak RSS (MB) |\n|---|---:|---:|")
        for name in ("stage", "in_process"):
            print(f"| {name} | {s[name]['seconds']} | {s[name]['driver_peak_rss_mb']:.0f} |")
        print(f"stage / in-process: {s['ratio_stage_to_in_process']}x")
    if "iterative" in report:
        it = report["iterative"]
        print(f"\nselections of {it['budget']} of {it['docs']} documents; final model eval loss (mean of "
              f"{it['train_seeds']} seed(s))")
        print("| selection | mean true_quality | topic entropy (bits) | eval all | eval clean |\n|---|---:|---:|---:|---:|")
        for name, v in it["variants"].items():
            print(f"| {name} | {v['mean_true_quality']} | {v['topic_entropy_bits']} | {v['mean_eval_all']} | "
                  f"{v['mean_eval_clean']} |")
    print(f"\nwrote {path}")
    same = report.get("selection", {}).get("same_selection", True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
