"""Does the composite quality score separate junk from prose, and rank a graded corpus, better
than any single signal? (issue 6; METHODS.md §1b)

1. **Real text with injected junk.** ``../shared/data/real_mix.jsonl.gz`` (Python docs and
   fortunes). A hashed 20% of it is held out as the classifier's trusted positives (the good
   part of the corpus's own domain, never part of the input). Into the other 80% we inject
   generated junk: word salad (the corpus's own words in random order), ascii-like symbol
   blocks, and repeated web boilerplate. The run scores it with the quality stage, the
   perplexity stage (when ``stages/perplexity.py`` is registered), the quality classifier and
   ``combine`` (the recommended recipe), and we report the AUC of prose vs junk for every
   signal, direction-adjusted, overall and per junk kind.
2. **The synthetic graded corpus.** Spearman(signal, true_quality) for every signal and for the
   composite; the trusted set is clean generated documents (true_quality >= 0.8) from indices the
   input never uses.

Runs the real pipeline (``run_pipeline``) on a local Ray. Writes benchmarks/out/quality.json
and prints markdown tables.
``python benchmarks/bench_quality.py [--quick] [--junk 750] [--synthetic-docs 4000] [--work DIR]``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import OUT_DIR, REAL_MIX  # noqa: E402  (first: puts the checkout on sys.path)

from pipeline.core.hashing import uniform  # noqa: E402
from pipeline.engine.config import validate_config  # noqa: E402
from pipeline.engine.runner import run_pipeline  # noqa: E402
from stages.combine import RECIPE  # noqa: E402
from stages.registry import get_stage_class  # noqa: E402

OUT = OUT_DIR / "quality.json"
SIGNALS = [*RECIPE, "quality", "quality_arithmetic"]
DIRECTION = {**{c: h for c, (h, *_) in RECIPE.items()}, "quality": True, "quality_arithmetic": True}

_BOILERPLATE = [
    "Click here to subscribe to our newsletter!",
    "Home | About us | Products | Blog | Contact",
    "Copyright (c) 2024 Example Corp. All rights reserved.",
    "We use cookies to improve your experience. Accept all cookies?",
    "Share on Facebook | Tweet | Pin it | Email a friend",
    "Sign in or register to post comments",
    "Related posts: Top 10 tips | You won't believe | Read more >>",
    "Terms of use | Privacy policy | Sitemap",
]
_ART_PIECES = ["+", "-", "|", "=", "#", "*", "/", "\\", "_", ".", "o", "~", "^", "<", ">", "[", "]", ":"]


# --------------------------------------------------------------------------- junk


def word_salad(rng: random.Random, vocab: list[str]) -> str:
    lines = []
    for _ in range(rng.randint(2, 8)):
        lines.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(6, 16))))
    return "\n".join(lines)


def ascii_block(rng: random.Random) -> str:
    """Boxes, banners and patterned symbol lines, the way ascii art and separators look."""
    width = rng.randint(12, 60)
    pieces = rng.sample(_ART_PIECES, 4)
    lines = []
    for _ in range(rng.randint(4, 16)):
        kind = rng.random()
        indent = " " * rng.randint(0, 8)
        if kind < 0.3:
            lines.append(indent + pieces[0] + pieces[1] * width + pieces[0])
        elif kind < 0.6:
            lines.append(indent + pieces[2] + " " * width + pieces[2])
        else:
            motif = "".join(rng.choice(pieces + [" "]) for _ in range(rng.randint(2, 5)))
            lines.append(indent + (motif * (width // len(motif) + 1))[:width])
    if rng.random() < 0.5:  # a caption inside, as banners have
        caption = rng.choice(["WELCOME", "Menu", "ERROR 404", "v1.0", "README"])
        lines.insert(len(lines) // 2, f"{pieces[2]}  {caption}  {pieces[2]}")
    return "\n".join(lines)


def boilerplate(rng: random.Random) -> str:
    chosen = rng.sample(_BOILERPLATE, rng.randint(2, 4))
    return "\n".join(rng.choice(chosen) for _ in range(rng.randint(6, 24)))


JUNK = {"word_salad": word_salad, "ascii": ascii_block, "boilerplate": boilerplate}


# --------------------------------------------------------------------------- metrics


def auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """ROC AUC with ties counted half; NaN scores (nulls) are ranked worst."""
    from sklearn.metrics import roc_auc_score

    if len(set(labels.tolist())) < 2:
        return None
    filled = np.where(np.isnan(scores), -np.inf, scores)
    finite = filled[np.isfinite(filled)]
    low = (finite.min() - 1.0) if finite.size else 0.0
    return round(float(roc_auc_score(labels, np.where(np.isneginf(filled), low, filled))), 4)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    ok = ~(np.isnan(a) | np.isnan(b))
    return round(float(spearmanr(a[ok], b[ok])[0]), 4)


def oriented(df, column: str) -> np.ndarray:
    v = df[column].cast(float).fill_null(float("nan")).to_numpy().astype(np.float64)
    return v if DIRECTION[column] else -v


# --------------------------------------------------------------------------- runs


def write_if_changed(path: Path, text: str) -> None:
    """Rewrite only on a change: the input's mtime is part of the stage cache key (--work reuse)."""
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


def stages(positives: dict | str, with_ppl: bool) -> list[dict]:
    out: list[dict] = [{"name": "quality"}]
    if with_ppl:
        # One core is left for Ray's read tasks: an actor pool on every core can starve them.
        out.append({"name": "perplexity", "concurrency": max(1, (os.cpu_count() or 2) - 1)})
    # The default composite (geometric mean across signal families), and the plain weighted mean for comparison.
    out += [{"name": "quality_classifier", "positives": positives}, {"name": "combine"},
            {"name": "combine", "into": "quality_arithmetic", "mean": "arithmetic"}]
    return out


def run(config: dict, out_dir: Path) -> tuple[object, dict]:
    import polars as pl

    t0 = time.time()
    manifest = run_pipeline(validate_config(config), out_dir, log=lambda m: print(m, file=sys.stderr, flush=True))
    df = pl.read_parquet([str(out_dir / s["path"]) for s in manifest["shards"]])
    manifest["_seconds"] = round(time.time() - t0, 1)
    return df, manifest


def real_mix(work: Path, n_junk: int, with_ppl: bool, seed: int) -> dict:
    import polars as pl

    records = [json.loads(line) for line in gzip.open(REAL_MIX, "rt", encoding="utf-8")]
    held = uniform([r["id"] for r in records], seed, "bench.heldout") < 0.2
    positives = work / "trusted.jsonl"
    write_if_changed(positives, "".join(json.dumps({"text": r["text"]}) + "\n" for r, h in zip(records, held) if h))
    prose = [r for r, h in zip(records, held) if not h]
    vocab = [w for r in prose for w in r["text"].split()]
    rng = random.Random(seed)
    rows = [{"id": r["id"], "text": r["text"], "source": r["source"], "kind": "prose"} for r in prose]
    kinds = list(JUNK)
    for i in range(n_junk):
        kind = kinds[i % len(kinds)]
        rows.append({"id": f"junk-{i:05d}", "text": JUNK[kind](rng) if kind != "word_salad" else word_salad(rng, vocab),
                     "source": "junk", "kind": kind})
    data = work / "real_with_junk.jsonl"
    write_if_changed(data, "".join(json.dumps(row) + "\n" for row in rows))
    config = {"run": {"name": "bench-real", "seed": seed},
              "input": {"format": "jsonl", "path": str(data), "id_field": "id"},
              "stages": stages(str(positives), with_ppl), "output": {"rows_per_shard": 100_000}}
    df, manifest = run(config, work / "run-real")
    labels = (df["kind"] == "prose").to_numpy().astype(int)
    result = {"docs": df.height, "prose": int(labels.sum()), "junk": int((1 - labels).sum()),
              "positives_held_out": int(held.sum()), "seconds": manifest["_seconds"], "auc": {}, "auc_by_kind": {},
              "stages": [{"name": s["name"], "info": s.get("info")} for s in manifest["stages"]]}
    for column in SIGNALS:
        if column not in df.columns:
            continue
        scores = oriented(df, column)
        result["auc"][column] = auc(scores, labels)
        result["auc_by_kind"][column] = {}
        for kind in kinds:
            keep = (df["kind"].is_in(["prose", kind])).to_numpy()
            result["auc_by_kind"][column][kind] = auc(scores[keep], labels[keep])
    worst = df.sort("quality").head(10).select(["kind", "quality", pl.col("text").str.slice(0, 60)])
    result["lowest_quality"] = worst.to_dicts()
    return result


def synthetic(work: Path, docs: int, with_ppl: bool, seed: int) -> dict:
    positives = {"synthetic": {"docs": 1000, "min_quality": 0.8, "seed": seed}}
    config = {"run": {"name": "bench-synth", "seed": seed},
              "input": {"format": "synthetic", "synthetic": {"docs": docs, "kind": "graded"}},
              "stages": stages(positives, with_ppl), "output": {"rows_per_shard": 100_000}}
    df, manifest = run(config, work / "run-synth")
    truth = df["true_quality"].to_numpy().astype(np.float64)
    result = {"docs": df.height, "seconds": manifest["_seconds"], "spearman": {},
              "stages": [{"name": s["name"], "info": s.get("info")} for s in manifest["stages"]]}
    for column in SIGNALS:
        if column in df.columns:
            result["spearman"][column] = spearman(oriented(df, column), truth)
    singles = {c: v for c, v in result["spearman"].items() if c in RECIPE}
    best = max(singles, key=singles.get)
    result["best_single"] = {"column": best, "spearman": singles[best]}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--junk", type=int, default=750, help="junk documents injected into the real mix")
    parser.add_argument("--synthetic-docs", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ppl", action="store_true", help="leave the perplexity stage out even if it exists")
    parser.add_argument("--quick", action="store_true", help="a smaller run: 300 junk documents, 1500 synthetic")
    parser.add_argument("--work", type=Path, help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.quick:
        args.junk, args.synthetic_docs = min(args.junk, 300), min(args.synthetic_docs, 1500)
    with_ppl = get_stage_class("perplexity") is not None and not args.no_ppl
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    report: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU",
                    "with_ppl": with_ppl, "seed": args.seed}
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if REAL_MIX.is_file():
            report["real_mix"] = real_mix(work, args.junk, with_ppl, args.seed)
        else:
            print(f"skipping the real-text part: {REAL_MIX} is absent", file=sys.stderr)
        report["synthetic"] = synthetic(work, args.synthetic_docs, with_ppl, args.seed)
    ray.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))

    print(f"\n{report['machine']}; perplexity stage {'included' if with_ppl else 'not available: ppl left out'}")
    if "real_mix" in report:
        r = report["real_mix"]
        kinds = list(JUNK)
        print(f"\nReal mix + junk: {r['prose']} prose, {r['junk']} junk, "
              f"{r['positives_held_out']} held-out positives\n")
        print("| signal | AUC all junk | " + " | ".join(kinds) + " |")
        print("|---|---|" + "---|" * len(kinds))
        for c, v in r["auc"].items():
            print(f"| {c} | {v} | " + " | ".join(str(r["auc_by_kind"][c][k]) for k in kinds) + " |")
    s = report["synthetic"]
    print(f"\nSynthetic graded ({s['docs']} docs): Spearman with true_quality\n")
    print("| signal | Spearman |\n|---|---|")
    for c, v in s["spearman"].items():
        print(f"| {c} | {v} |")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
