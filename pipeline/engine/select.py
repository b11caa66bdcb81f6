"""Iterative kMQ (``curriculum select``): select in rounds, train a proxy, re-weight the clusters.

Yu et al., *Diversify and Conquer: Diversity-Centric Data Selection with Iterative Refinement*
(2024). The config's ``select:`` section runs as one step of the pipeline, after every stage but
the order stage (so after the clustering) and before it. Over N ``rounds`` it selects the budget
b in parts of b/N rows (largest remainder over the rounds):

1. round r draws its part from the rows not selected yet, by kMQ (``stages.kmq``): cluster
   budgets ∝ size_j · w_j, rows drawn ∝ softmax(key / T) inside each cluster; round 1 has
   uniform weights (static kMQ proportions);
2. after every round but the last, a proxy model (``proxy:``, a ``train:`` config for the
   project's own trainer) is trained on every row selected so far, and each of those rows is
   scored, by default by S = −log(PPL_proxy / PPL_reference) (the reference is the ``ppl``
   column of the perplexity stage, or a model the config names), or by a column;
3. each cluster's score s_j is the mean S of its selected rows, and the weights move:
   ``proportional`` w_j ← s_j / Σ s · w_j (scores shifted to positive when one is ≤ 0: the
   lowest becomes the mean absolute score), or ``softmax`` w_j ← w_j · exp(s_j / τ) / Σ …;
   weights are then rescaled to mean 1 (only their ratios matter).

Within a cluster the Gumbel keys of a row do not change between rounds, so round r's draw from
the rows left is exactly the continuation of one sequential softmax draw: the rows selected by
round r are the best-keyed prefix of their cluster, and a round's state is its per-cluster
budgets. Each round's state (weights, budgets, scores, a count and order-free hash of the new
ids, the proxy's summary) is written atomically to ``round-R/state.json`` in the step's artifact
folder; a rerun skips finished rounds, and the trainer resumes an interrupted proxy from its
checkpoints. The manifest's ``select`` section holds every round.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from pydantic import Field, field_validator, model_validator

from pipeline.core.errors import ConfigError, FieldError
from pipeline.core.files import read_json_or_none, write_json_atomic
from pipeline.core.hashing import hash64
from pipeline.core.positions import assign_positions
from pipeline.core.settings import RayConfig, RunConfig, StrictModel
from pipeline.io.writer import write_shards
from pipeline.models.causal_lm_scorer import PerplexityScorer
from pipeline.models.pool import Resources, cluster_size, map_with_actor_pool, place
from pipeline.train.config import TrainConfig
from stages.base import Stage, StageContext
from stages.kmq import (
    MAX_CLUSTER_DETAIL,
    UNSELECTED,
    allocate,
    budget_rows,
    check_budget,
    check_columns,
    cluster_index,
    cluster_stats,
    collect_summaries,
    count_clusters,
    cut_rows,
    label_text,
    mean_or_none,
    minimums,
    narrow_input,
    rank_in_clusters,
    round_of,
)

Log = Callable[[str], None]
STATE = "state.json"
ROUND_COLUMN = "kmq_round"
_REF, _COL, _G = "_select_ref", "_select_col", "_select_g"
# The proxy's defaults where the proxy: section leaves them out: no averaged model (a proxy only
# scores), a checkpoint every quarter of the run (to resume a killed round), a short run.
PROXY_DEFAULTS: dict[str, Any] = {"averaging": {"method": "none", "last_k": 1, "window": 0.25}, "max_tokens": 250_000}


class ScorerConfig(StrictModel):
    """How a selected row is scored after a round (``select.scorer``)."""

    kind: Literal["ppl_ratio", "column"] = Field(
        "ppl_ratio", description="ppl_ratio: S = -log(PPL_proxy / PPL_reference); column: S = a column of the data.")
    reference_column: str | None = Field(None, description="ppl_ratio: the reference perplexity column "
                                         "(default 'ppl', from the perplexity stage).")
    reference_model: str | None = Field(None, description="ppl_ratio: a reference LM (hub name or local folder) "
                                        "that scores the rows instead of a column.")
    column: str | None = Field(None, description="column: the score column.")
    higher_is_better: bool = Field(True, description="column: whether a higher value is a better score.")
    max_length: int = Field(256, ge=2, description="ppl_ratio: tokens per scoring window.")
    docs_per_call: int = Field(512, ge=1, description="ppl_ratio: rows per scoring actor call.")
    device: str = Field("auto", description="ppl_ratio: auto | cpu | cuda | cuda:N for the scoring actors.")
    threads: int | None = Field(None, ge=1, description="ppl_ratio: torch threads per CPU actor (default 1).")
    concurrency: int | None = Field(None, ge=1, description="ppl_ratio: scoring actors (default: fill the cluster).")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        """``scorer: ppl_ratio`` or ``scorer: <column>`` for the defaults of either kind."""
        if isinstance(data, str):
            return {"kind": "ppl_ratio"} if data == "ppl_ratio" else {"kind": "column", "column": data}
        return data

    @model_validator(mode="after")
    def _kind_keys(self) -> "ScorerConfig":
        if self.kind == "column":
            if not self.column:
                raise FieldError("column", "kind 'column' needs column: the score column")
            for key in ("reference_column", "reference_model"):
                if getattr(self, key) is not None:
                    raise FieldError(key, "only kind 'ppl_ratio' compares with a reference")
            return self
        if self.column is not None:
            raise FieldError("column", "kind 'ppl_ratio' scores with the proxy model; column is for kind 'column'")
        if self.reference_column and self.reference_model:
            raise FieldError("reference_model", "give reference_column or reference_model, not both")
        if not self.reference_model and not self.reference_column:
            self.reference_column = "ppl"
        return self


class SelectConfig(StrictModel):
    """The ``select:`` section: iterative kMQ for ``curriculum select`` (docs/methods.md §9)."""

    rounds: int = Field(3, ge=1, le=100, description="N: the budget is selected in N parts.")
    budget: int | float = Field(..., description="Rows to select in all: a count (>= 1) or a fraction (0 < f <= 1).")
    key: str = Field("quality", min_length=1, description="The quality column kMQ draws by inside a cluster.")
    higher_is_better: bool = True
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of the draw inside a cluster.")
    cluster: str = Field("cluster", min_length=1, description="The cluster column.")
    min_per_cluster: int = Field(1, ge=0, description="Round 1 gives every cluster at least this many rows "
                                 "(or all it has) when its part of the budget allows.")
    seed: int | None = Field(None, ge=0, description="Seed of the Gumbel keys and the proxy's data order; "
                             "defaults to run.seed.")
    scorer: ScorerConfig = Field(default_factory=ScorerConfig)
    update: Literal["proportional", "softmax"] = Field(
        "proportional", description="proportional: w_j <- s_j / sum(s) * w_j; softmax: w_j <- w_j exp(s_j / tau) / Z.")
    update_temperature: float | None = Field(None, gt=0, description="softmax: tau (default 1).")
    proxy: TrainConfig = Field(default_factory=lambda: TrainConfig.model_validate(PROXY_DEFAULTS),
                               description="The proxy model's training: a train: section (model, seq_len, "
                               "max_tokens, ...); by default no averaging, a checkpoint every quarter of the run, and "
                               "max_tokens 250000.")
    rows_per_shard: int = Field(10_000, ge=1, description="Shard size of each round's proxy training data.")

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, value: Any) -> int | float:
        return check_budget(value)

    @field_validator("proxy", mode="before")
    @classmethod
    def _proxy_defaults(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {**PROXY_DEFAULTS, **value}
        return value

    @model_validator(mode="after")
    def _update_keys(self) -> "SelectConfig":
        if self.update_temperature is not None and self.update != "softmax":
            raise FieldError("update_temperature", "only update: softmax has a temperature")
        return self


@dataclass
class _ProxyJob:
    """What the trainer reads of a config (``pipeline.train.trainer.JobConfig``)."""

    run: RunConfig
    ray: RayConfig
    train: dict[str, Any]


# --------------------------------------------------------------------------- the weight update


def update_weights(weights: np.ndarray, scores: np.ndarray, method: str, temperature: float = 1.0) -> tuple[
        np.ndarray, dict[str, Any]]:
    """New cluster weights (mean 1) from the clusters' mean scores; NaN = a cluster with no score.

    A cluster without a score takes the mean score of the others (no evidence either way).
    ``proportional``: w_j ∝ s_j · w_j; when the lowest score is ≤ 0 the scores are first shifted
    so that the lowest becomes the mean absolute score (the best cluster then gains at most
    1 + range / mean|s| over the worst in one round; all equal = no change). ``softmax``:
    w_j ∝ w_j · exp(s_j / temperature).
    """
    s = np.asarray(scores, dtype=np.float64).copy()
    w = np.asarray(weights, dtype=np.float64)
    known = ~np.isnan(s)
    note: dict[str, Any] = {"filled": int((~known).sum())}
    if not known.any():
        return w.copy(), {**note, "unchanged": "no cluster has a score"}
    s[~known] = s[known].mean()
    if method == "softmax":
        z = s / temperature
        new = w * np.exp(z - z.max())
    else:
        if s.min() <= 0:
            shift = float(np.abs(s).mean())
            if shift == 0:
                return w.copy(), {**note, "unchanged": "every score is 0"}
            note["shift"] = round(shift - float(s.min()), 6)
            s = s - s.min() + shift
        new = w * s / s.sum()
    if not np.isfinite(new).all() or new.sum() <= 0:
        return w.copy(), {**note, "unchanged": "the update gave no usable weights"}
    return new * len(new) / new.sum(), note


# --------------------------------------------------------------------------- per-block helpers


def _chosen(table: pa.Table, key: str, cluster: str, labels: list[Any], higher_is_better: bool, temperature: float,
            seed: int, cuts: dict[str, Any], extra: dict[str, str]) -> pa.Table:
    """The rows selected so far, narrowed to id, text, cluster index and the score inputs."""
    keep = round_of(table, key, cluster, labels, higher_is_better, temperature, seed, cuts) > 0
    rows = table.filter(pa.array(keep))
    out = pa.table({"id": rows["id"], "text": rows["text"],
                    _G: pa.array(cluster_index(rows, cluster, labels), pa.int32())})
    for name, column in extra.items():
        out = out.append_column(name, pc.cast(rows[column], pa.float64()))
    return out


def _proxy_order(table: pa.Table, seed: int) -> pa.Table:
    keys = hash64(table["id"].to_pylist(), seed, "select.proxy_order")
    return table.select(["id", "text"]).append_column("_proxy_key", pa.array(keys, pa.int64()))


def _block_scores(table: pa.Table, kind: str, sign: float) -> pa.Table:
    if kind == "column":
        s = sign * table[_COL].to_numpy(zero_copy_only=False)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.log(table[_REF].to_numpy(zero_copy_only=False)) - np.log(table["ppl"].to_numpy(zero_copy_only=False))
    ok = np.isfinite(s)
    frame = pa.table({"g": table[_G], "s": pa.array(np.where(ok, s, 0.0)), "ok": pa.array(ok.astype(np.int64))})
    out = frame.group_by(["g"], use_threads=False).aggregate([("s", "sum"), ("ok", "sum"), ([], "count_all")])
    return pa.table({"g": out["g"], "s_sum": out["s_sum"], "scored": out["ok_sum"], "rows": out["count_all"]})


def _rename_ppl(table: pa.Table) -> pa.Table:
    """After the reference model scored: its ppl becomes the reference column; the rest goes."""
    keep = ["id", "text", _G]
    return table.select(keep).append_column(_REF, table["ppl"])


def _ids_digest(table: pa.Table, starts: np.ndarray, low: np.ndarray, high: np.ndarray) -> pa.Table:
    """Count and wrapped sum of id hashes of the rows ranked in [low_j, high_j) of their cluster."""
    g = table["_kmq_g"].to_numpy()
    inside = table["position"].to_numpy() - starts[g]
    pick = (inside >= low[g]) & (inside < high[g])
    ids = [i for i, p in zip(table["id"].to_pylist(), pick) if p]
    total = int(sum(int(h) for h in hash64(ids, 0, "select.ids"))) if ids else 0
    return pa.table({"rows": [len(ids)], "hash_lo": [total & 0xFFFFFFFF], "hash_hi": [(total >> 32) & 0xFFFFFFFF]})


def _with_round(table: pa.Table, key: str, cluster: str, labels: list[Any], higher_is_better: bool, temperature: float,
                seed: int, cuts: dict[str, Any]) -> pa.Table:
    rounds = round_of(table, key, cluster, labels, higher_is_better, temperature, seed, cuts)
    selected = rounds > 0
    for column in (ROUND_COLUMN, "_drop_reason"):
        if column in table.column_names:
            table = table.drop_columns([column])
    table = table.append_column(ROUND_COLUMN, pa.array(rounds, pa.int32(), mask=~selected))
    return table.append_column("_drop_reason", pa.array(np.where(selected, None, UNSELECTED), pa.string()))


def _durations(started: float, marks: dict[str, float]) -> dict[str, float]:
    """Seconds of each step of a round, from the time each one ended."""
    out, last = {}, started
    for name, at in sorted(marks.items(), key=lambda item: item[1]):
        out[name] = round(at - last, 3)
        last = at
    return out


def ids_digest(ranked: ray.data.Dataset, starts: np.ndarray, low: np.ndarray, high: np.ndarray) -> dict[str, Any]:
    """{rows, hash}: the rows ranked in [low_j, high_j) of each cluster j, and a hash of their id
    set (the sum of 64-bit id hashes, mod 2^64): the same set gives the same hash in any order."""
    parts = collect_summaries(ranked.select_columns(["id", "_kmq_g", "position"]).map_batches(
        _ids_digest, batch_format="pyarrow", batch_size=None, fn_kwargs={"starts": starts, "low": low, "high": high}))
    rows = int(sum(parts["rows"].to_pylist())) if parts.num_rows else 0
    total = sum(lo + (hi << 32) for lo, hi in zip(parts["hash_lo"].to_pylist(), parts["hash_hi"].to_pylist())) \
        if parts.num_rows else 0
    return {"rows": rows, "hash": f"{total % 2**64:016x}"}


# --------------------------------------------------------------------------- the step


class SelectStep(Stage):
    """The ``select:`` section as a pipeline step (not a configurable stage: it trains models,
    so it lives in the engine, above both the stages and the trainer)."""

    name: ClassVar[str] = "select"
    Params = SelectConfig  # type: ignore[assignment]
    columns: ClassVar[tuple[str, ...]] = (ROUND_COLUMN,)
    version: ClassVar[int] = 1

    def __init__(self, params: SelectConfig, run: RunConfig, ray_config: RayConfig, log: Log) -> None:
        super().__init__(params)  # type: ignore[arg-type]
        self.run = run
        self.ray_config = ray_config
        self.log = log

    def requires(self) -> list[str]:
        p: SelectConfig = self.params  # type: ignore[assignment]
        extra = [p.scorer.reference_column] if p.scorer.kind == "ppl_ratio" and p.scorer.reference_column else []
        extra += [p.scorer.column] if p.scorer.kind == "column" and p.scorer.column else []
        return list(dict.fromkeys([p.key, p.cluster, *extra]))

    def may_drop(self) -> bool:
        return True

    def apply(self, ds: ray.data.Dataset, ctx: StageContext) -> ray.data.Dataset:
        p: SelectConfig = self.params  # type: ignore[assignment]
        seed = ctx.seed if p.seed is None else p.seed
        check_columns(ds, ctx.input_columns, p.key, p.cluster, "select")
        ds = ds.materialize()  # read once: every round draws its rows (with their text) from it
        narrow = narrow_input(ds, p.key, p.cluster)
        labels, sizes = count_clusters(narrow, p.cluster)
        names = [label_text(v) for v in labels]
        total = budget_rows(p.budget, int(sizes.sum()), key="select.budget")
        if total < p.rounds:
            raise ConfigError(f"select.rounds: {p.rounds} rounds for a budget of {total} rows would leave a round "
                              "with nothing to select; use fewer rounds or a larger budget")
        parts = [total * r // p.rounds - total * (r - 1) // p.rounds for r in range(1, p.rounds + 1)]
        ranked = rank_in_clusters(narrow, p.key, p.cluster, labels, p.higher_is_better, p.temperature, seed)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        k = len(labels)
        weights, taken = np.ones(k), np.zeros(k, dtype=np.int64)
        records: list[dict[str, Any]] = []
        for r in range(1, p.rounds + 1):
            folder = ctx.artifact_dir / f"round-{r}"
            saved = read_json_or_none(folder / STATE)
            if isinstance(saved, dict) and saved.get("round") == r and len(saved.get("budgets", [])) == k:
                self.log(f"[select] round {r}/{p.rounds}: done earlier ({saved['selected']} rows selected)")
                record = saved
            else:
                t0 = time.time()
                record = self._round(r, parts[r - 1], weights, taken, sizes, ds, ranked, starts, labels, seed, ctx,
                                     folder)
                record["seconds"] = round(time.time() - t0, 3)
                folder.mkdir(parents=True, exist_ok=True)
                write_json_atomic(folder / STATE, record, indent=2)
                self.log(f"[select] round {r}/{p.rounds} saved: {record['rows']} new rows, {record['selected']} "
                         f"selected, in {record['seconds']:.1f}s")
            records.append(record)
            taken = taken + np.asarray(record["budgets"], dtype=np.int64)
            if record.get("weights_after") is not None:
                weights = np.asarray(record["weights_after"], dtype=np.float64)
        cumulative = np.cumsum([rec["budgets"] for rec in records], axis=0).astype(np.int64)
        cuts = cut_rows(ranked, starts, cumulative)
        stats = cluster_stats(ranked, starts, cumulative)
        ctx.info.update(self._info(p, seed, names, sizes, total, records, stats))
        return ds.map_batches(_with_round, batch_format="pyarrow", fn_kwargs={
            "key": p.key, "cluster": p.cluster, "labels": labels, "higher_is_better": p.higher_is_better,
            "temperature": p.temperature, "seed": seed, "cuts": cuts})

    # ------------------------------------------------------------------ one round

    def _round(self, r: int, rows: int, weights: np.ndarray, taken: np.ndarray, sizes: np.ndarray,
               ds: ray.data.Dataset, ranked: ray.data.Dataset, starts: np.ndarray, labels: list[Any], seed: int,
               ctx: StageContext, folder: Path) -> dict[str, Any]:
        p: SelectConfig = self.params  # type: ignore[assignment]
        lower = minimums(sizes, rows, p.min_per_cluster, taken)
        budgets = allocate(rows, sizes, weights, lower=lower, upper=sizes - taken)
        after = taken + budgets
        started = time.time()
        record: dict[str, Any] = {
            "round": r, "rows": int(rows), "selected": int(after.sum()),
            "weights": [round(float(w), 6) for w in weights], "budgets": [int(b) for b in budgets],
            "ids": ids_digest(ranked, starts, taken, after),
        }
        if r == p.rounds:  # the last round's weights would never be used: no proxy
            return record
        cuts = cut_rows(ranked, starts, after[None, :])
        extra = {_COL: p.scorer.column} if p.scorer.kind == "column" else (
            {_REF: p.scorer.reference_column} if p.scorer.reference_column else {})
        chosen = ds.map_batches(_chosen, batch_format="pyarrow", fn_kwargs={
            "key": p.key, "cluster": p.cluster, "labels": labels, "higher_is_better": p.higher_is_better,
            "temperature": p.temperature, "seed": seed, "cuts": cuts, "extra": extra}).materialize()
        timings = {"select": time.time()}
        if p.scorer.kind == "column":
            scored, proxy = chosen, None
        else:
            self.log(f"[select] round {r}/{p.rounds}: {rows} new rows, {int(after.sum())} selected; training the proxy")
            model, proxy = self._train_proxy(chosen, folder, seed, ctx, timings)
            timings["train"] = time.time()
            scored = self._perplexities(chosen, model)
        sums = np.zeros(len(labels))
        counts = np.zeros(len(labels), dtype=np.int64)
        total_rows = 0
        sign = 1.0 if p.scorer.higher_is_better else -1.0
        parts = collect_summaries(scored.map_batches(_block_scores, batch_format="pyarrow", batch_size=None,
                                            fn_kwargs={"kind": p.scorer.kind, "sign": sign}))
        for g, s_sum, n, all_rows in zip(*(parts[c].to_pylist() for c in ("g", "s_sum", "scored", "rows"))
                                         ) if parts.num_rows else []:
            sums[g] += s_sum
            counts[g] += n
            total_rows += all_rows
        timings["score"] = time.time()
        with np.errstate(invalid="ignore", divide="ignore"):
            scores = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        new, note = update_weights(weights, scores, p.update, p.update_temperature or 1.0)
        record.update({
            "scores": [None if np.isnan(s) else round(float(s), 6) for s in scores],
            "scored_rows": int(counts.sum()), "unscored_rows": int(total_rows - counts.sum()),
            "mean_score": mean_or_none(float(sums.sum()), float(counts.sum())),
            "update": {"method": p.update, **note}, "weights_after": [round(float(w), 6) for w in new],
            "proxy": proxy,
            "seconds_by_step": _durations(started, timings),
        })
        return record

    def _train_proxy(self, chosen: ray.data.Dataset, folder: Path, seed: int, ctx: StageContext,
                     timings: dict[str, float]) -> tuple[str, dict[str, Any]]:
        """Write the rows selected so far as a run folder (seeded order) and train the proxy on it;
        an interrupted training resumes from its checkpoints, a finished one is reused."""
        p: SelectConfig = self.params  # type: ignore[assignment]
        data_dir, out_dir = folder / "data", folder / "proxy"
        if not (data_dir / "manifest.json").is_file():
            data_dir.mkdir(parents=True, exist_ok=True)
            keyed = chosen.map_batches(_proxy_order, batch_format="pyarrow", fn_kwargs={"seed": seed})
            ordered = assign_positions(keyed.sort(["_proxy_key", "id"])).drop_columns(["_proxy_key"])
            shards = write_shards(ordered, data_dir, p.rows_per_shard, "zstd")
            artifacts = {name: str((ctx.run_dir / path).resolve()) for name, path in ctx.upstream_artifacts.items()}
            write_json_atomic(data_dir / "manifest.json", {
                "run_id": f"select-{folder.name}", "shards": shards, "artifacts": artifacts,
                "counts": {"output_rows": sum(s["rows"] for s in shards)}}, indent=2)
        timings["proxy_data"] = time.time()
        summary_file = out_dir / "summary.json"
        if summary_file.is_file() and (out_dir / "final").is_dir():
            summary = json.loads(summary_file.read_text())
        else:
            from pipeline.train.trainer import run_training  # torch: only where a proxy trains

            job = _ProxyJob(run=RunConfig(name=f"select-{folder.name}", seed=seed), ray=self.ray_config,
                            train=p.proxy.model_dump(mode="json"))
            summary = run_training(job, data_dir, out_dir, log=self.log)
        proxy = {k: summary.get(k) for k in ("steps", "tokens", "epochs", "train_loss", "final", "tokenizer")}
        return str(out_dir / "final"), proxy

    def _perplexities(self, chosen: ray.data.Dataset, model: str) -> ray.data.Dataset:
        """``chosen`` with the proxy's ``ppl`` (and the reference's, when a model is the reference)."""
        p: SelectConfig = self.params  # type: ignore[assignment]
        s = p.scorer
        placement = place(Resources(device=s.device, threads=s.threads, concurrency=s.concurrency), *cluster_size())

        def score(data: ray.data.Dataset, name: str) -> ray.data.Dataset:
            return map_with_actor_pool(data, PerplexityScorer, placement, s.docs_per_call, {
                "model": name, "max_length": s.max_length, "token_budget": max(4096, s.max_length),
                "dtype": "auto", "trust_remote_code": False})

        if s.reference_model:
            chosen = score(chosen, s.reference_model).map_batches(_rename_ppl, batch_format="pyarrow")
        return score(chosen, model).materialize()

    # ------------------------------------------------------------------ the manifest section

    @staticmethod
    def _info(p: SelectConfig, seed: int, names: list[str], sizes: np.ndarray, total: int,
              records: list[dict[str, Any]], stats: np.ndarray) -> dict[str, Any]:
        rounds = len(records)
        selected = stats[:, :rounds, :].sum(axis=1)
        everything = stats.sum(axis=1)
        info: dict[str, Any] = {
            "method": "iterative kMQ (Yu et al. 2024): per round, kMQ on the rows left with the current cluster "
                      "weights; a proxy trained on the selection so far scores it; cluster weights follow the "
                      "mean score",
            "rounds": rounds, "budget": p.budget, "budget_rows": total, "rows": int(sizes.sum()),
            "selected": int(selected[:, 0].sum()), "clusters": len(names), "key": p.key,
            "higher_is_better": p.higher_is_better, "temperature": p.temperature, "cluster": p.cluster, "seed": seed,
            "min_per_cluster": p.min_per_cluster, "update": p.update,
            "update_temperature": p.update_temperature, "scorer": p.scorer.model_dump(mode="json"),
            "proxy": {"model": p.proxy.model.model_dump(mode="json", exclude_none=True), "seq_len": p.proxy.seq_len,
                      "max_tokens": p.proxy.max_tokens, "batch_size": p.proxy.batch_size},
            "round_column": ROUND_COLUMN,
            "mean_key": mean_or_none(everything[:, 1].sum(), everything[:, 2].sum()),
            "mean_key_selected": mean_or_none(selected[:, 1].sum(), selected[:, 2].sum()),
        }
        detail = len(names) <= MAX_CLUSTER_DETAIL
        if detail:
            info["labels"] = names
            info["per_cluster"] = [
                {"cluster": n, "size": int(s), "budget": int(sum(rec["budgets"][j] for rec in records)),
                 "selected": int(sel[0]), "mean_key": mean_or_none(a[1], a[2]),
                 "mean_key_selected": mean_or_none(sel[1], sel[2])}
                for j, (n, s, sel, a) in enumerate(zip(names, sizes, selected, everything))]
        else:
            info["per_cluster_omitted"] = f"{len(names)} clusters (more than {MAX_CLUSTER_DETAIL})"
        info["round_detail"] = [
            {k: v for k, v in rec.items() if detail or k not in ("weights", "budgets", "scores", "weights_after")}
            for rec in records]
        return info


def rounds_table(info: dict[str, Any]) -> list[str]:
    """Text lines: one per round (rows, selected, the id hash, mean score, weight range)."""
    lines = []
    for rec in info.get("round_detail", []):
        weights = rec.get("weights") or []
        spread = f"{min(weights):.3f} … {max(weights):.3f}" if weights else "-"
        score = rec.get("mean_score")
        lines.append(f"round {rec['round']}: {rec['rows']} new rows, {rec['selected']} selected, ids "
                     f"{rec['ids']['hash']}, weights {spread}"
                     + (f", mean score {score:+.4f}" if isinstance(score, (int, float)) and math.isfinite(score) else ""))
    return lines
