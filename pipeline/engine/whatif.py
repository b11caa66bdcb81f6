"""``curriculum whatif``: held-out losses of other training orders estimated from one recorded run
(FUT: Yang et al., Estimating the Effects of Sample Training Orders for LLMs without Retraining, 2025).

An order is an order-stage method over the run folder's columns (``{method: quality_descending,
key: quality}``, applied to the same rows with ``stages.order``) or a file of row ids. Every
candidate is estimated by ``pipeline.train.fut.estimate`` and ranked; ``verify`` retrains the top
K and the bottom one with the reference run's own config so the estimate's error is in the
results next to it (docs/methods.md, "Order effects without retraining").
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.errors import ConfigError
from pipeline.core.files import write_json_atomic, write_text_atomic
from pipeline.core.hashing import sha256_file
from pipeline.core.ray_session import connect_ray
from pipeline.core.settings import RayConfig, RunConfig
from pipeline.engine.ablate import Job
from pipeline.io.runfolder import shard_files
from pipeline.train.fut import ESTIMATORS, Record, estimate, load_record
from pipeline.train.trainer import run_training

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- orders


@dataclass
class OrderSpec:
    """One candidate: a name and either an order-stage params mapping or a file of ids."""

    name: str
    params: dict[str, Any] | None = None
    path: Path | None = None


def parse_order(text: str) -> OrderSpec:
    """``reference``, a file of ids (one per line, or a JSON list), ``NAME=SPEC``, a method name
    (``random``) or a YAML mapping of order-stage params (``{method: buckets, key: quality}``)."""
    name = None
    if "=" in text and not text.lstrip().startswith("{"):
        name, text = text.split("=", 1)
    if text == "reference":
        return OrderSpec(name or "reference")
    path = Path(text)
    if path.is_file():
        return OrderSpec(name or path.stem, path=path)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--order {text!r}: neither a file nor YAML ({exc})") from None
    if isinstance(value, str):
        value = {"method": value}
    if not isinstance(value, dict) or "method" not in value:
        raise ConfigError(f"--order {text!r}: give a file of row ids, 'reference', a method name or "
                          "{method: ..., key: ...} (order-stage params)")
    label = name or "-".join(str(value[k]) for k in ("method", "key", "seed", "folds", "buckets") if k in value)
    return OrderSpec(label, params=value)


def read_id_file(path: Path) -> list[str]:
    text = path.read_text()
    if text.lstrip().startswith("["):
        return [str(i) for i in json.loads(text)]
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_table(data_dir: str | Path) -> Any:
    """The run folder's rows (every column) in position order, as one Arrow table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(f) for f in shard_files(data_dir)]
    return pa.concat_tables(tables, promote_options="default").sort_by("position")


def method_order(table: Any, params: dict[str, Any], seed: int, address: str | None = None) -> list[str]:
    """Row ids in the order the order stage puts ``table``'s rows (``params``: its settings)."""
    import pyarrow as pa
    import ray
    import ray.data
    from pydantic import ValidationError

    from stages.base import StageContext
    from stages.order import OrderParams, OrderStage

    try:
        settings = OrderParams(name="order", **{k: v for k, v in params.items() if k != "name"})
    except ValidationError as exc:
        raise ConfigError(f"--order {params}: {exc.errors()[0]['msg']}") from None
    connect_ray(RayConfig(), address)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ctx = StageContext(run_dir=Path("."), artifact_dir=Path("."), seed=int(params.get("seed", seed)),
                       input_columns=table.column_names)
    out = OrderStage(settings).apply(ray.data.from_arrow(table.drop(["position"])), ctx)
    ordered = pa.concat_tables([t for t in ray.get(out.to_arrow_refs()) if t.num_rows])
    if "_drop_reason" in ordered.column_names:
        dropped = sum(1 for r in ordered.column("_drop_reason").to_pylist() if r is not None)
        if dropped:
            raise ConfigError(f"--order {params}: the order stage drops {dropped} row(s); whatif needs every "
                              "trained row once (no pacing or replay repeats)")
    return [str(i) for i in ordered.sort_by("position").column("id").to_pylist()]


def order_ids(spec: OrderSpec, record: Record, table: Any, seed: int, address: str | None = None) -> list[str]:
    if spec.path is not None:
        return read_id_file(spec.path)
    if spec.params is None:
        return list(record.ids)
    return method_order(table, spec.params, seed, address)


def write_order_folder(folder: Path, table: Any, ids: Sequence[str], what: dict[str, Any]) -> Path:
    """A run folder holding ``table``'s rows in the order of ``ids`` (positions 0 … N−1)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = {str(i): n for n, i in enumerate(table.column("id").to_pylist())}
    taken = table.drop(["position"]).take(pa.array([index[i] for i in ids], pa.int64()))
    taken = taken.append_column("position", pa.array(range(len(ids)), pa.int64()))
    tmp = folder.parent / f".{folder.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "shards").mkdir(parents=True)
    pq.write_table(taken, tmp / "shards" / "part-00000.parquet", compression="zstd")
    manifest = {"run_id": f"whatif-{folder.name}", "whatif": what,
                "counts": {"input_rows": len(ids), "quarantined": 0, "output_rows": len(ids)},
                "shards": [{"path": "shards/part-00000.parquet", "rows": len(ids),
                            "sha256": sha256_file(tmp / "shards" / "part-00000.parquet")}]}
    write_json_atomic(tmp / "manifest.json", manifest, indent=2)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


# --------------------------------------------------------------------------- retraining


def retrain(train_dir: Path, data_dir: Path, out: Path, log: Log) -> dict[str, Any]:
    """Train ``data_dir`` with the reference run's config (no record, no averaging; an eval at every
    FUT checkpoint) and tokenizer; (final losses, per-checkpoint losses, seconds)."""
    saved = json.loads((train_dir / "train_config.json").read_text())
    train = dict(saved["train"])
    fut = train.get("record", {}).get("fut") or {}
    total = saved["total_steps"]
    every = max(1, total // int(fut.get("anchors", 4)))
    train.update(record={}, averaging={"method": "none"}, tokenizer=str((train_dir / "tokenizer").resolve()),
                 seed=saved["seed"], eval={**train["eval"], "every": every})
    job = Job(RunConfig(name="whatif", seed=saved["seed"]), RayConfig(), train)
    started = time.perf_counter()
    summary = run_training(job, data_dir, out, log=log)
    seconds = time.perf_counter() - started
    curves: dict[str, dict[str, float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for key, value in rec.items():
            if key.startswith("eval_"):
                curves.setdefault(key[5:], {})[str(rec["step"])] = value
    final = {k[5:]: v for k, v in (summary.get("final") or {}).items()}
    return {"final": final, "curves": curves, "seconds": round(seconds, 3)}


# --------------------------------------------------------------------------- the command


def _mean_loss(losses: dict[str, float], metric: str | None) -> float:
    if metric is not None:
        if metric not in losses:
            raise ConfigError(f"--metric {metric!r}: the run's eval sets are {sorted(losses)}")
        return losses[metric]
    return sum(losses.values()) / len(losses)


def run_whatif(train_dir: str | Path, orders: Sequence[str], out: str | Path | None = None, verify: int = 0,
               metric: str | None = None, address: str | None = None, log: Log = _stderr,
               estimator: str = "projected", second_order: str | None = None) -> dict[str, Any]:
    """Estimate every order, rank them by estimated held-out loss, retrain ``verify`` top ones and the
    bottom one; write OUT/whatif.json and OUT/results.md; return the summary. ``second_order``
    (``trajectory`` or ``bfgs``) ranks by the estimate with that curvature term
    (``pipeline.train.fut.estimate``); the first-order one is kept beside it."""
    train_dir = Path(train_dir)
    record = load_record(train_dir)
    if not record.meta["eval_sets"]:
        raise ConfigError(f"{train_dir}: the run had no train.eval.sets, so there is no held-out loss to estimate")
    saved = json.loads((train_dir / "train_config.json").read_text())
    data_dir = Path(saved["data"])
    out = Path(out) if out else train_dir / "whatif"
    if not orders:
        raise ConfigError("give at least one --order")
    specs = [parse_order(o) for o in orders]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"--order: two candidates share a name ({names}); name them NAME=SPEC")
    table = read_table(data_dir)
    results = []
    for spec in specs:
        ids = order_ids(spec, record, table, saved["seed"], address)
        started = time.perf_counter()
        est = estimate(record, ids, estimator=estimator, second_order=second_order)
        seconds = time.perf_counter() - started
        results.append({"name": spec.name, "spec": spec.params or (str(spec.path) if spec.path else "reference"),
                        "ids": ids, "estimate": est, "score": _mean_loss(est["final"], metric),
                        "estimate_seconds": round(seconds, 4)})
        how = f"second order, {second_order}" if second_order else "first order"
        log(f"[whatif] {spec.name}: estimated {', '.join(f'{k} {v:.4f}' for k, v in est['final'].items())} "
            f"({how}, {est['rows_moved']} rows moved, {seconds:.2f} s)")
    results.sort(key=lambda r: (r["score"], r["name"]))
    for rank, r in enumerate(results, 1):
        r["rank"] = rank
    chosen = [r["name"] for r in results[:verify]]
    if verify and results[-1]["name"] not in chosen:
        chosen.append(results[-1]["name"])
    out.mkdir(parents=True, exist_ok=True)
    for r in results:
        if r["name"] not in chosen:
            continue
        log(f"[whatif] retraining {r['name']} to check the estimate")
        folder = write_order_folder(out / "data" / r["name"], table, r["ids"], {"order": r["spec"]})
        real = retrain(train_dir, folder, out / "retrain" / r["name"], log)
        r["real"] = real
        r["abs_error"] = {k: abs(r["estimate"]["final"][k] - v) for k, v in real["final"].items()}
    summary = _summarize(results, record, metric, estimator, second_order)
    write_json_atomic(out / "whatif.json", {**summary, "orders": [{k: v for k, v in r.items() if k != "ids"}
                                                                 for r in results]}, indent=2)
    write_text_atomic(out / "results.md", _markdown(results, record, second_order))
    return {**summary, "orders": results, "out": str(out)}


def _summarize(results: list[dict[str, Any]], record: Record, metric: str | None, estimator: str,
               second_order: str | None = None) -> dict[str, Any]:
    from pipeline.engine.ablate import spearman

    verified = [r for r in results if "real" in r]
    real = [_mean_loss(r["real"]["final"], metric) for r in verified]
    by_estimator = {}
    for name in ESTIMATORS:
        variants = {name: lambda r, n=name: r["estimate"]["by_estimator"][n]}
        if second_order:
            variants[f"{name}_second_order"] = lambda r, n=name: r["estimate"]["by_estimator"][n]["second_order"]
        for label, pick in variants.items():
            est = [_mean_loss(pick(r)["final"], metric) for r in verified]
            errors = [abs(a - b) for a, b in zip(est, real)]
            by_estimator[label] = {"spearman": spearman(est, real) if len(verified) > 1 else None,
                                   "mean_abs_error": sum(errors) / len(errors) if errors else None}
    chosen = f"{estimator}_second_order" if second_order else estimator
    return {"ranking": [r["name"] for r in results], "metric": metric or "mean over eval sets",
            "estimator": estimator, "second_order": second_order, "by_estimator": by_estimator,
            "spearman": by_estimator[chosen]["spearman"], "mean_abs_error": by_estimator[chosen]["mean_abs_error"],
            "first_order": {k: by_estimator[estimator][k] for k in ("spearman", "mean_abs_error")},
            "record": {"dim": record.meta["dim"], "anchors": record.meta["anchors"],
                       "storage_bytes": record.meta["storage_bytes"], "total_steps": record.meta["total_steps"]},
            "verified": len(verified),
            "estimate_seconds": round(sum(r["estimate_seconds"] for r in results), 3),
            "retrain_seconds": round(sum(r["real"]["seconds"] for r in verified), 3)}


def _markdown(results: list[dict[str, Any]], record: Record, second_order: str | None = None) -> str:
    sets = record.meta["eval_sets"]
    first = [f"1st {s}" for s in sets] if second_order else []
    head = ["rank", "order", "rows moved", *first, *[f"est {s}" for s in sets], *[f"real {s}" for s in sets]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        real = (r.get("real") or {}).get("final") or {}
        est = r["estimate"]
        cells = [str(r["rank"]), r["name"], str(est["rows_moved"]),
                 *([f"{est['first_order_final'][s]:.4f}" for s in sets] if second_order else []),
                 *[f"{est['final'][s]:.4f}" for s in sets], *[f"{real[s]:.4f}" if s in real else "" for s in sets]]
        lines.append("| " + " | ".join(cells) + " |")
    how = f"second order, {second_order} curvature (`1st`: first order)" if second_order else "first order"
    return (f"Held-out losses estimated without retraining ({how}, from the recorded run), and the real "
            "ones where the order was retrained.\n\n" + "\n".join(lines) + "\n")


def write_graded_run(folder: Path, docs: int, seed: int = 0, max_chars: int | None = None) -> Path:
    """A run folder of the synthetic graded corpus in a seeded random order, with its true quality as
    the ``quality`` column (for tests, the benchmark and the notebook); texts cut to ``max_chars``."""
    import pyarrow as pa

    from pipeline.core.hashing import uniform
    from pipeline.io.synth import graded_document

    rows = [graded_document(i, seed) for i in range(docs)]
    table = pa.table({"id": [r["id"] for r in rows], "text": [r["text"][:max_chars] for r in rows],
                      "topic": [r["topic"] for r in rows], "quality": [r["true_quality"] for r in rows],
                      "position": pa.array(range(docs), pa.int64())})
    draws = uniform(table.column("id").to_pylist(), seed, "whatif.reference")
    order = [str(i) for _, i in sorted(zip(draws, table.column("id").to_pylist()))]
    return write_order_folder(folder, table, order, {"synthetic": "graded", "docs": docs, "seed": seed})

