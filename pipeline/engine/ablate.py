"""``curriculum ablate``: data ablations approximated by merging models (Na et al., Scalable Data
Ablation Approximations for Language Models through Modular Training and Merging, 2024).

From one shared start, one model is continue-trained per partition of the data (a topic, source
or cluster column). A candidate mixture of up to ``max_size`` partitions is scored by the
held-out loss of the uniform parameter average of its partitions' models, with no training. A
seeded few mixtures are also trained for real, from the same start and on the same token
budget, and the proxy's rank correlation with the real losses is reported, with what each cost.
The trainer, averaging and evaluation are the ``pipeline.train`` ones; this module only builds
the per-partition data folders, runs them and compares (docs/training.md, docs/methods.md §14).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.core.errors import ConfigError
from pipeline.core.files import write_json_atomic, write_text_atomic
from pipeline.core.hashing import sha256_file, uniform
from pipeline.core.settings import RayConfig, RunConfig, StrictModel
from pipeline.io.runfolder import shard_files
from pipeline.models.lm import compute_dtype, resolve_device
from pipeline.train.averaging import average_state, write_averaged

Log = Callable[[str], None]
RESULT_COLUMNS = ("combination", "size", "proxy_loss", "baseline_loss", "real_loss")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class AblateConfig(StrictModel):
    """The ``ablate:`` section. The per-model token budget is ``train.max_tokens``."""

    partition_by: str = Field("topic", min_length=1, description="The shard column whose values are the partitions "
                              "(a source, topic or cluster column).")
    partitions: list[str] | None = Field(None, description="The partitions to use (default: every value of the column).")
    max_size: int = Field(3, ge=1, description="Mixtures of 1 … max_size partitions are scored by the merged proxy.")
    real_mixtures: int = Field(6, ge=0, description="How many mixtures (a seeded choice) are also trained for real.")
    real_min_size: int = Field(2, ge=1, description="The smallest mixture trained for real: a one-partition mixture "
                               "trained for real is that partition's model, so its proxy is exact.")
    base_tokens: int = Field(0, ge=0, description="A shared base training of this many tokens on the mixture of all "
                             "partitions before the per-partition models; 0 starts them from train.model itself.")
    mixture_budget: Literal["equal", "sum"] = Field(
        "equal", description="equal: a real mixture trains on train.max_tokens split evenly across its partitions; "
        "sum: on train.max_tokens per partition (the union of what its partition models saw).")
    heldout: float = Field(0.1, gt=0, lt=1, description="Share of each partition's rows held out for evaluation "
                           "(chosen by a seeded hash of the id).")
    heldout_max_docs: int = Field(200, ge=1, description="At most this many held-out documents per partition.")
    seed: int | None = Field(None, ge=0, description="Held-out split and the choice of real mixtures; default run.seed.")
    keep_merged: bool = Field(False, description="Write each merged model to OUT/merged/<mixture>/ (else only scored).")

    @field_validator("partitions")
    @classmethod
    def _distinct(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (len(value) < 2 or len(set(value)) != len(value)):
            raise ValueError("give at least two distinct partitions (or leave it out for every value of the column)")
        return value

    @model_validator(mode="after")
    def _sizes(self) -> "AblateConfig":
        if self.real_min_size > self.max_size:
            raise ValueError(f"real_min_size {self.real_min_size} is above max_size {self.max_size}")
        return self


# --------------------------------------------------------------------------- pure helpers


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho: the Pearson correlation of the average ranks (ties share their mean rank).
    None when it is undefined (fewer than 2 points, or a constant side)."""
    if len(x) != len(y):
        raise ValueError(f"{len(x)} values against {len(y)}")
    if len(x) < 2:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def combinations(partitions: Sequence[str], max_size: int) -> list[tuple[str, ...]]:
    """Every mixture of 1 … max_size partitions, smallest first, each in the partitions' order."""
    return [c for k in range(1, min(max_size, len(partitions)) + 1) for c in itertools.combinations(partitions, k)]


def mixture_name(combo: Sequence[str]) -> str:
    return "+".join(combo)


def choose_real(combos: Sequence[tuple[str, ...]], count: int, min_size: int, seed: int) -> list[tuple[str, ...]]:
    """A seeded choice of ``count`` mixtures of at least ``min_size`` partitions (by a hash of the name)."""
    pool = [c for c in combos if len(c) >= min_size]
    draws = uniform([mixture_name(c) for c in pool], seed, "ablate.real")
    picked = sorted(range(len(pool)), key=lambda i: (draws[i], i))[:count]
    return [pool[i] for i in sorted(picked)]


def _slug(value: str) -> str:
    """A partition value as a folder and eval-set name (letters, digits, '_' and '-')."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", value).strip("_")
    return slug or "empty"


def interleave(groups: Sequence[Sequence[Any]]) -> list[Any]:
    """Round-robin over the groups (each in its own order) until all are used up, so every
    prefix of the result takes about an equal share from each group."""
    out: list[Any] = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


# --------------------------------------------------------------------------- data folders


@dataclass
class Partitions:
    """The rows of each partition (training and held-out ids), in the run folder's position order."""

    column: str
    names: list[str]  # partition values
    slugs: dict[str, str]  # value -> folder / eval-set name
    train_rows: dict[str, list[dict[str, Any]]]
    heldout_rows: dict[str, list[dict[str, Any]]]


def split_partitions(data_dir: Path, settings: AblateConfig, seed: int, text_field: str) -> Partitions:
    """Read the run folder's id, text and partition column; split each partition into training and
    held-out rows by a seeded hash of the id. ConfigError naming the key on a missing column or value."""
    import pyarrow.parquet as pq

    column = settings.partition_by
    rows: dict[str, list[dict[str, Any]]] = {}
    for f in shard_files(data_dir):
        names = pq.read_schema(f).names
        if column not in names:
            extra = [n for n in names if n not in ("id", "position")]
            raise ConfigError(f"ablate.partition_by: the shards have no column {column!r} ({f.name} has {extra})")
        table = pq.read_table(f, columns=["id", text_field, "position", column]).sort_by("position")
        for record in table.to_pylist():
            if record[column] is None or not record[text_field]:
                continue
            rows.setdefault(str(record[column]), []).append({"id": record["id"], "text": record[text_field]})
    names = sorted(rows)
    if settings.partitions is not None:
        missing = [p for p in settings.partitions if p not in rows]
        if missing:
            raise ConfigError(f"ablate.partitions: {missing} are not values of {column!r} (found: {names[:20]})")
        names = list(settings.partitions)
    if len(names) < 2:
        raise ConfigError(f"ablate.partition_by: column {column!r} has {len(names)} value(s); ablation needs two or more")
    slugs = {n: _slug(n) for n in names}
    if len(set(slugs.values())) != len(slugs):
        raise ConfigError(f"ablate.partitions: two values of {column!r} map to the same name: {slugs}")
    train_rows, heldout_rows = {}, {}
    for name in names:
        part = rows[name]
        draws = uniform([r["id"] for r in part], seed, "ablate.heldout")
        held = [r for r, u in zip(part, draws) if u < settings.heldout][: settings.heldout_max_docs]
        held_ids = {r["id"] for r in held}
        train_rows[name] = [r for r in part if r["id"] not in held_ids]
        heldout_rows[name] = held
        if not held or not train_rows[name]:
            raise ConfigError(f"ablate.heldout: partition {name!r} ({len(part)} rows) leaves no held-out or no training "
                              "rows at this share")
    return Partitions(column, names, slugs, train_rows, heldout_rows)


def write_data_folder(folder: Path, rows: Sequence[dict[str, Any]], text_field: str, what: dict[str, Any]) -> Path:
    """A minimal run folder the trainer reads: one shard with positions 0 … N−1 and a manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = folder / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": [r["id"] for r in rows], text_field: [r["text"] for r in rows],
                      "position": pa.array(range(len(rows)), pa.int64())})
    path = shards / "part-00000.parquet"
    pq.write_table(table, path, compression="zstd")
    manifest = {"run_id": f"ablate-{folder.name}", "ablate": what,
                "counts": {"input_rows": len(rows), "quarantined": 0, "output_rows": len(rows)},
                "shards": [{"path": "shards/part-00000.parquet", "rows": len(rows), "sha256": sha256_file(path)}]}
    write_json_atomic(folder / "manifest.json", manifest, indent=2)
    return folder


def write_heldout(folder: Path, parts: Partitions) -> dict[str, str]:
    """One held-out jsonl per partition; returns the eval sets (``heldout_<slug>`` -> path)."""
    folder.mkdir(parents=True, exist_ok=True)
    sets = {}
    for name in parts.names:
        path = folder / f"{parts.slugs[name]}.jsonl"
        write_text_atomic(path, "".join(json.dumps({"id": r["id"], "text": r["text"]}) + "\n"
                                        for r in parts.heldout_rows[name]))
        sets[f"heldout_{parts.slugs[name]}"] = str(path.resolve())
    return sets


# --------------------------------------------------------------------------- training


@dataclass
class Job:
    """What ``run_training`` reads of a config (``JobConfig``)."""

    run: RunConfig
    ray: RayConfig
    train: dict[str, Any]


def _train(job: Job, data: Path, out: Path, log: Log) -> dict[str, Any]:
    """Train (or pick up a finished training) and return its summary with the wall time it took."""
    from pipeline.train.trainer import run_training

    timing = out / "ablate_timing.json"
    started = time.perf_counter()
    summary = run_training(job, data, out, log=log)
    seconds = time.perf_counter() - started
    attempt = summary.get("last_attempt") or {}
    if attempt.get("resumed_from") is not None and timing.is_file():
        # A rerun picks the finished (or part-trained) model up: its cost is what training took.
        before = json.loads(timing.read_text())["seconds"]
        seconds = before if not attempt.get("steps") else before + seconds
    write_json_atomic(timing, {"seconds": round(seconds, 3)})
    return {**summary, "seconds": round(seconds, 3)}


def _losses(summary: dict[str, Any], sets: Sequence[str]) -> dict[str, float]:
    final = summary.get("final") or {}
    return {s: float(final[f"eval_{s}"]) for s in sets}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def run_ablation(config: Any, settings: AblateConfig, data: Path, out: Path, log: Log = _stderr) -> dict[str, Any]:
    """The whole ablation into ``out``; returns the summary (also ``out/summary.json``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.train.evaluation import evaluate, load_eval_sets

    data, out = Path(data), Path(out)
    if out.resolve() == data.resolve():
        raise ConfigError("--out must differ from the run folder (--data)")
    seed = settings.seed if settings.seed is not None else config.run.seed
    train = dict(config.train or {})
    if (workers := train.get("workers", 1)) != 1:
        raise ConfigError(f"train.workers: ablate trains its many small models one at a time (got {workers})")
    text_field = (train.get("data") or {}).get("text_field", "text")
    if (train.get("data") or {}).get("format", "text") != "text":
        raise ConfigError("train.data.format: ablate trains on text (format: text)")
    parts = split_partitions(data, settings, seed, text_field)
    combos = combinations(parts.names, settings.max_size)
    real = choose_real(combos, settings.real_mixtures, settings.real_min_size, seed)
    log(f"[ablate] {len(parts.names)} partitions of {parts.column!r}: {len(combos)} mixtures of up to "
        f"{settings.max_size}; {len(real)} also trained for real")
    out.mkdir(parents=True, exist_ok=True)
    sets = write_heldout(out / "heldout", parts)
    budget = int(train.get("max_tokens", 2_000_000))
    eval_cfg = {**(train.get("eval") or {}), "sets": {**((train.get("eval") or {}).get("sets") or {}), **sets}}
    eval_cfg["every"] = 10**9  # the trainer still evaluates at the last step
    train.update(eval=eval_cfg, averaging={"method": "none"})
    job = Job(config.run, config.ray, train)
    set_names = list(eval_cfg["sets"])
    heldout_names = list(sets)

    # The shared start: a base training on all partitions interleaved, or train.model as it is.
    everything = interleave([parts.train_rows[n] for n in parts.names])
    mixed = write_data_folder(out / "data" / "all", everything, text_field, {"partitions": parts.names})
    compute: dict[str, Any] = {}
    if settings.base_tokens > 0:
        base = _train(Job(job.run, job.ray, {**train, "max_tokens": settings.base_tokens}), mixed, out / "base", log)
        compute["base"] = {"seconds": base["seconds"], "tokens": base["tokens"]}
        start = {"model": {"pretrained": str((out / "base" / "final").resolve())},
                 "tokenizer": str((out / "base" / "tokenizer").resolve())}
    else:
        start = {"tokenizer": _shared_tokenizer(job, mixed, out / "tokenizer", log)}
        compute["base"] = {"seconds": 0.0, "tokens": 0}
    continued = {**train, **start}

    # One model per partition, the same budget each.
    partition_models: dict[str, dict[str, Any]] = {}
    for name in parts.names:
        slug = parts.slugs[name]
        folder = write_data_folder(out / "data" / slug, parts.train_rows[name], text_field, {"partitions": [name]})
        log(f"[ablate] partition {name!r}: {len(parts.train_rows[name])} training rows")
        partition_models[name] = _train(Job(job.run, job.ray, continued), folder, out / "models" / slug, log)
    compute["partition_models"] = {"seconds": round(sum(s["seconds"] for s in partition_models.values()), 3),
                                   "tokens": sum(s["tokens"] for s in partition_models.values()),
                                   "models": len(partition_models)}

    # The proxy: the uniform average of the partition models' weights, for every mixture.
    started = time.perf_counter()
    first = out / "models" / parts.slugs[parts.names[0]] / "final"
    tokenizer = AutoTokenizer.from_pretrained(str(out / "models" / parts.slugs[parts.names[0]] / "tokenizer"))
    eval_spec = train.get("eval") or {}
    seq_len = int(train.get("seq_len", 256))
    eval_data = load_eval_sets(eval_cfg["sets"], tokenizer, seq_len, int(eval_spec.get("max_tokens", 32_768)))
    model = AutoModelForCausalLM.from_pretrained(str(first), dtype=torch.float32)
    device = resolve_device(train.get("device", "auto"))
    precision = train.get("precision", "auto")
    # Evaluated as the trainer evaluates the real models: bf16 autocast where it trains in bf16.
    bf16 = precision == "bf16" or (precision == "auto" and compute_dtype(device) == torch.bfloat16)
    autocast = torch.bfloat16 if bf16 else None
    model.to(device)
    rows: list[dict[str, Any]] = []
    for index, combo in enumerate(combos, start=1):
        if index % 25 == 0 or index == len(combos):
            log(f"[ablate] scoring merged models: {index}/{len(combos)}")
        folders = [out / "models" / parts.slugs[n] / "final" for n in combo]
        state = average_state(folders, [1 / len(combo)] * len(combo))
        if settings.keep_merged:
            write_averaged(state, out / "merged" / "+".join(parts.slugs[n] for n in combo),
                           {"method": "uniform", "checkpoints": [str(f) for f in folders],
                            "weights": [1 / len(combo)] * len(combo), "dtype": "float32"}, folders[-1])
        _load_weights(model, state)
        proxy = evaluate(model, eval_data, int(eval_spec.get("batch_size", 8)), device, autocast)
        singles = [_losses(partition_models[n], set_names) for n in combo]
        rows.append({"combination": mixture_name(combo), "partitions": list(combo), "size": len(combo),
                     "proxy": proxy, "baseline": {s: _mean([x[s] for x in singles]) for s in set_names},
                     "real": _losses(partition_models[combo[0]], set_names) if len(combo) == 1 else None,
                     "real_kind": "partition model" if len(combo) == 1 else None})
    del model
    compute["proxy_eval"] = {"seconds": round(time.perf_counter() - started, 3), "tokens": 0, "mixtures": len(combos)}

    # The real thing, for a few mixtures: the same start, the budget split evenly across the partitions.
    real_seconds, real_tokens = 0.0, 0
    by_name = {r["combination"]: r for r in rows}
    for combo in real:
        slug = "+".join(parts.slugs[n] for n in combo)
        mix = interleave([parts.train_rows[n] for n in combo])
        folder = write_data_folder(out / "data" / f"mix-{slug}", mix, text_field, {"partitions": list(combo)})
        tokens = budget if settings.mixture_budget == "equal" else budget * len(combo)
        log(f"[ablate] real mixture {mixture_name(combo)}: {tokens} tokens")
        summary = _train(Job(job.run, job.ray, {**continued, "max_tokens": tokens}), folder,
                         out / "mixtures" / slug, log)
        real_seconds += summary["seconds"]
        real_tokens += summary["tokens"]
        row = by_name[mixture_name(combo)]
        row["real"], row["real_kind"] = _losses(summary, set_names), "trained"
        row["real_seconds"], row["real_tokens"] = summary["seconds"], summary["tokens"]
    compute["real_mixtures"] = {"seconds": round(real_seconds, 3), "tokens": real_tokens, "mixtures": len(real)}
    for row in rows:
        for key in ("proxy", "baseline", "real"):
            if row[key] is not None:
                row[f"{key}_loss"] = _mean([row[key][s] for s in heldout_names])
    summary = summarize(rows, parts, settings, compute, heldout_names, budget, seed, len(combos))
    write_results(out, rows, set_names)
    write_json_atomic(out / "summary.json", summary, indent=2)
    return summary


def _load_weights(model: Any, state: dict[str, Any]) -> None:
    """Load merged weights; only tied weights (the LM head) may be absent from the file."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or []) | {"lm_head.weight"}
    if unexpected or set(missing) - tied:
        raise ConfigError(f"merged weights do not fit the model: missing {sorted(set(missing) - tied)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")


def _shared_tokenizer(job: Job, data: Path, folder: Path, log: Log) -> str:
    """With no base training, one tokenizer for every model: resolved as the trainer would on the
    mixture of all partitions, and saved once."""
    from pipeline.train.trainer import save_resolved_tokenizer

    return save_resolved_tokenizer(job, data, folder, folder.parent / "base", log, "ablate")


def summarize(rows: list[dict[str, Any]], parts: Partitions, settings: AblateConfig, compute: dict[str, Any],
              heldout: Sequence[str], budget: int, seed: int, mixtures: int) -> dict[str, Any]:
    """Spearman of proxy and baseline against the real losses, and the compute each took."""
    trained = [r for r in rows if r.get("real_kind") == "trained"]
    known = [r for r in rows if r.get("real") is not None]

    def rho(subset: list[dict[str, Any]], key: str) -> float | None:
        return spearman([r[f"{key}_loss"] for r in subset], [r["real_loss"] for r in subset])

    pooled_proxy = [r["proxy"][s] for r in trained for s in heldout]
    pooled_base = [r["baseline"][s] for r in trained for s in heldout]
    pooled_real = [r["real"][s] for r in trained for s in heldout]
    per_real = compute["real_mixtures"]["seconds"] / max(1, compute["real_mixtures"]["mixtures"])
    per_real_tokens = compute["real_mixtures"]["tokens"] / max(1, compute["real_mixtures"]["mixtures"])
    proxy_seconds = compute["base"]["seconds"] + compute["partition_models"]["seconds"] + compute["proxy_eval"]["seconds"]
    multi = sum(1 for r in rows if r["size"] > 1)
    return {
        "method": "merged-model proxy (uniform parameter average of per-partition models)",
        "partition_by": parts.column,
        "partitions": {n: {"train_rows": len(parts.train_rows[n]), "heldout_rows": len(parts.heldout_rows[n])}
                       for n in parts.names},
        "mixtures": mixtures,
        "real_trained": [r["combination"] for r in trained],
        "trained_rows": [{k: r.get(k) for k in ("combination", "size", "proxy_loss", "baseline_loss", "real_loss",
                                                 "real_seconds", "real_tokens")} for r in trained],
        "tokens_per_model": budget,
        "seed": seed,
        "heldout_loss": "mean over the partitions' held-out sets: " + ", ".join(heldout),
        "spearman": {
            "proxy_vs_real": rho(trained, "proxy"),
            "baseline_vs_real": rho(trained, "baseline"),
            "n": len(trained),
            "proxy_vs_real_with_singletons": rho(known, "proxy"),
            "n_with_singletons": len(known),
            "pooled_per_heldout_set": {"proxy_vs_real": spearman(pooled_proxy, pooled_real),
                                       "baseline_vs_real": spearman(pooled_base, pooled_real),
                                       "n": len(pooled_real)},
        },
        "baseline": "mean of the member partition models' own held-out losses (no merging)",
        "compute": {**compute,
                    "proxy_total": {"seconds": round(proxy_seconds, 3),
                                    "tokens": compute["base"]["tokens"] + compute["partition_models"]["tokens"]},
                    "real_all_estimate": {"seconds": round(per_real * multi, 3), "tokens": round(per_real_tokens * multi),
                                          "mixtures": multi,
                                          "how": "the mean real mixture's cost times the mixtures of 2 or more"}},
        "settings": settings.model_dump(mode="json"),
    }


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def write_results(out: Path, rows: list[dict[str, Any]], sets: Sequence[str]) -> None:
    """results.csv (every loss, per eval set too) and results.md (the mean held-out losses)."""
    head = [*RESULT_COLUMNS, "real_kind", *(f"{k}_{s}" for k in ("proxy", "baseline", "real") for s in sets)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(head)
    for r in rows:
        cells = [r["combination"], r["size"], r.get("proxy_loss"), r.get("baseline_loss"), r.get("real_loss"),
                 r.get("real_kind") or ""]
        cells += [(r[k] or {}).get(s) if r[k] else None for k in ("proxy", "baseline", "real") for s in sets]
        writer.writerow([_fmt(c) for c in cells])
    write_text_atomic(out / "results.csv", buffer.getvalue())
    lines = ["| mixture | size | proxy loss | baseline loss | real loss | real from |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['combination']} | {r['size']} | {_fmt(r.get('proxy_loss'))} | {_fmt(r.get('baseline_loss'))} "
                     f"| {_fmt(r.get('real_loss'))} | {r.get('real_kind') or ''} |")
    write_text_atomic(out / "results.md", "\n".join(lines) + "\n")
