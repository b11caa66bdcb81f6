"""Order effects without retraining (``curriculum whatif``) against real retrained runs.

A tiny GPT-2 is trained once on the synthetic graded corpus with ``record: fut``; nine orders of
the same rows (the reference, three seeded shuffles, quality ascending / descending, folded,
buckets, reversed) are estimated from the record and every one is also retrained for real. At a
longer run length (three passes) five of them are repeated, to see where the estimate stops being
useful. Writes benchmarks/out/whatif.json.

    PYTHONPATH=. python benchmarks/bench_whatif.py [--docs 200] [--work DIR]
    PYTHONPATH=. python benchmarks/bench_whatif.py --work DIR --reestimate   # re-score a finished run's cache
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.core.settings import RayConfig, RunConfig
from pipeline.engine.ablate import Job, spearman
from pipeline.engine.whatif import run_whatif, write_graded_run
from pipeline.train.fut import ESTIMATORS, SECOND_ORDER, estimate, load_record
from pipeline.train.trainer import run_training

OUT = Path(__file__).resolve().parent / "out" / "whatif.json"
SEQ, BATCH = 64, 8
QUALITY = {"key": "quality", "higher_is_better": True}
ORDERS = {
    "reference": "reference",
    "random-1": "{method: random, seed: 1}",
    "random-2": "{method: random, seed: 2}",
    "random-3": "{method: random, seed: 3}",
    "ascending": json.dumps({"method": "quality_ascending", **QUALITY}),
    "descending": json.dumps({"method": "quality_descending", **QUALITY}),
    "folded": json.dumps({"method": "folded", "folds": 2, **QUALITY}),
    "buckets": json.dumps({"method": "buckets", "buckets": 4, **QUALITY}),
}
# The estimators as whatif runs them (row gradients interpolated between anchors), plain (each
# step reads the last anchor at or before it), and with the second-order term (trajectory curvature,
# whatif's --second-order, and the BFGS rank-one one).
VARIANTS = (*ESTIMATORS, *(f"{e}_plain" for e in ESTIMATORS), *(f"{e}_second_order" for e in ESTIMATORS),
            *(f"{e}_second_order_bfgs" for e in ESTIMATORS))
LONG_ORDERS = ("reference", "random-1", "ascending", "descending", "reversed")


def train_config(tokens: int, dim: int, anchors: int) -> dict:
    return {"model": {"config": {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": SEQ}},
            "seq_len": SEQ, "batch_size": BATCH, "max_tokens": tokens, "tokenizer_vocab_size": 512,
            "optimizer": {"lr": 0.003}, "schedule": {"warmup": 0.05}, "averaging": {"method": "none"},
            "eval": {"every": 10**6, "max_tokens": 4096, "sets": {
                "clean": {"synthetic": {"docs": 100, "seed": 1000, "min_quality": 0.7}},
                "mixed": {"synthetic": {"docs": 100, "seed": 1000}}}},
            "threads": 1, "log_every": 5, "record": {"fut": {"dim": dim, "anchors": anchors, "seed": 0}}}


def one_length(work: Path, data: Path, epochs: float, epoch_tokens: int, names: tuple[str, ...], dim: int,
               anchors: int, address: str | None) -> dict:
    tokens = int(epochs * epoch_tokens)
    train_dir = work / f"train-{epochs:g}ep"
    started = time.perf_counter()
    summary = run_training(Job(RunConfig(name="bench", seed=1), RayConfig(), train_config(tokens, dim, anchors)),
                           data, train_dir, log=lambda m: None)
    record_seconds = time.perf_counter() - started
    ids = json.loads((train_dir / "fut" / "meta.json").read_text())["ids"]
    reversed_file = work / "reversed.json"
    reversed_file.write_text(json.dumps(ids[::-1]))
    specs = {**ORDERS, "reversed": str(reversed_file)}
    orders = [f"{n}={specs[n]}" for n in names]
    result = run_whatif(train_dir, orders, work / f"whatif-{epochs:g}ep", verify=len(orders), address=address,
                        log=lambda m: None)
    rows, stats = score(load_record(train_dir), [{"name": r["name"], "ids": r["ids"], "real": r["real"],
                                                  "estimate_seconds": r["estimate_seconds"]} for r in result["orders"]])
    reference = next(r for r in rows if r["order"] == "reference")
    return {"epochs": epochs, "steps": summary["steps"], "tokens": tokens, "record": summary["record"]["fut"],
            "record_run_seconds": round(record_seconds, 1),
            "plain_retrain_seconds": reference["retrain_seconds"],
            "whatif_seconds_per_order": round(sum(r["estimate_seconds"] for r in rows) / len(rows), 4),
            "retrain_seconds_per_order": round(sum(r["retrain_seconds"] for r in rows) / len(rows), 1),
            "stats": stats, "orders": rows}


def score(record, orders: list[dict]) -> tuple[list[dict], dict]:
    """Every estimator variant of every order (``name``, ``ids``, ``real`` from a retrain) against
    the real losses: per-order rows and per-variant agreement statistics."""
    rows = []
    for r in orders:
        first = estimate(record, r["ids"])
        plain = estimate(record, r["ids"], interpolate=False)["by_estimator"]
        variants = {**first["by_estimator"], **{f"{e}_plain": plain[e] for e in ESTIMATORS}}
        for model in SECOND_ORDER:
            second = estimate(record, r["ids"], second_order=model)
            suffix = "" if model == "trajectory" else f"_{model}"
            for e in ESTIMATORS:
                variants[f"{e}_second_order{suffix}"] = second["by_estimator"][e]["second_order"]
            # The term against the first-order change (projected), and the share of Δθ along the trajectory.
            terms = [d[f"second_order_{s}"] for d in second["diagnostics"] for s in record.meta["eval_sets"]]
            variants.setdefault("_diag", {})[model] = {
                "max_ratio": max((t["ratio"]["projected"] for t in terms), default=0.0),
                "max_abs_term": max((abs(t["term"]) for t in terms), default=0.0),
                "max_along_share": max((t["along_share"] for t in terms), default=0.0),
                "statuses": sorted({t["status"] for t in terms})}
        real = r["real"]["final"]
        row = {"order": r["name"], "rows_moved": first["rows_moved"], "real": real,
               "retrain_seconds": r["real"]["seconds"], "estimate_seconds": r["estimate_seconds"],
               "second_order_terms": variants.pop("_diag")}
        for e in VARIANTS:
            est = variants[e]
            row[e] = est["final"]
            # Error along the run: |estimate - real| at every checkpoint, per eval set.
            row[f"{e}_curve_error"] = {s: {c: abs(v - r["real"]["curves"][s][c]) for c, v in curve.items()}
                                       for s, curve in est["curves"].items()}
        row["max_relative_shift"] = max(d["relative_shift"] for d in first["diagnostics"])
        row["replay"] = [{k: d[k] for k in ("step", "replay_cosine", "replay_norm_ratio")}
                         for d in first["diagnostics"]]
        rows.append(row)
    sets = sorted(rows[0]["real"])
    stats = {}
    for e in VARIANTS:
        per_set = {}
        for s in sets:
            est = [r[e][s] for r in rows]
            real = [r["real"][s] for r in rows]
            moved = [r for r in rows if r["rows_moved"]]
            errors = [abs(r[e][s] - r["real"][s]) for r in moved]
            ppl = [abs(math.exp(r[e][s]) - math.exp(r["real"][s])) for r in moved]
            real_spread = max(real) - min(real)
            per_set[s] = {"spearman": spearman(est, real), "mean_abs_error": sum(errors) / len(errors),
                          "max_abs_error": max(errors), "mean_abs_ppl_error": sum(ppl) / len(ppl),
                          "mean_real_ppl": sum(math.exp(x) for x in real) / len(real),
                          "real_spread": real_spread,
                          "error_by_checkpoint": {c: sum(r[f"{e}_curve_error"][s][c] for r in moved) / len(moved)
                                                  for c in rows[0][f"{e}_curve_error"][s]}}
        stats[e] = per_set
    return rows, stats


def reestimate(work: Path) -> None:
    """Re-score the estimators on a finished run's cached work folder (its recorded runs and real
    retrains), without training: updates the stats and orders of benchmarks/out/whatif.json."""
    import pyarrow.parquet as pq

    result = json.loads(OUT.read_text())
    started = time.perf_counter()
    for run in result["runs"]:
        tag = f"{run['epochs']:g}ep"
        record = load_record(work / f"train-{tag}")
        cached = json.loads((work / f"whatif-{tag}" / "whatif.json").read_text())
        orders = []
        for r in cached["orders"]:
            table = pq.read_table(work / f"whatif-{tag}" / "data" / r["name"] / "shards" / "part-00000.parquet",
                                  columns=["id", "position"]).sort_by("position")
            orders.append({"name": r["name"], "ids": [str(i) for i in table.column("id").to_pylist()],
                           "real": r["real"], "estimate_seconds": r["estimate_seconds"]})
        before = run["stats"]["projected"]
        run["orders"], run["stats"] = score(record, orders)
        for s, st in before.items():  # the same cached runs must give the same first-order figures
            if abs(st["mean_abs_error"] - run["stats"]["projected"][s]["mean_abs_error"]) > 1e-9:
                raise SystemExit(f"{work}: the cache is not the run in {OUT} ({tag}, {s})")
    result["reestimated"] = {"commit": os.environ.get("BENCH_COMMIT", "uncommitted"),
                             "seconds": round(time.perf_counter() - started, 1), "work": str(work)}
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    report(result)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--anchors", type=int, default=4)
    parser.add_argument("--long-epochs", type=float, default=3.0)
    parser.add_argument("--work")
    parser.add_argument("--reestimate", action="store_true",
                        help="no training: re-score the estimators on --work's cached runs and retrains")
    args = parser.parse_args()
    if args.reestimate:
        if not args.work:
            parser.error("--reestimate needs --work (the folder of a finished run)")
        reestimate(Path(args.work))
        return
    import ray

    for attempt in range(3):  # a loaded machine can time a local cluster's start-up out
        try:
            ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
            break
        except Exception:  # noqa: BLE001 - Ray raises a bare Exception on a start-up timeout
            ray.shutdown()
            if attempt == 2:
                raise
            time.sleep(15)
    address = ray.get_runtime_context().gcs_address
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-whatif-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        data = write_graded_run(work / "data", args.docs, seed=1, max_chars=400)
        from pipeline.engine.study import epoch_tokens

        # One pass over the data, then a longer run; the epoch's token count uses the run's own tokenizer.
        first = one_length(work, data, 1.0, _epoch(work, data, epoch_tokens), (*ORDERS, "reversed"), args.dim,
                           args.anchors, address)
        long = one_length(work, data, args.long_epochs, _epoch(work, data, epoch_tokens), LONG_ORDERS, args.dim,
                          args.anchors, address)
    finally:
        ray.shutdown()
    result = {"benchmark": "whatif", "docs": args.docs, "corpus_seed": 1, "dim": args.dim, "anchors": args.anchors,
              "model": "gpt2 2x64, seq 64, batch 8", "commit": os.environ.get("BENCH_COMMIT", "uncommitted"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
              "seconds": round(time.perf_counter() - started, 1), "runs": [first, long]}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    report(result)


def report(result: dict) -> None:
    for run in result["runs"]:
        print(f"{run['epochs']:g} epoch(s), {run['steps']} steps: record run {run['record_run_seconds']} s, plain "
              f"{run['plain_retrain_seconds']} s; whatif {run['whatif_seconds_per_order']} s/order")
        for e, per_set in run["stats"].items():
            for s, st in per_set.items():
                print(f"  {e:27s} {s}: rho {st['spearman']}, MAE {st['mean_abs_error']:.4f}, real spread "
                      f"{st['real_spread']:.4f}, ppl err {st['mean_abs_ppl_error']:.3f} at ppl {st['mean_real_ppl']:.1f}")


def _epoch(work: Path, data: Path, epoch_tokens) -> int:
    """Tokens in one pass over ``data`` with the tokenizer the runs share (trained once, cached)."""
    from pipeline.engine.whatif import _Job
    from pipeline.train.trainer import save_resolved_tokenizer

    cfg = train_config(1, 8, 1)
    folder = work / "tokenizer"
    path = save_resolved_tokenizer(_Job(RunConfig(name="bench", seed=1), RayConfig(), cfg), data, folder,
                                   work / "tokenizer-work", lambda m: None, "bench")
    return epoch_tokens(data, path)


if __name__ == "__main__":
    main()
