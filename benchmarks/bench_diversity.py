"""Diversity stages at model speed and at corpus scale: embedding through Ray, k-means fit and assign.

One command, one run, one machine (``python benchmarks/bench_diversity.py [--quick]``):

1. ``embed``: tokens/s of
   (a) the ``embed`` stage through Ray (read parquet -> actor pool -> materialized result; actor
       start-up, model loading and tokenization included), default params (all-MiniLM-L6-v2,
       256 tokens, one actor per core),
   (b) the encoder in-process over the same texts, one process with every core: the same
       tokenization, the same length-sorted token-budget batches in calls of ``docs_per_call``
       rows (model loading excluded),
   and the ratio a/b, plus the largest difference between the two sides' vectors.
2. ``kmeans``: the ``cluster`` stage (k = 64, cosine, fit on a 100k-row hashed sample, then every
   row assigned) on ``rows`` 384-d vectors generated as a Ray dataset (seeded noisy copies of 64
   random unit centres), for each backend (faiss, sklearn). Each case runs in its own driver
   process joined to this run's Ray cluster, so its peak RSS (``VmHWM``) is that case's
   alone; the vectors live in Ray's object store, never in the driver.

Writes ``benchmarks/out/diversity.json``, one section per part (a section another part of the
script owns is kept). ``--quick``: fewer documents, and k-means at 20k and 100k rows instead of
100k and 1M. ``--only embed|kmeans`` runs one part. Timings on a shared machine are noisy: the
JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import OUT_DIR  # noqa: E402  (first: puts the checkout on sys.path)

OUT = OUT_DIR / "diversity.json"
DIM = 384
TRUE_CENTRES = 64


# --------------------------------------------------------------------------- embedding


def bench_embed(n_docs: int, tmp: Path) -> dict[str, Any]:
    """(a) the stage through Ray vs (b) the kernel in-process, same texts, same batching."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data
    import torch

    from pipeline.io.synth import graded_document
    from pipeline.models.encoder import SentenceEncoder
    from pipeline.models.vectors import arrow_to_vectors
    from stages.base import StageContext
    from stages.embed import EmbedParams, EmbedStage

    docs = [graded_document(i, 0) for i in range(n_docs)]
    path = tmp / "docs.parquet"
    pq.write_table(pa.table({"id": [d["id"] for d in docs], "text": [d["text"] for d in docs]}), path)
    params = EmbedParams()
    stage = EmbedStage(params)
    ctx = StageContext(run_dir=tmp, artifact_dir=tmp / "embed", seed=0, input_columns=["id", "text"])
    print(f"[embed] (a) stage through Ray on {n_docs} docs ...", flush=True)
    t0 = time.time()
    out = stage.apply(ray.data.read_parquet(str(path)), ctx)
    table = pa.concat_tables(ray.get(out.to_arrow_refs()))
    wall_a = time.time() - t0
    tokens = int(ctx.info["tokens_embedded"])
    a = {"wall_s": round(wall_a, 2), "tokens": tokens, "tokens_per_s": round(tokens / wall_a, 1),
         "placement": {k: ctx.info[k] for k in ("device", "concurrency", "threads_per_actor")},
         "token_budget": ctx.info["token_budget"], "docs_per_call": ctx.info["docs_per_call"]}
    print(f"[embed] (a) {a}", flush=True)

    cpus = os.cpu_count() or 1
    torch.set_num_threads(cpus)
    encoder = SentenceEncoder(params.model, max_length=params.max_length, token_budget=ctx.info["token_budget"],
                              threads=cpus)
    texts = [d["text"] for d in docs]
    per_call = ctx.info["docs_per_call"]
    print(f"[embed] (b) in-process, {cpus} threads ...", flush=True)
    t0 = time.time()
    parts, tokens_b = [], 0
    for start in range(0, n_docs, per_call):
        vectors, counts, _ = encoder.embed(texts[start:start + per_call])
        parts.append(vectors)
        tokens_b += int(counts.sum())
    wall_b = time.time() - t0
    b = {"wall_s": round(wall_b, 2), "tokens": tokens_b, "tokens_per_s": round(tokens_b / wall_b, 1),
         "threads": cpus, "model_load_excluded": True}
    print(f"[embed] (b) {b}", flush=True)
    mine = np.concatenate(parts)
    order = {doc_id: i for i, doc_id in enumerate(table["id"].to_pylist())}
    stage_vectors, _ = arrow_to_vectors(table["embedding"])
    stage_vectors = stage_vectors[[order[d["id"]] for d in docs]]
    return {"docs": n_docs, "model": params.model, "max_length": params.max_length, "a_stage": a, "b_in_process": b,
            "ratio_a_over_b": round(a["tokens_per_s"] / b["tokens_per_s"], 3), "target_ratio": 0.85,
            "max_abs_diff_a_b": float(np.abs(stage_vectors - mine).max())}


# --------------------------------------------------------------------------- k-means


def _make_vectors(batch, dim: int, centres: int, seed: int) -> Any:
    """Seeded noisy copies of ``centres`` random unit vectors for the ids of the batch (a block-local
    RNG keyed by its first id: the same rows whatever the block layout)."""
    import numpy as np
    import pyarrow as pa

    from pipeline.models.vectors import vectors_to_arrow

    ids = batch["id"].to_numpy().astype(np.int64)
    centre_vectors = np.random.default_rng(seed).standard_normal((centres, dim)).astype(np.float32)
    centre_vectors /= np.linalg.norm(centre_vectors, axis=1, keepdims=True)
    rng = np.random.default_rng([seed, int(ids[0]) if len(ids) else 0])
    truth = (ids * 2654435761 % centres).astype(np.int32)
    x = centre_vectors[truth] + rng.standard_normal((len(ids), dim)).astype(np.float32) * (1.2 / np.sqrt(dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return pa.table({"id": pa.array(ids.astype(str)), "true_centre": pa.array(truth),
                     "embedding": vectors_to_arrow(x, np.ones(len(ids), dtype=bool))})


def _peak_rss_mb() -> float:
    """This process's peak resident set size in MB: ``VmHWM`` (per address space, so it starts afresh
    at exec; ``ru_maxrss`` on Linux carries the parent's peak over into a child), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def kmeans_case(rows: int, backend: str, k: int, fit_rows: int) -> dict[str, Any]:
    """One k-means case in this (fresh) driver process, joined to the Ray cluster at RAY_ADDRESS."""
    import ray
    import ray.data

    from stages.base import StageContext
    from stages.cluster import ClusterParams, ClusterStage

    ray.init(address=os.environ["RAY_ADDRESS"], include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rss_start = _peak_rss_mb()
    blocks = max(8, rows // 25_000)
    data = ray.data.range(rows, override_num_blocks=blocks).map_batches(
        _make_vectors, batch_format="pyarrow", batch_size=None, fn_kwargs={"dim": DIM, "centres": TRUE_CENTRES, "seed": 0}
    ).materialize()
    rss_generated = _peak_rss_mb()
    with tempfile.TemporaryDirectory(prefix="bench-kmeans-") as tmp:
        ctx = StageContext(run_dir=Path(tmp), artifact_dir=Path(tmp) / "artifacts", seed=0,
                           input_columns=["id", "true_centre", "embedding"])
        stage = ClusterStage(ClusterParams(k=k, backend=backend, fit_rows=fit_rows))
        t0 = time.time()
        out = stage.apply(data, ctx)  # sample + fit in the driver, assign with map_batches (materialized)
        wall = time.time() - t0
        agreement = _purity(out)
    peak = _peak_rss_mb()
    info = ctx.info
    return {"rows": rows, "backend": backend, "k": k, "dim": DIM, "fit_rows": info["fit_rows"],
            "fit_and_assign_s": round(wall, 2), "seconds": info["seconds"], "objective": info["objective"],
            "purity_vs_true_centres": agreement, "empty_clusters": info["empty_clusters"],
            "driver_peak_rss_mb": peak, "driver_peak_rss_before_mb": rss_start,
            "driver_peak_rss_after_generation_mb": rss_generated,
            "vectors_gb_in_object_store": round(rows * DIM * 4 / 1e9, 2)}


def _purity(out) -> float:
    """Share of rows whose cluster's majority true centre is their own (counts come back, not rows)."""
    import numpy as np
    import pyarrow as pa

    def counts(table: pa.Table) -> pa.Table:
        pairs = table.group_by(["cluster", "true_centre"]).aggregate([("cluster", "count")])
        return pairs.rename_columns(["cluster", "true_centre", "n"])

    rows = out.select_columns(["cluster", "true_centre"]).map_batches(counts, batch_format="pyarrow").take_all()
    size = max(max(r["cluster"] for r in rows), max(r["true_centre"] for r in rows)) + 1
    total = np.zeros((size, size), dtype=np.int64)
    for r in rows:
        total[r["cluster"], r["true_centre"]] += r["n"]
    return round(float(total.max(axis=1).sum() / total.sum()), 4)


def bench_kmeans(sizes: list[int], backends: list[str], k: int, fit_rows: int, address: str) -> list[dict[str, Any]]:
    """Each (rows, backend) in its own driver process, so peak RSS figures do not mix."""
    results = []
    for rows in sizes:
        for backend in backends:
            print(f"[kmeans] {rows} rows, {backend} ...", flush=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--kmeans-case", str(rows), backend, str(k),
                   str(fit_rows)]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": address})
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                results.append({"rows": rows, "backend": backend, "error": done.stderr.strip().splitlines()[-1]})
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"[kmeans] {result}", flush=True)
            results.append(result)
    return results


# --------------------------------------------------------------------------- main


def _merge(path: Path, sections: dict[str, Any]) -> dict[str, Any]:
    """The JSON file with ``sections`` replaced; sections written by other parts are kept."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data.update(sections)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer docs; k-means at 20k and 100k rows")
    parser.add_argument("--only", choices=["embed", "kmeans"], help="run one part")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--docs", type=int, help="documents for the embedding part (default 300 quick, 1500 full)")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--fit-rows", type=int, default=100_000)
    parser.add_argument("--kmeans-case", nargs=4, metavar=("ROWS", "BACKEND", "K", "FIT_ROWS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.kmeans_case:
        rows, backend, k, fit_rows = args.kmeans_case
        print(json.dumps(kmeans_case(int(rows), backend, int(k), int(fit_rows))))
        return 0

    import ray
    import ray.data
    import torch
    import transformers

    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    address = ray.get_runtime_context().gcs_address
    started = time.time()
    sections: dict[str, Any] = {"machine": {
        "cpus": cpus, "gpu": torch.cuda.is_available(), "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(), "loadavg_start": os.getloadavg()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "ray": ray.__version__}}
    try:
        import faiss
        import sklearn

        sections["versions"].update(faiss=faiss.__version__, sklearn=sklearn.__version__)
    except ImportError:
        pass
    if args.only in (None, "embed"):
        with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
            sections["embed"] = {"quick": args.quick, **bench_embed(args.docs or (300 if args.quick else 1500), Path(tmp))}
    if args.only in (None, "kmeans"):
        sizes = [20_000, 100_000] if args.quick else [100_000, 1_000_000]
        sections["kmeans"] = {"quick": args.quick, "cases": bench_kmeans(sizes, ["faiss", "sklearn"], args.k,
                                                                          args.fit_rows, address)}
    sections["machine"]["loadavg_end"] = os.getloadavg()
    sections["machine"]["seconds"] = round(time.time() - started, 1)
    ray.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_merge(args.out, sections), indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
