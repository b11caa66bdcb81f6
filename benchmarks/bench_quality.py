"""Does the composite quality score separate junk from prose, and rank a graded corpus, better
than any single signal, on data that played no part in choosing it? (issues 6 and 10)

**Two splits.** Everything is measured twice, on disjoint data:

- *choice*: fold A of the real text (``../shared/data/real_mix.jsonl.gz``, Python docs and
  fortunes), junk generated with seed ``s``, the "dev" half of the real junk files, and the
  synthetic graded corpus of seed ``s``;
- *report*: fold B of the real text, junk generated with seed ``s + 1``, the other half of the
  real junk files, and the synthetic corpus of seed ``s + 1``.

A hashed 20% of the real text is held out as the classifier's trusted positives (never input,
never scored); the other 80% is split by a hash of the id into folds A and B. Each split is one
pipeline run of its own (quality -> perplexity with its own reference LM -> quality_classifier
-> combine), so no model of the report run saw the choice data and no choice was made on the
report data. Among a fixed list of candidate recipes (``CANDIDATES``, weights inside the
heuristics family; the three families keep equal weight), the one with the best *choice*
criterion is chosen (the mean of: the mean per-kind junk-vs-prose AUC over every junk kind, and
the synthetic Spearman with true_quality). The report split then gives its figures, and those
of the shipped default recipe (``stages.combine.RECIPE``, the ``quality`` column).

**Junk.** (1) *Generated* by this script: word salad (the fold's own words in random order),
ascii-like symbol blocks and repeated web boilerplate. (2) *Real* non-prose text that nobody on
this project wrote, read from this machine: source code (the Python standard library, C
headers), data files (CSV / JSON in the installed packages), man pages (troff source),
configuration files, Debian changelogs, web assets (JS / CSS / HTML / SVG, many minified) and
license / copyright files. Each real junk document is a run of consecutive lines from one file,
its length drawn from the prose lengths, so length gives nothing away; files go to the dev or
the report half by a hash of their path. Positives are the fold's real prose.

``python benchmarks/bench_quality.py [--quick] [--split choice|report|both] [--work DIR]``;
writes benchmarks/out/quality.json and prints markdown tables. ``--split choice`` looks only at
the choice data (for designing candidates without seeing the report figures).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
from common import OUT_DIR, REAL_MIX  # noqa: E402  (first: puts the checkout on sys.path)

from pipeline.core.hashing import uniform  # noqa: E402
from pipeline.engine.config import validate_config  # noqa: E402
from pipeline.engine.runner import run_pipeline  # noqa: E402
from stages.combine import RECIPE, combine_scores, percentile_ranks  # noqa: E402
from stages.registry import get_stage_class  # noqa: E402

OUT = OUT_DIR / "quality.json"

# Every heuristic column that is monotone in quality, with its direction (True: higher is better).
# Counts and lengths (n_words, mean_word_len, n_stop_words, c4_sentences, n_chars) are not.
HEURISTICS = {
    "alpha_ratio": True, "symbol_ratio": False, "hash_word_ratio": False, "ellipsis_word_ratio": False,
    "bullet_line_ratio": False, "ellipsis_line_ratio": False,
    "dup_line_ratio": False, "dup_para_ratio": False, "dup_line_char_ratio": False, "dup_para_char_ratio": False,
    **{f"top_{n}gram_ratio": False for n in (2, 3, 4)}, **{f"dup_{n}gram_ratio": False for n in range(5, 11)},
    "c4_line_punct_ratio": True, "javascript_line_ratio": False, "policy_line_ratio": False,
    "lorem_ipsum": False, "curly_brackets": False,
    "fineweb_line_punct_ratio": True, "short_line_ratio": False, "newline_word_ratio": False,
}
DIRECTION = {"ppl": False, "quality_clf": True, **HEURISTICS, "quality": True, "quality_arithmetic": True}

# Candidate recipes: heuristic sub-families and their share of the heuristics family's weight (1);
# a sub-family's share is split evenly among its columns. perplexity and classifier keep weight 1.
_CHARS = ["alpha_ratio", "symbol_ratio"]
_REPETITION = ["dup_line_char_ratio", "dup_para_char_ratio", "top_2gram_ratio", "top_3gram_ratio",
               "top_4gram_ratio", "dup_5gram_ratio", "dup_10gram_ratio"]
_LINES = ["c4_line_punct_ratio", "fineweb_line_punct_ratio", "short_line_ratio"]
_MARKERS = ["curly_brackets", "hash_word_ratio", "bullet_line_ratio", "newline_word_ratio"]
_FAMILIES = {"chars": _CHARS, "repetition": _REPETITION, "lines": _LINES, "markers": _MARKERS}


def _family_recipe(shares: dict[str, float]) -> dict[str, tuple[bool, float, str]]:
    total = sum(shares.values())
    recipe: dict[str, tuple[bool, float, str]] = {"ppl": (False, 1.0, "perplexity"),
                                                  "quality_clf": (True, 1.0, "classifier")}
    for family, share in shares.items():
        for column in _FAMILIES[family]:
            recipe[column] = (HEURISTICS[column], share / total / len(_FAMILIES[family]), "heuristics")
    return recipe


CANDIDATES: dict[str, dict[str, tuple[bool, float, str]]] = {
    "v1 (alpha .3, symbol .3, dup_line .15, dup_5gram .15, top_2gram .1)": {
        "ppl": (False, 1.0, "perplexity"), "quality_clf": (True, 1.0, "classifier"),
        "alpha_ratio": (True, 0.3, "heuristics"), "symbol_ratio": (False, 0.3, "heuristics"),
        "dup_line_ratio": (False, 0.15, "heuristics"), "dup_5gram_ratio": (False, 0.15, "heuristics"),
        "top_2gram_ratio": (False, 0.1, "heuristics")},
    **{f"chars {c} / repetition {r} / lines {li} / markers {m}":
       _family_recipe({k: v for k, v in {"chars": c, "repetition": r, "lines": li, "markers": m}.items() if v})
       for c, r, li, m in [(1, 1, 0, 0), (1, 1, 1, 0), (2, 1, 1, 0), (1, 2, 1, 0), (1, 1, 2, 0),
                           (1, 1, 1, 1), (2, 1, 1, 1), (1, 1, 2, 1), (0, 1, 1, 0), (1, 0, 1, 0)]},
}

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


# --------------------------------------------------------------------------- generated junk


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


GENERATED = ["word_salad", "ascii", "boilerplate"]


def generated_junk(kind: str, rng: random.Random, vocab: list[str]) -> str:
    if kind == "word_salad":
        return word_salad(rng, vocab)
    return ascii_block(rng) if kind == "ascii" else boilerplate(rng)


# --------------------------------------------------------------------------- real junk


def _walk(root: Path, suffixes: tuple[str, ...], names: tuple[str, ...] = (), limit: int = 200_000) -> list[Path]:
    """Files under ``root`` whose name ends with a suffix or starts with a name (case-insensitive)."""
    found: list[Path] = []
    if not root.is_dir():
        return found
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for name in sorted(files):
            low = name.lower()
            if low.endswith(suffixes) or (names and low.startswith(names)):
                found.append(Path(folder) / name)
        if len(found) >= limit:
            break
    return found


_MAN = tuple(f".{i}" for i in range(1, 9))


def real_junk_sources() -> dict[str, list[Path]]:
    """Files of each real non-prose kind on this machine, from the Python installation and /usr/share, /etc."""
    paths = sysconfig.get_paths()
    site, stdlib, include = Path(paths["purelib"]), Path(paths["stdlib"]), Path(paths["include"])
    share, doc = Path("/usr/share"), Path("/usr/share/doc")

    def base(files: list[Path]) -> list[Path]:  # the standard library without its own site-packages
        return [p for p in files if "site-packages" not in p.parts and "dist-packages" not in p.parts]

    sources = {
        "code": base(_walk(stdlib, (".py",)))
        + _walk(include, (".h",)) + _walk(Path("/usr/include"), (".h",), limit=5000),
        "data": _walk(site, (".csv", ".tsv", ".json")) + base(_walk(stdlib, (".csv", ".json"))),
        "man_page": [p for d in sorted((share / "man").glob("man[1-8]")) for p in _walk(d, (".gz",) + _MAN)],
        "config": _walk(Path("/etc"), (".conf", ".cfg", ".ini"), limit=5000)
        + _walk(site, (".cfg", ".ini", ".toml", ".yaml", ".yml")),
        "changelog": _walk(doc, (), ("changelog", "news"), limit=20000),
        "web": _walk(site, (".js", ".css", ".html", ".svg")) + _walk(share / "javascript", (".js", ".css"))
        + _walk(doc, (".js", ".css"), limit=5000),
        "license": [p for p in _walk(site, (), ("license", "copying")) if p.suffix.lower() not in (".py", ".pyc")]
        + _walk(doc, (), ("copyright",), limit=20000),
    }
    return {kind: sorted({p for p in files if p.is_file()}) for kind, files in sources.items()}


def _read_text(path: Path, max_bytes: int = 1_000_000) -> str | None:
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as fh:
            raw = fh.read(max_bytes)
    except (OSError, EOFError):
        return None
    if b"\x00" in raw[:4096]:
        return None
    text = raw.decode("utf-8", errors="replace")
    return text if text.count("\ufffd") < 0.01 * max(len(text), 1) else None


def _chunk(text: str, target: int, rng: random.Random) -> str | None:
    """Consecutive lines from a random line of ``text``, about ``target`` characters (a long line is cut)."""
    lines = text.splitlines()
    if not lines:
        return None
    start = rng.randrange(len(lines))
    out: list[str] = []
    size = 0
    for line in lines[start:]:
        if not out and not line.strip():
            continue
        out.append(line)
        size += len(line) + 1
        if size >= target:
            break
    chunk = "\n".join(out).strip()
    if len(chunk) > 2 * target:
        chunk = chunk[: 2 * target]
    return chunk if len("".join(chunk.split())) >= 20 else None


def real_junk(sources: dict[str, list[Path]], half: int, per_kind: int, lengths: list[int],
              seed: int) -> tuple[list[dict], dict]:
    """``per_kind`` documents of each kind from the files of one ``half`` (0 dev, 1 report)."""
    rows, stats = [], {}
    for kind, files in sources.items():
        keys = [str(p) for p in files]
        in_half = [p for p, u in zip(files, uniform(keys, 0, "bench.junk_half")) if (u >= 0.5) == bool(half)]
        picks = uniform([str(p) for p in in_half], seed, "bench.junk_pick")
        order = [p for _, p in sorted(zip(picks.tolist(), in_half))]
        rng = random.Random(f"{seed}:{kind}:{half}")
        docs: list[dict] = []
        per_file = max(1, -(-per_kind // max(len(order), 1)))  # more chunks per file when files are few
        used = 0
        for path in order:
            if len(docs) >= per_kind:
                break
            text = _read_text(path)
            if text is None:
                continue
            used += 1
            for _ in range(per_file):
                chunk = _chunk(text, rng.choice(lengths), rng)
                if chunk is not None and len(docs) < per_kind:
                    docs.append({"id": f"real-{kind}-{half}-{len(docs):04d}", "text": chunk, "source": str(path),
                                 "kind": kind, "origin": "real"})
        stats[kind] = {"files_available": len(in_half), "files_used": used, "docs": len(docs)}
        rows += docs if len(docs) >= 10 else []  # a kind this machine barely has is left out
    return rows, stats


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


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rho; None for a constant column (no ranking at all)."""
    from scipy.stats import spearmanr

    ok = ~(np.isnan(a) | np.isnan(b))
    if np.unique(a[ok]).size < 2:
        return None
    return round(float(spearmanr(a[ok], b[ok])[0]), 4)


def same_recipe(a: dict[str, tuple[bool, float, str]], b: dict[str, tuple[bool, float, str]]) -> bool:
    return list(a) == list(b) and all(a[c][0] == b[c][0] and a[c][2] == b[c][2] and np.isclose(a[c][1], b[c][1])
                                      for c in a)


def values(df, column: str) -> np.ndarray:
    return df[column].cast(float).fill_null(float("nan")).to_numpy().astype(np.float64)


def oriented(df, column: str) -> np.ndarray:
    v = values(df, column)
    return v if DIRECTION[column] else -v


def recipe_score(df, recipe: dict[str, tuple[bool, float, str]], mean: str = "geometric") -> np.ndarray | None:
    """The combine stage's composite (exact ranks, ``mean`` across groups, nulls worst), in-process."""
    terms = [(c, h, w, g) for c, (h, w, g) in recipe.items() if c in df.columns]
    if not terms:
        return None
    ranks = []
    for column, higher, _, _ in terms:
        v = values(df, column)
        ranks.append(percentile_ranks(v, np.sort(v[~np.isnan(v)]), higher))
    return combine_scores(ranks, [w for *_, w, _ in terms], "worst", [g for *_, g in terms], mean)


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
    return out + [{"name": "quality_classifier", "positives": positives}, {"name": "combine"}]


def run(config: dict, out_dir: Path) -> tuple[object, dict]:
    import polars as pl

    t0 = time.time()
    manifest = run_pipeline(validate_config(config), out_dir, log=lambda m: print(m, file=sys.stderr, flush=True))
    df = pl.read_parquet([str(out_dir / s["path"]) for s in manifest["shards"]])
    manifest["_seconds"] = round(time.time() - t0, 1)
    return df, manifest


def evaluate(df, labels: np.ndarray, kinds: list[str], columns: dict[str, np.ndarray]) -> dict:
    """AUC of prose vs all generated junk, all real junk, and each kind, for every scored column."""
    kind = df["kind"].to_numpy()
    origin = df["origin"].to_numpy()
    prose = kind == "prose"
    out: dict = {}
    for name, scores in columns.items():
        row = {"all": auc(scores, labels)}
        for group in ("generated", "real"):
            keep = prose | (origin == group)
            row[f"all_{group}"] = auc(scores[keep], labels[keep]) if (origin == group).any() else None
        for k in kinds:
            keep = prose | (kind == k)
            row[k] = auc(scores[keep], labels[keep])
        out[name] = row
    return out


def real_split(work: Path, split: str, prose: list[dict], positives: Path, junk_rows: list[dict], n_junk: int,
               with_ppl: bool, seed: int) -> dict:
    vocab = [w for r in prose for w in r["text"].split()]
    rng = random.Random(seed)
    rows = [{"id": r["id"], "text": r["text"], "source": r["source"], "kind": "prose", "origin": "prose"}
            for r in prose]
    for i in range(n_junk):
        kind = GENERATED[i % len(GENERATED)]
        rows.append({"id": f"junk-{i:05d}", "text": generated_junk(kind, rng, vocab), "source": "generated",
                     "kind": kind, "origin": "generated"})
    rows += junk_rows
    data = work / f"{split}_real.jsonl"
    write_if_changed(data, "".join(json.dumps(row) + "\n" for row in rows))
    config = {"run": {"name": f"bench-real-{split}", "seed": seed},
              "input": {"format": "jsonl", "path": str(data), "id_field": "id"},
              "stages": stages(str(positives), with_ppl), "output": {"rows_per_shard": 100_000}}
    df, manifest = run(config, work / f"run-real-{split}")
    labels = (df["kind"] == "prose").to_numpy().astype(int)
    kinds = GENERATED + sorted({r["kind"] for r in junk_rows})
    columns = {c: oriented(df, c) for c in DIRECTION if c in df.columns}
    columns["quality_arithmetic"] = recipe_score(df, RECIPE, "arithmetic")  # the shipped recipe, arithmetic mean
    candidates = {name: recipe_score(df, recipe) for name, recipe in CANDIDATES.items()}
    shipped = recipe_score(df, RECIPE)
    assert shipped is not None and np.allclose(shipped, values(df, "quality"), atol=1e-9), \
        "the in-process composite differs from the combine stage's"
    lowest = df.sort("quality").head(10)
    return {
        "docs": df.height, "prose": int(labels.sum()),
        "junk": {k: int((df["kind"] == k).sum()) for k in kinds}, "seconds": manifest["_seconds"],
        "auc": evaluate(df, labels, kinds, columns),
        "auc_candidates": evaluate(df, labels, kinds, {n: s for n, s in candidates.items() if s is not None}),
        "lowest_quality": [{"kind": r["kind"], "quality": r["quality"], "text": r["text"][:60]}
                           for r in lowest.to_dicts()],
    }


def synthetic_split(work: Path, split: str, docs: int, with_ppl: bool, seed: int) -> dict:
    positives = {"synthetic": {"docs": 1000, "min_quality": 0.8, "seed": seed}}
    config = {"run": {"name": f"bench-synth-{split}", "seed": seed},
              "input": {"format": "synthetic", "synthetic": {"docs": docs, "kind": "graded", "seed": seed}},
              "stages": stages(positives, with_ppl), "output": {"rows_per_shard": 100_000}}
    df, manifest = run(config, work / f"run-synth-{split}")
    truth = values(df, "true_quality")
    result = {"docs": df.height, "seed": seed, "seconds": manifest["_seconds"], "spearman": {},
              "spearman_candidates": {}}
    for column in DIRECTION:
        if column in df.columns:
            result["spearman"][column] = spearman(oriented(df, column), truth)
    result["spearman"]["quality_arithmetic"] = spearman(recipe_score(df, RECIPE, "arithmetic"), truth)
    for name, recipe in CANDIDATES.items():
        score = recipe_score(df, recipe)
        if score is not None:
            result["spearman_candidates"][name] = spearman(score, truth)
    return result


def criterion(real: dict | None, synth: dict, name: str) -> float:
    """The choice criterion of a candidate: mean of its mean per-kind AUC and its synthetic Spearman."""
    parts = [synth["spearman_candidates"][name]]
    if real is not None:
        row = real["auc_candidates"][name]
        per_kind = [v for k, v in row.items() if not k.startswith("all") and v is not None]
        parts.append(float(np.mean(per_kind)))
    return round(float(np.mean(parts)), 4)


# --------------------------------------------------------------------------- printing


def print_auc_table(title: str, table: dict, kinds: list[str], extra: dict | None = None) -> None:
    print(f"\n{title}\n")
    print("| signal | " + " | ".join(kinds) + " |")
    print("|---|" + "---:|" * len(kinds))
    for name, row in {**table, **(extra or {})}.items():
        print(f"| {name} | " + " | ".join("–" if row.get(k) is None else f"{row[k]:.3f}" for k in kinds) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--junk", type=int, default=375, help="generated junk documents per split")
    parser.add_argument("--real-junk", type=int, default=80, help="real junk documents per kind and split")
    parser.add_argument("--synthetic-docs", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0, help="choice split: seed s; report split: s + 1")
    parser.add_argument("--split", choices=["choice", "report", "both"], default="both")
    parser.add_argument("--no-ppl", action="store_true", help="leave the perplexity stage out even if it exists")
    parser.add_argument("--quick", action="store_true", help="smaller: 150 generated, 30 real per kind, 1500 synthetic")
    parser.add_argument("--work", type=Path, help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.quick:
        args.junk, args.real_junk = min(args.junk, 150), min(args.real_junk, 30)
        args.synthetic_docs = min(args.synthetic_docs, 1500)
    with_ppl = get_stage_class("perplexity") is not None and not args.no_ppl
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    t0 = time.time()
    report: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU",
                    "with_ppl": with_ppl, "seed": args.seed, "args": {k: str(v) for k, v in vars(args).items()},
                    "candidates": {n: {c: list(t) for c, t in r.items()} for n, r in CANDIDATES.items()},
                    "shipped_recipe": {c: list(t) for c, t in RECIPE.items()}}
    splits = {"choice": (0, args.seed), "report": (1, args.seed + 1)}
    wanted = list(splits) if args.split == "both" else [args.split]
    sources = real_junk_sources()
    report["real_junk_files"] = {k: len(v) for k, v in sources.items()}
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        records = None
        if REAL_MIX.is_file():
            with gzip.open(REAL_MIX, "rt", encoding="utf-8") as fh:
                records = [json.loads(line) for line in fh]
            ids = [r["id"] for r in records]
            held = uniform(ids, args.seed, "bench.heldout") < 0.2
            fold = (uniform(ids, args.seed, "bench.fold") >= 0.5).astype(int)
            positives = work / "trusted.jsonl"
            write_if_changed(positives, "".join(json.dumps({"text": r["text"]}) + "\n"
                                                for r, h in zip(records, held) if h))
            report["positives_held_out"] = int(held.sum())
        else:
            print(f"skipping the real-text part: {REAL_MIX} is absent", file=sys.stderr)
        for split in wanted:
            half, seed = splits[split]
            result: dict = {"seed": seed}
            if records is not None:
                prose = [r for r, h, f in zip(records, held, fold) if not h and f == half]
                lengths = [len(r["text"]) for r in prose]
                junk_rows, junk_stats = real_junk(sources, half, args.real_junk, lengths, seed)
                result["real_junk"] = junk_stats
                result["real"] = real_split(work, split, prose, positives, junk_rows, args.junk, with_ppl, seed)
            result["synthetic"] = synthetic_split(work, split, args.synthetic_docs, with_ppl, seed)
            result["criterion"] = {n: criterion(result.get("real"), result["synthetic"], n) for n in CANDIDATES}
            report[split] = result
    ray.shutdown()
    if "choice" in report:
        chosen = max(CANDIDATES, key=lambda n: report["choice"]["criterion"][n])  # ties: the first listed
        report["chosen"] = chosen
        report["shipped_is_chosen"] = same_recipe(CANDIDATES[chosen], RECIPE)
    report["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))

    print(f"\n{report['machine']}; perplexity stage {'included' if with_ppl else 'not available: ppl left out'}; "
          f"{report['seconds']} s")
    if "chosen" in report:
        print(f"\nchosen on the choice split: {report['chosen']} (shipped default: "
              f"{'the same' if report['shipped_is_chosen'] else 'DIFFERENT'})")
    for split in wanted:
        r = report[split]
        if "real" in r:
            real = r["real"]
            extra = {f"candidate: {n}": row for n, row in real["auc_candidates"].items()
                     if n == report.get("chosen")}
            gen = ["all", "all_generated", *GENERATED]
            kinds = ["all_real", *sorted(k for k in real["junk"] if k not in GENERATED)]
            print(f"\n### {split} split: {real['prose']} prose, junk {real['junk']}")
            print_auc_table("AUC, prose vs all junk and vs generated junk", real["auc"], gen, extra)
            print_auc_table("AUC, prose vs real junk", real["auc"], kinds, extra)
        s = r["synthetic"]
        print(f"\nSynthetic graded ({s['docs']} docs, seed {s['seed']}): Spearman with true_quality\n")
        print("| signal | Spearman |\n|---|---:|")
        for c, v in s["spearman"].items():
            print(f"| {c} | {'–' if v is None else f'{v:.3f}'} |")
        print("\n| candidate | criterion | Spearman | AUC generated | AUC real |\n|---|---:|---:|---:|---:|")
        for n in CANDIDATES:
            row = r.get("real", {}).get("auc_candidates", {}).get(n, {})
            print(f"| {n} | {r['criterion'][n]:.4f} | {s['spearman_candidates'][n]:.3f} | "
                  f"{row.get('all_generated')} | {row.get('all_real')} |")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
