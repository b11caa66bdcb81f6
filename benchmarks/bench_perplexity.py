"""Perplexity scoring at model speed: the stage through Ray vs the raw limit vs the naive peer.

One command, one run, one machine (``python benchmarks/bench_perplexity.py [--quick]``):

1. Trains the default reference LM (``ReferenceLMSpec()``) on each corpus, as the stage does
   (every document of the corpus is in the hashed sample: both are under ``max_docs``), and
   records its wall and CPU time.
2. On each corpus (``../shared/data/real_mix.jsonl.gz`` and the synthetic graded corpus), with
   that model, measures tokens/s of
   (a) the ``perplexity`` stage through Ray (read parquet -> actor pool -> materialized result,
       actor start-up and tokenization included),
   (b) the limit: one in-process loop of plain ``model(input_ids).logits`` forwards over
       pre-tokenized windows, sorted by length and packed into full ``token_budget`` batches,
   (b') the same loop with the stage's kernel (body + chunked head on scored positions only),
   (c) the naive peer: one document (window) per forward, as Data-Juicer's LLM perplexity filter.
3. Ablations of the CPU wins on one corpus (``inference_mode``, ``use_cache``, chunked head,
   padding to multiples of 8, token budget, actors x threads).
   At scale: (a) and (b') again on a synthetic corpus four times larger, which separates the
   stage's fixed cost per run (worker start-up, imports, the counting pass) from its marginal
   throughput.
4. Quality: Spearman(-ppl, true_quality) on the synthetic corpus (>= 4000 docs), and the
   lowest / highest perplexity deciles of the real mix with examples.

Writes ``benchmarks/out/perplexity.json``. ``--quick`` uses fewer documents and training steps
(figures are then preliminary). Timings on a shared machine are noisy: the JSON records the
load average before and after.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import OUT_DIR, REAL_MIX  # noqa: E402  (first: puts the checkout on sys.path)

OUT = OUT_DIR / "perplexity.json"


def _load_real(limit: int | None) -> list[dict[str, Any]]:
    rows = []
    with gzip.open(REAL_MIX, "rt", encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            rows.append({"id": str(record["id"]), "text": record["text"], "source": record.get("source")})
            if limit and len(rows) >= limit:
                break
    return rows


def _load_synthetic(n: int) -> list[dict[str, Any]]:
    from pipeline.io.synth import graded_document

    return [{"id": d["id"], "text": d["text"], "true_quality": d["true_quality"]} for d in
            (graded_document(i, 0) for i in range(n))]


def _train(rows: list[dict[str, Any]], folder: Path, steps: int | None, max_length: int) -> dict[str, Any]:
    """The stage's reference LM: the hashed sample (here all rows, sorted by id), default spec."""
    from pipeline.models.reference_lm import ReferenceLMSpec, train_reference_lm

    spec = ReferenceLMSpec() if steps is None else ReferenceLMSpec(steps=steps)
    texts = [r["text"] for r in sorted(rows, key=lambda r: r["id"])[: spec.max_docs]]
    wall, cpu = time.time(), time.process_time()
    record = train_reference_lm(texts, folder, spec, max_length, seed=0, key="bench")
    return {"wall_s": round(time.time() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1),
            "parameters": record["parameters"], "steps": spec.steps, "sample_docs": record["sample"]["docs"],
            "loss_first": record["train"]["loss_first"], "loss_last": record["train"]["loss_last"]}


# --------------------------------------------------------------------------- (a) the stage through Ray


def _stage(rows: list[dict[str, Any]], model: Path, tmp: Path, max_length: int, **overrides: Any) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data

    from stages.base import StageContext
    from stages.perplexity import PerplexityParams, PerplexityStage

    folder = tmp / f"input-{len(rows)}"
    if not folder.exists():
        folder.mkdir(parents=True)
        step = -(-len(rows) // 4)
        for k in range(4):  # four parquet files, like a stage cache
            part = rows[k * step : (k + 1) * step]
            pq.write_table(pa.table({"id": [r["id"] for r in part], "text": [r["text"] for r in part]}),
                           folder / f"part-{k}.parquet")
    ds = ray.data.read_parquet(str(folder))
    ctx = StageContext(run_dir=tmp, artifact_dir=tmp / "artifacts", seed=0, input_columns=["id", "text"])
    params = PerplexityParams(model=str(model), max_length=max_length, **overrides)
    started = time.time()
    out = PerplexityStage(params).apply(ds, ctx)
    scores = {r["id"]: r["ppl"] for r in out.select_columns(["id", "ppl"]).take_all()}
    seconds = time.time() - started  # apply() materializes: the fetch of (id, ppl) adds little
    tokens = ctx.info["tokens_scored"]
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "concurrency": ctx.info["concurrency"], "threads_per_actor": ctx.info["threads_per_actor"],
            "phases_s": ctx.info["seconds"], "scores": scores}


# --------------------------------------------------------------------------- (b), (b'), (c) in-process


def _windows(scorer, texts: list[str]) -> list[tuple[list[int], int]]:
    """Every window of every document as (token ids, targets it scores), as the stage plans them."""
    from pipeline.models.windows import plan_windows

    out = []
    for seq in scorer.tokenize(texts):
        out += [(seq[s:e], e - f) for s, f, e in plan_windows(len(seq), scorer.max_length, scorer.stride)]
    return out


def _raw(scorer, scored_windows: list[tuple[list[int], int]] | None, token_budget: int, kernel: str = "plain",
         inference: bool = True, use_cache: bool | None = False, pad_multiple: int = 1,
         texts: list[str] | None = None) -> dict[str, Any]:
    """Sorted, full-batch forwards over every window; tokens = the targets the stage scores.

    With ``texts``, tokenization and window planning are timed too (as the stage pays them);
    otherwise the windows come pre-tokenized (the ablations compare kernels only).
    """
    import torch
    import torch.nn.functional as F

    from pipeline.models.windows import padded_length

    model = scorer.model
    context = torch.inference_mode if inference else torch.no_grad
    kwargs = {} if use_cache is None else {"use_cache": use_cache}
    started = time.time()
    if texts is not None:
        scored_windows = _windows(scorer, texts)
    windows = [w for w, _ in scored_windows]
    order = sorted(range(len(windows)), key=lambda i: len(windows[i]))
    tokens = sum(n for _, n in scored_windows)
    with context():
        i = 0
        while i < len(order):
            width = padded_length(len(windows[order[i]]), pad_multiple, 1 << 30)
            batch = [order[i]]
            i += 1
            while i < len(order):  # grow while the padded batch fits the budget
                w = max(width, padded_length(len(windows[order[i]]), pad_multiple, 1 << 30))
                if w * (len(batch) + 1) > token_budget:
                    break
                width = w
                batch.append(order[i])
                i += 1
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            select = torch.zeros((len(batch), width), dtype=torch.bool)
            for r, k in enumerate(batch):
                ids[r, : len(windows[k])] = torch.tensor(windows[k])
                select[r, : len(windows[k]) - 1] = True
            targets = torch.roll(ids, -1, dims=1)[select]
            if kernel == "plain":
                logits = model(input_ids=ids, **kwargs).logits
                F.cross_entropy(logits[select].float(), targets, reduction="none")
            else:
                scorer._losses(ids, select, targets)
    seconds = time.time() - started
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}


def _naive(scorer, scored_windows: list[tuple[list[int], int]]) -> dict[str, Any]:
    """One window per forward with labels, the way Data-Juicer's LLM perplexity filter loops."""
    import torch

    tokens = sum(n for _, n in scored_windows)
    started = time.time()
    with torch.no_grad():
        for w, _ in scored_windows:
            if len(w) < 2:
                continue
            ids = torch.tensor(w)[None]
            scorer.model(input_ids=ids, labels=ids).loss.item()
    seconds = time.time() - started
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}


# --------------------------------------------------------------------------- the report


def _deciles(rows: list[dict[str, Any]], scores: dict[str, float]) -> dict[str, Any]:
    import numpy as np

    ranked = sorted((scores[r["id"]], r["id"]) for r in rows if scores.get(r["id"]) is not None)
    by_id = {r["id"]: r for r in rows}
    tenth = max(1, len(ranked) // 10)

    def describe(part: list[tuple[float, str]]) -> dict[str, Any]:
        docs = [by_id[i] for _, i in part]
        sources: dict[str, int] = {}
        for d in docs:
            sources[str(d.get("source"))] = sources.get(str(d.get("source")), 0) + 1
        picks = [part[int(k)] for k in np.linspace(0, len(part) - 1, 4)]
        return {"ppl_range": [round(part[0][0], 2), round(part[-1][0], 2)], "sources": sources,
                "median_chars": int(np.median([len(d["text"]) for d in docs])),
                "examples": [{"ppl": round(p, 2), "id": i, "text": by_id[i]["text"][:220]} for p, i in picks]}

    return {"docs": len(ranked), "median_ppl": round(ranked[len(ranked) // 2][0], 2),
            "lowest_decile": describe(ranked[:tenth]), "highest_decile": describe(ranked[-tenth:])}


def _corpus(name: str, rows: list[dict[str, Any]], tmp: Path, args: argparse.Namespace, out: dict[str, Any]) -> None:
    import torch

    from pipeline.models.causal_lm_scorer import PerplexityScorer

    print(f"[{name}] training the reference LM on {len(rows)} docs ...", flush=True)
    model = tmp / f"ref-{name}"
    entry: dict[str, Any] = {"docs": len(rows), "reference_lm": _train(rows, model, args.steps, args.max_length)}
    print(f"[{name}] reference LM: {entry['reference_lm']}", flush=True)

    print(f"[{name}] (a) stage through Ray ...", flush=True)
    stage = _stage(rows, model, tmp / name, args.max_length, token_budget=args.token_budget)
    scores = stage.pop("scores")
    entry["a_stage"] = stage

    torch.set_num_threads(os.cpu_count() or 1)
    scorer = PerplexityScorer(str(model), max_length=args.max_length, token_budget=args.token_budget,
                              threads=os.cpu_count())
    windows = _windows(scorer, [r["text"] for r in rows])
    print(f"[{name}] (b) raw sorted batches, (c) naive loop over {len(windows)} windows ...", flush=True)
    texts = [r["text"] for r in rows]
    entry["b_raw"] = _raw(scorer, None, args.token_budget, texts=texts)
    entry["b_raw_stage_kernel"] = _raw(scorer, None, args.token_budget, kernel="chunked", pad_multiple=8, texts=texts)
    naive_windows = windows[: args.naive_docs] if args.naive_docs else windows
    entry["c_naive"] = _naive(scorer, naive_windows)
    entry["ratios"] = {
        "a_over_b": round(stage["tokens_per_s"] / entry["b_raw"]["tokens_per_s"], 3),
        "a_over_c": round(stage["tokens_per_s"] / entry["c_naive"]["tokens_per_s"], 3),
        "a_over_b_stage_kernel": round(stage["tokens_per_s"] / entry["b_raw_stage_kernel"]["tokens_per_s"], 3),
        "b_over_c": round(entry["b_raw"]["tokens_per_s"] / entry["c_naive"]["tokens_per_s"], 3),
    }
    print(f"[{name}] ratios: {entry['ratios']}", flush=True)

    if name == "synthetic" and args.scale_docs:
        entry["scale"] = _scale(model, tmp, args, stage, scorer)
    if name == args.ablate:
        entry["ablations"] = _ablations(scorer, windows, rows, model, tmp / f"{name}-abl", args)
    if name == "synthetic":
        from scipy.stats import spearmanr

        truth = {r["id"]: r["true_quality"] for r in rows}
        ids = [i for i in scores if scores[i] is not None]
        rho = spearmanr([-scores[i] for i in ids], [truth[i] for i in ids]).statistic
        entry["quality"] = {"spearman_neg_ppl_true_quality": round(float(rho), 4), "docs": len(ids),
                            "target": 0.8, "train_wall_s": entry["reference_lm"]["wall_s"], "train_target_s": 120}
        print(f"[{name}] Spearman(-ppl, true_quality) = {rho:.4f}", flush=True)
    else:
        entry["deciles"] = _deciles(rows, scores)
    out["corpora"][name] = entry


def _scale(model: Path, tmp: Path, args: argparse.Namespace, small: dict[str, Any], scorer) -> dict[str, Any]:
    """(a) and (b') again on a synthetic corpus ``--scale-docs`` long, and the stage's fixed cost.

    The stage pays a cost per run that the in-process loop does not: Ray worker processes start
    and import torch and transformers, the input is split into blocks, the result is counted in
    a second pass. Two corpus sizes separate it from the marginal throughput: the line through
    (tokens, seconds) of the small and the large run has slope 1 / marginal tok/s and intercept
    the fixed cost in seconds.
    """
    rows = _load_synthetic(args.scale_docs)
    print(f"[scale] (a) and (b') on {len(rows)} synthetic docs ...", flush=True)
    large = _stage(rows, model, tmp / "scale", args.max_length, token_budget=args.token_budget)
    large.pop("scores")
    texts = [r["text"] for r in rows]
    kernel = _raw(scorer, None, args.token_budget, kernel="chunked", pad_multiple=8, texts=texts)
    marginal = (large["tokens"] - small["tokens"]) / max(1e-9, large["seconds"] - small["seconds"])
    fixed = small["seconds"] - small["tokens"] / marginal
    return {"docs": len(rows), "a_stage": large, "b_raw_stage_kernel": kernel,
            "a_over_b_stage_kernel": round(large["tokens_per_s"] / kernel["tokens_per_s"], 3),
            "stage_marginal_tokens_per_s": round(marginal, 1), "stage_fixed_cost_s": round(fixed, 2),
            "marginal_over_b_stage_kernel": round(marginal / kernel["tokens_per_s"], 3)}


def _ablations(scorer, windows, rows, model: Path, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Which CPU wins matter: each variant of the raw loop on the same windows, plus actors x threads."""
    import torch

    sub = windows[: args.ablation_windows]
    print(f"[ablations] on {len(sub)} windows ...", flush=True)
    result: dict[str, Any] = {"windows": len(sub)}
    variants = {
        "plain_no_grad_with_cache": {"inference": False, "use_cache": None},
        "plain_inference_mode_with_cache": {"inference": True, "use_cache": None},
        "plain_inference_mode_no_cache": {"inference": True, "use_cache": False},
        "chunked_head_no_cache": {"kernel": "chunked", "use_cache": False},
        "chunked_head_pad8": {"kernel": "chunked", "use_cache": False, "pad_multiple": 8},
    }
    for label, kwargs in variants.items():
        result[label] = _raw(scorer, sub, args.token_budget, **kwargs)["tokens_per_s"]
    for budget in (4096, 16384, 65536):
        result[f"chunked_pad8_budget_{budget}"] = _raw(scorer, sub, budget, kernel="chunked", pad_multiple=8)["tokens_per_s"]
    cpus = os.cpu_count() or 1
    for threads in sorted({1, cpus}):
        torch.set_num_threads(threads)
        result[f"chunked_pad8_{threads}_threads_one_process"] = _raw(
            scorer, sub, args.token_budget, kernel="chunked", pad_multiple=8)["tokens_per_s"]
    torch.set_num_threads(cpus)
    sub_rows = rows[: args.ablation_docs]
    for concurrency, threads in sorted({(cpus, 1), (1, cpus)}):
        stage = _stage(sub_rows, model, tmp, args.max_length, token_budget=args.token_budget,
                       concurrency=concurrency, threads=threads)
        result[f"stage_{concurrency}_actors_x_{threads}_threads"] = stage["tokens_per_s"]
    for per_call in (512, 256):  # before / after: the default rows per actor call on CPU
        stage = _stage(sub_rows, model, tmp, args.max_length, token_budget=args.token_budget, docs_per_call=per_call)
        result[f"stage_docs_per_call_{per_call}"] = stage["tokens_per_s"]
    print(f"[ablations] {result}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer docs and training steps (preliminary figures)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--token-budget", type=int, default=4096, help="the stage's CPU default")
    parser.add_argument("--scale-docs", type=int, default=16000,
                        help="synthetic docs for the at-scale ratio and the stage's fixed cost (0: skip)")
    parser.add_argument("--only", choices=["real_mix", "synthetic"], help="run one corpus only")
    parser.add_argument("--ablate", default="real_mix", help="corpus to run the ablations on ('' for none)")
    args = parser.parse_args(argv)
    args.steps = 100 if args.quick else None
    args.scale_docs = min(args.scale_docs, 8000) if args.quick else args.scale_docs
    args.naive_docs = 1500 if args.quick else None
    args.ablation_windows = 1500 if args.quick else 4000
    args.ablation_docs = 1500 if args.quick else 4000
    synthetic_docs = 4000  # the quality check needs >= 4000 docs, quick or not
    real_limit = 3000 if args.quick else None

    import ray
    import torch
    import transformers

    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    # Warm Ray's worker pool, as earlier stages of a pipeline would have: (a) then measures the
    # stage, not the first start of Ray's worker processes.
    ray.data.range(64, override_num_blocks=cpus * 2).map_batches(lambda b: b).materialize()
    out: dict[str, Any] = {
        "benchmark": "perplexity", "quick": args.quick, "machine": {
            "cpus": cpus, "gpu": torch.cuda.is_available(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "loadavg_start": os.getloadavg()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "ray": ray.__version__},
        "settings": {"max_length": args.max_length, "token_budget": args.token_budget}, "corpora": {},
    }
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-ppl-") as tmp:
        corpora = [("synthetic", _load_synthetic(synthetic_docs))]
        if REAL_MIX.is_file():
            corpora.insert(0, ("real_mix", _load_real(real_limit)))
        else:
            print(f"real text not found at {REAL_MIX}: synthetic corpus only", flush=True)
        for name, rows in corpora:
            if args.only and name != args.only:
                continue
            _corpus(name, rows, Path(tmp), args, out)
    out["machine"]["loadavg_end"] = os.getloadavg()
    out["seconds"] = round(time.time() - started, 1)
    ray.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
