"""Clusters and semantic dedup on real text: how the clusters line up with ``source``, what SemDeDup removes.

``python benchmarks/bench_real_clusters.py`` runs ``curriculum run`` twice on the real mix
(``../shared/data/real_mix.jsonl.gz``: Python documentation paragraphs and fortune-cookie
quotes, with their ``source``) in one run folder: quality -> embed (all-MiniLM-L6-v2, 128 tokens)
-> cluster -> semdedup (threshold 0.95, no quality key: the seeded id hash decides which copy
stays). The first run picks k by silhouette over 2..32; the second fixes k = 16, to show how
the sources split into topics, and reuses the first run's embeddings from the stage cache. For each it reports the
cluster x source table, purity and NMI against ``source``; for semdedup, the rows dropped per
source and seeded examples, each with the kept row it duplicates and their cosine similarity.

Writes ``benchmarks/out/real_clusters.json``; the run folder stays in ``--work``, so a rerun
resumes. Skips (exit 0, a message) where the real mix is absent.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import OUT_DIR, REAL_MIX, ROOT  # noqa: E402  (first: puts the checkout on sys.path)

OUT = OUT_DIR / "real_clusters.json"
THRESHOLD = 0.95


def _config(path: Path, k: int | str, docs_path: Path) -> None:
    import yaml

    cluster: dict[str, Any] = {"name": "cluster", "k": k}
    if k == "auto":
        cluster["k_candidates"] = [2, 4, 8, 16, 32]
    config = {
        "run": {"name": "real-clusters", "seed": 0},
        "input": {"format": "jsonl", "path": str(docs_path), "text_field": "text"},
        "stages": [{"name": "quality"}, {"name": "embed", "max_length": 128}, cluster,
                   {"name": "semdedup", "threshold": THRESHOLD, "key": None}],
        "output": {"rows_per_shard": 4000, "keep_embeddings": True},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _run(config: Path, run_dir: Path) -> float:
    started = time.time()
    subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(config), "--out", str(run_dir)],
                   check=True, cwd=ROOT)
    return round(time.time() - started, 1)


def _cluster_report(shards: Any, dropped: Any) -> dict[str, Any]:
    """Cluster x source counts over every row the cluster stage saw (kept and semdedup-dropped)."""
    import numpy as np
    from sklearn.metrics import normalized_mutual_info_score

    from pipeline.core.hashing import hash64

    clusters = np.concatenate([shards["cluster"], dropped["cluster"]])
    sources = np.concatenate([shards["source"], dropped["source"]])
    table: dict[str, dict[str, int]] = {}
    for cluster in sorted(set(clusters.tolist())):
        members = sources[clusters == cluster]
        names, counts = np.unique(members, return_counts=True)
        table[str(cluster)] = {str(n): int(c) for n, c in zip(names, counts)}
    purity = sum(max(row.values()) for row in table.values()) / len(clusters)
    texts = np.concatenate([shards["text"], dropped["text"]])
    ids = np.concatenate([shards["id"], dropped["id"]])
    misplaced = []  # seeded examples of rows whose source is not their cluster's majority
    for cluster, row in table.items():
        majority = max(row, key=row.get)
        outside = np.flatnonzero((clusters.astype(str) == cluster) & (sources != majority))
        outside = outside[np.argsort(hash64([str(i) for i in ids[outside]], seed=0, salt="bench.misplaced"))][:2]
        misplaced += [{"cluster": cluster, "majority": majority, "source": str(sources[i]), "id": str(ids[i]),
                       "text": str(texts[i])[:200]} for i in outside]
    return {"k": len(table), "rows": int(len(clusters)), "clusters": table, "purity": round(purity, 4),
            "misplaced_examples": misplaced,
            "nmi_vs_source": round(float(normalized_mutual_info_score(sources, clusters)), 4)}


def _dedup_report(shards: Any, dropped: Any, examples: int) -> dict[str, Any]:
    """Rows dropped per source, and for seeded examples the kept row each one duplicates."""
    import numpy as np

    from pipeline.core.hashing import hash64

    by_source: dict[str, int] = {}
    for source in dropped["source"]:
        by_source[str(source)] = by_source.get(str(source), 0) + 1
    total_by_source: dict[str, int] = {}
    for source in list(shards["source"]) + list(dropped["source"]):
        total_by_source[str(source)] = total_by_source.get(str(source), 0) + 1
    kept_vectors = np.stack(shards["embedding"]).astype(np.float32)
    order = np.argsort(hash64([str(i) for i in dropped["id"]], seed=0, salt="bench.example"), kind="stable")
    chosen = [int(i) for i in order[:examples]]
    pairs = []
    for i in chosen:
        same_cluster = np.flatnonzero(shards["cluster"] == dropped["cluster"][i])
        similarity = kept_vectors[same_cluster] @ np.asarray(dropped["embedding"][i], dtype=np.float32)
        best = int(same_cluster[int(np.argmax(similarity))])
        pairs.append({"cosine": round(float(similarity.max()), 4), "source": str(dropped["source"][i]),
                      "dropped": {"id": str(dropped["id"][i]), "text": str(dropped["text"][i])[:300]},
                      "kept": {"id": str(shards["id"][best]), "text": str(shards["text"][best])[:300]}})
    return {"threshold": THRESHOLD, "dropped": int(len(dropped["id"])), "dropped_by_source": by_source,
            "rows_by_source": total_by_source, "examples": pairs}


def _read(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The shards and the semdedup stage's dropped rows, as numpy columns (the corpus is 8,000 rows)."""
    import numpy as np
    import pyarrow.parquet as pq

    columns = ["id", "text", "source", "cluster", "embedding"]
    shards = pq.read_table(run_dir / "shards", columns=columns)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stage = next(s for s in manifest["stages"] if s["name"] == "semdedup")
    dropped_dir = next((run_dir / "stages").glob(f"*-semdedup-{stage['key'][:16]}")) / "dropped"
    dropped = pq.read_table(dropped_dir, columns=columns) if dropped_dir.is_dir() else shards.slice(0, 0)

    def as_numpy(table: Any) -> dict[str, Any]:
        return {c: (table[c].to_pylist() if c == "embedding" else np.asarray(table[c].to_pylist())) for c in columns}

    return as_numpy(shards), as_numpy(dropped)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--examples", type=int, default=6)
    parser.add_argument("--work", type=Path, default=OUT_DIR / "real_clusters_run",
                        help="run folder and configs (a rerun resumes from its stage cache)")
    args = parser.parse_args(argv)
    if not REAL_MIX.is_file():
        print(f"skipped: {REAL_MIX} is absent")
        return 0
    result: dict[str, Any] = {"benchmark": "real_clusters", "corpus": REAL_MIX.name, "runs": {}}
    folder = args.work
    folder.mkdir(parents=True, exist_ok=True)
    for label, k in (("k_auto", "auto"), ("k_16", 16)):
        config = folder / f"{label}.yaml"
        _config(config, k, REAL_MIX)
        run_dir = folder / "run"
        seconds = _run(config, run_dir)
        shards, dropped = _read(run_dir)
        manifest = json.loads((run_dir / "manifest.json").read_text())
        cluster_info = next(s for s in manifest["stages"] if s["name"] == "cluster").get("info", {})
        result["runs"][label] = {"seconds": seconds, "cluster_info": {k_: v for k_, v in cluster_info.items()
                                                                      if k_ in ("k", "k_source", "silhouette", "sizes")},
                                 "clusters": _cluster_report(shards, dropped),
                                 "semdedup": _dedup_report(shards, dropped, args.examples)}
        print(json.dumps({label: result["runs"][label]["clusters"]}, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
