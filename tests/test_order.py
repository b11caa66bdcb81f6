"""The order stage as a user meets it: each curriculum strategy, its manifest, and its shards.

Most tests apply the stage to a small Ray dataset built from the synthetic graded corpus (its
``true_quality`` is the key, with a few nulls added) and check the order against numbers
recomputed here from the input; one end-to-end run goes through the runner and the shard
writer, and reads the shards back with polars, ``datasets`` and Ray.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import ray
import ray.data

from pipeline.core.errors import ConfigError, StageError
from pipeline.core.hashing import hash64
from pipeline.engine import runner
from pipeline.engine.config import validate_config
from pipeline.engine.runner import run_pipeline
from pipeline.io.synth import graded_document
from stages.base import StageContext
from stages.order import OrderParams, OrderStage
from stages.order.pacing import PacingSchedule, difficulty

N = 240
NULL_IDS = {"syn-0000003", "syn-0000100"}


@pytest.fixture(scope="module")
def corpus() -> pa.Table:
    rows = [graded_document(i, seed=0) for i in range(N)]
    quality = [None if r["id"] in NULL_IDS else r["true_quality"] for r in rows]
    return pa.table({
        "id": [r["id"] for r in rows],
        "text": [r["text"][:40] for r in rows],
        "topic": [r["topic"] for r in rows],
        "true_quality": pa.array(quality, pa.float64()),
        "tied": pa.array([None if q is None else round(q, 1) for q in quality], pa.float64()),
        "cluster": pa.array([i % 6 if i % 41 else None for i in range(N)], pa.int64()),
    })


def apply_split(corpus: pa.Table, blocks: int = 3, seed: int = 0,
                **params: Any) -> tuple[pl.DataFrame, dict[str, Any], pl.DataFrame]:
    """The stage's ordered rows, its manifest ``order`` section, and the rows it hands the runner
    to drop (``_drop_reason`` set), as the runner would split them."""
    stage = OrderStage(OrderParams(name="order", **params))
    ctx = StageContext(run_dir=Path("."), artifact_dir=Path("."), seed=seed, input_columns=corpus.column_names)
    out = stage.apply(ray.data.from_arrow(corpus).repartition(blocks), ctx)
    table = pa.concat_tables([t for t in ray.get(out.to_arrow_refs()) if t.num_rows])
    frame = pl.from_arrow(table)
    dropped = frame.head(0)
    if "_drop_reason" in frame.columns:
        assert stage.may_drop()
        dropped = frame.filter(pl.col("_drop_reason").is_not_null())
        frame = frame.filter(pl.col("_drop_reason").is_null()).drop("_drop_reason")
    frame = frame.sort("position")
    assert frame["position"].to_list() == list(range(frame.height))
    assert frame["id"].n_unique() == frame.height
    assert not [c for c in frame.columns if c.startswith("_")]
    return frame, ctx.order or {}, dropped


def apply(corpus: pa.Table, blocks: int = 3, seed: int = 0, **params: Any) -> tuple[pl.DataFrame, dict[str, Any]]:
    frame, order, dropped = apply_split(corpus, blocks, seed, **params)
    assert dropped.height == 0 or params.get("method") == "pacing" or params.get("nulls") == "drop"
    return frame, order


def curriculum_ranks(corpus: pa.Table, key: str = "true_quality", descending: bool = False,
                     nulls: str = "worst") -> dict[str, int]:
    """The exact rank of every id along the curriculum order, recomputed here from the input: by
    the key, ties by id; null keys first (``worst`` in a worst-first order) or last (``last``)."""
    df = pl.from_arrow(corpus).with_columns(pl.col(key).is_null().alias("null"))
    if nulls == "worst":
        df = df.with_columns(~pl.col("null"))
    df = df.with_columns((-pl.col(key) if descending else pl.col(key)).alias("k")).sort(["null", "k", "id"])
    return {i: r for r, i in enumerate(df["id"].to_list())}


# ----------------------------------------------------------------------------- random, sort, quality


def test_random_keeps_its_hash_order_and_sort_its_key_order(ray_address, corpus):
    frame, order = apply(corpus, method="random", seed=5)
    expected = sorted(corpus["id"].to_pylist(), key=lambda i: (int(hash64([i], 5, "order.random")[0]), i))
    assert frame["id"].to_list() == expected
    assert order == {"method": "random", "ties": "id ascending", "nulls": "worst", "key": None, "direction": None, "seed": 5}

    frame, order = apply(corpus, method="sort", key="tied", direction="descending")
    values = frame["tied"].to_list()
    assert values[-2:] == [None, None]  # nulls: worst reads a null as the lowest value: last when descending
    assert values[:-2] == sorted(values[:-2], reverse=True)
    for value in {0.2, 0.5}:  # ties broken by id
        ids = frame.filter(pl.col("tied") == value)["id"].to_list()
        assert ids == sorted(ids) and len(ids) > 3
    assert order["key"] == "tied" and order["direction"] == "descending"


def test_sort_orders_a_decimal_key_by_value_not_as_text(ray_address):
    from decimal import Decimal

    values = ["10", "9.5", "2", "100.25", None, "-3"]
    table = pa.table({"id": [f"d{i}" for i in range(len(values))], "text": ["t"] * len(values),
                      "price": pa.array([None if v is None else Decimal(v) for v in values], pa.decimal128(6, 2))})
    frame, _ = apply(table, blocks=2, method="sort", key="price")
    assert [None if v is None else float(v) for v in frame["price"].to_list()] == [None, -3.0, 2.0, 9.5, 10.0, 100.25]
    frame, _ = apply(table, blocks=2, method="quality_ascending", key="price")
    assert [None if v is None else float(v) for v in frame["price"].to_list()] == [None, -3.0, 2.0, 9.5, 10.0, 100.25]


def test_quality_methods_read_the_key_through_higher_is_better(ray_address, corpus):
    worst_first, order = apply(corpus, method="quality_ascending", key="true_quality")
    q = worst_first["true_quality"].to_list()
    assert q[2:] == sorted(q[2:]) and q[:2] == [None, None]  # a null key is the worst: first here
    assert order["direction"] == "ascending" and order["reads_as"] == "worst first, best last"
    # With "lower is better", worst first means the highest values first: the same as best first
    # on a higher-is-better reading of the same column, except that the null keys, the worst rows,
    # open the first order and close the second.
    low_better, order_low = apply(corpus, method="quality_ascending", key="true_quality", higher_is_better=False)
    best_first, order_best = apply(corpus, method="quality_descending", key="true_quality")
    assert low_better["id"].to_list()[2:] == best_first["id"].to_list()[:-2]
    assert set(low_better["id"].to_list()[:2]) == set(best_first["id"].to_list()[-2:]) == NULL_IDS
    assert low_better["true_quality"][2] == max(v for v in q if v is not None)
    assert order_low["direction"] == order_best["direction"] == "descending"
    assert order_best["reads_as"] == "best first, worst last"


# ----------------------------------------------------------------------------- buckets and folded


def test_buckets_are_exact_quantiles_shuffled_inside(ray_address, corpus):
    frame, order = apply(corpus, method="buckets", key="true_quality", buckets=4, nulls="last")
    buckets = frame["bucket"].to_list()
    assert buckets == sorted(buckets)
    valued = N - len(NULL_IDS)
    sizes = Counter(buckets)
    # N <= sample_size: the quantiles are exact, so every bucket has its exact share.
    assert [sizes[b] for b in range(4)] == [(b + 1) * valued // 4 - b * valued // 4 for b in range(4)]
    assert sizes[4] == len(NULL_IDS) and order["null_bucket"] == 4 and order["exact_quantiles"]
    assert order["null_tail"] == {"rows": 2, "first_position": valued, "bucket": 4}
    ranges = frame.filter(pl.col("bucket") < 4).group_by("bucket").agg(pl.min("true_quality").alias("lo"),
                                                                          pl.max("true_quality").alias("hi")).sort("bucket")
    assert all(hi < lo for hi, lo in zip(ranges["hi"].to_list()[:-1], ranges["lo"].to_list()[1:]))
    # Inside a bucket the order is a shuffle, not a sort: the rank correlation with position is weak.
    for b in range(4):
        inside = frame.filter(pl.col("bucket") == b)
        rho = np.corrcoef(np.argsort(np.argsort(inside["true_quality"].to_numpy())), np.arange(inside.height))[0, 1]
        assert abs(rho) < 0.5, (b, rho)
    assert order["bucket_rows"] == {str(b): sizes[b] for b in range(5)}
    assert len(order["boundaries"]) == 3 and order["boundaries"] == sorted(order["boundaries"])


def test_buckets_split_ties_evenly_and_follow_quality_order(ray_address, corpus):
    # 'tied' has 11 distinct values: plain quantile cuts would leave buckets lopsided or empty.
    frame, order = apply(corpus, method="buckets", key="tied", buckets=8, quality_order="descending")
    sizes = Counter(frame["bucket"].to_list())
    assert max(sizes[b] for b in range(8)) - min(sizes[b] for b in range(8)) <= 1
    means = frame.filter(pl.col("bucket") < 8).group_by("bucket").agg(pl.mean("tied")).sort("bucket")["tied"].to_list()
    assert means == sorted(means, reverse=True)  # best first
    assert order["direction"] == "descending"


def test_folded_stages_each_span_the_full_range_and_are_sorted(ray_address, corpus):
    k = 3
    frame, order = apply(corpus, method="folded", key="true_quality", folds=k)
    ranks = curriculum_ranks(corpus)
    frame = frame.with_columns(pl.col("id").replace_strict(ranks).alias("rank"))
    assert frame["phase"].to_list() == sorted(frame["phase"].to_list())
    full = (N // k) * k
    for phase in range(k):
        part = frame.filter(pl.col("phase") == phase)
        assert part["rank"].to_list() == sorted(part["rank"].to_list())
        assert part["rank"].min() < k and part["rank"].filter(part["rank"] < full).max() >= full - k
        # one row of every run of k consecutive ranks
        assert sorted((part["rank"].filter(part["rank"] < full) // k).to_list()) == list(range(N // k))
    assert sorted(int(v) for v in order["phase_rows"].values()) == [N // k] * k


# ----------------------------------------------------------------------------- interleaving


def test_domain_interleave_sorts_inside_domains_and_keeps_the_mix(ray_address, corpus):
    frame, order = apply(corpus, method="domain_interleave", key="true_quality", group="topic")
    sizes = Counter(corpus["topic"].to_pylist())
    assert order["group"] == "topic" and order["groups"] == len(sizes) and order["group_rows"] == dict(sizes)
    for topic in sizes:
        q = frame.filter(pl.col("topic") == topic)["true_quality"].to_list()
        nonnull = [v for v in q if v is not None]
        assert nonnull == sorted(nonnull) and q[len(q) - len(nonnull):] == nonnull  # null keys open the domain
    # By normalised rank, each prefix holds each domain in proportion, within the rounding bound.
    topics = frame["topic"].to_list()
    bound = 1.5 + len(sizes) / 2
    for length in range(1, N + 1):
        seen = Counter(topics[:length])
        worst = max(abs(seen[t] - length * n / N) for t, n in sizes.items())
        assert worst <= bound, (length, worst)


def test_cluster_interleave_is_round_robin_in_quality_order(ray_address, corpus):
    frame, order = apply(corpus, method="cluster_interleave", key="true_quality")
    assert order["group"] == "cluster"
    clusters = frame["cluster"].to_list()
    sizes = Counter(clusters)
    groups = order["groups"]
    assert groups == len(sizes) == 7  # six clusters and the null group
    full_rounds = min(sizes.values())
    for start in range(full_rounds * groups - groups + 1):  # every window of one round sees every cluster
        assert len(set(clusters[start:start + groups])) == groups
    for cluster in sizes:
        q = frame.filter(pl.col("cluster").is_null() if cluster is None else pl.col("cluster") == cluster)["true_quality"]
        nonnull = q.drop_nulls().to_list()
        assert nonnull == sorted(nonnull)


# ----------------------------------------------------------------------------- pacing and replay


def test_pacing_materializes_the_schedule_and_never_draws_above_it(ray_address, corpus):
    schedule = {"function": "fixed_root", "root_degree": 2, "min_difficulty": 0.25}
    total, batch = 2 * N + 5, 16
    frame, order, never = apply_split(corpus, method="pacing", key="true_quality", total_samples=total,
                                      batch_size=batch, pacing=schedule)
    assert frame.height == total
    steps = math.ceil(total / batch)
    assert frame["step"].to_list() == [p // batch for p in range(total)]
    ranks = curriculum_ranks(corpus)
    percentile = np.array([(ranks[s] + 1) / N for s in frame["source_id"].to_list()])
    d = difficulty(PacingSchedule(**schedule), frame["step"].to_numpy(), steps - 1)
    assert (percentile <= d + 1e-12).all()
    assert percentile[frame["step"].to_numpy() >= 0.75 * steps].max() > 0.97  # the pool grows to the whole corpus
    assert percentile[frame["step"].to_numpy() == 0].max() <= 0.25
    # Within a step the batch is drawn without replacement.
    assert frame.group_by("step").agg(pl.col("source_id").n_unique().alias("u"), pl.len().alias("n")).filter(
        pl.col("u") != pl.col("n")).height == 0
    # Repeats: plain id first, then '<id>#r<k>' in training order, and the manifest counts them.
    times = Counter(frame["source_id"].to_list())
    for source, count in list(times.items())[:20]:
        ids = frame.filter(pl.col("source_id") == source)["id"].to_list()
        assert ids == [source] + [f"{source}#r{k}" for k in range(1, count)]
    histogram = Counter(times.values())
    histogram[0] = N - len(times)
    assert order["times_shown"] == {str(k): v for k, v in sorted(histogram.items()) if v}
    assert order["rows_shown"] == len(times) and order["rows_never_shown"] == N - len(times)
    assert order["repeat_rows"] == total - len(times) and order["sequence_rows"] == total and order["steps"] == steps
    # The rows never drawn go to the runner, marked, so that it stores them under dropped/.
    assert set(never["_drop_reason"].to_list()) <= {"order.never_shown"} and never.height == N - len(times)
    assert set(never["id"].to_list()) == set(corpus["id"].to_pylist()) - set(times)
    assert order["curve"][0]["pool_rows"] == int(0.25 * N) and order["curve"][-1]["pool_rows"] == N


def test_pacing_rejects_a_schedule_that_admits_no_row(ray_address, corpus):
    with pytest.raises(StageError, match="admits no row"):
        apply(corpus, method="pacing", key="true_quality", total_samples=10,
              pacing={"function": "sqrt", "initial_competence": 0.001})


def test_replay_repeats_earlier_phases_by_the_power_law(ray_address, corpus):
    frame, order = apply(corpus, method="replay", key="true_quality", phases=4, replay_fraction=0.3,
                         replay_exponent=1.0, replay_clock="introduced")
    ranks = curriculum_ranks(corpus)
    firsts = frame.filter(pl.col("repeat") == 0)
    assert sorted(firsts["id"].to_list()) == sorted(corpus["id"].to_pylist())  # every row exactly once as itself
    home = {i: ranks[i] * 4 // N for i in ranks}
    assert all(home[i] == p for i, p in zip(firsts["id"].to_list(), firsts["phase"].to_list()))
    copies = frame.filter(pl.col("repeat") > 0)
    from_phase = [home[s] for s in copies["source_id"].to_list()]
    assert all(f < p for f, p in zip(from_phase, copies["phase"].to_list()))
    assert frame["phase"].to_list() == sorted(frame["phase"].to_list())
    realised = np.zeros((4, 4), dtype=int)
    for p, f in zip(frame["phase"].to_list(), [home[s] for s in frame["source_id"].to_list()]):
        realised[p, f] += 1
    assert order["realised"] == realised.tolist() and order["replay_clock"] == "introduced"
    expected = np.array(order["expected"])
    # Phase 3 replays phase 2 (age 1) twice as much as phase 0 (age 3): (1 + 1)^-1 / (3 + 1)^-1.
    assert expected[3, 2] / expected[3, 0] == pytest.approx(2.0, rel=1e-3)
    assert expected[3].sum() == pytest.approx(60 * 0.3 / 0.7, rel=1e-3)  # a share 0.3 of phase 3 is replay
    assert np.triu(expected).sum() == 0
    assert abs((frame.height - N) - expected.sum()) < 4 * math.sqrt(expected.sum())
    # Inside a phase the phase's own rows keep the quality order.
    for p in range(4):
        own = frame.filter((pl.col("phase") == p) & (pl.col("repeat") == 0))["true_quality"].drop_nulls().to_list()
        assert own == sorted(own)


def test_replay_counts_age_from_the_last_showing_by_default(ray_address, corpus):
    frame, order = apply(corpus, method="replay", key="true_quality", phases=4, replay_fraction=0.3, replay_exponent=2.0)
    assert order["replay_clock"] == "last_seen"
    ranks = curriculum_ranks(corpus)
    home = {i: ranks[i] * 4 // N for i in ranks}
    realised = np.zeros((4, 4), dtype=int)
    for p, s in zip(frame["phase"].to_list(), frame["source_id"].to_list()):
        realised[p, home[s]] += 1
    assert order["realised"] == realised.tolist()
    expected = np.array(order["expected"])
    assert np.triu(expected).sum() == 0
    for j in range(1, 4):  # a share 0.3 of every later phase is replay, whichever clock
        assert expected[j].sum() == pytest.approx(60 * 0.3 / 0.7, rel=1e-3)
    # Many of phase 0's rows were replayed in phases 1 and 2, so by phase 3 they were seen recently:
    # phase 0 returns more than its introduction alone would give it, and phase 2 less.
    introduced = np.array(apply(corpus, method="replay", key="true_quality", phases=4, replay_fraction=0.3,
                                replay_exponent=2.0, replay_clock="introduced")[1]["expected"])
    assert expected[3, 0] > introduced[3, 0] and expected[3, 2] < introduced[3, 2]


# ----------------------------------------------------------------------------- null keys


def test_null_keys_are_the_worst_rows_by_default(ray_address, corpus):
    """``nulls: worst`` reads a null or NaN key as the lowest quality: the row goes wherever the
    strategy puts the worst rows, not into the best rows' slot at the end of a worst-first order."""
    quality = [float("nan") if i == "syn-0000100" else q for i, q in
               zip(corpus["id"].to_pylist(), corpus["true_quality"].to_pylist())]
    data = corpus.set_column(corpus.column_names.index("true_quality"), "true_quality", pa.array(quality, pa.float64()))
    nulls = sorted(NULL_IDS)
    ascending, order = apply(data, method="quality_ascending", key="true_quality")
    assert ascending["id"].to_list()[:2] == nulls and order["nulls"] == "worst"
    descending, _ = apply(data, method="quality_descending", key="true_quality")
    assert descending["id"].to_list()[-2:] == nulls
    low_first, _ = apply(data, method="sort", key="true_quality")  # sort: the lowest value
    assert low_first["id"].to_list()[:2] == nulls
    for quality_order, bucket in (("ascending", 0), ("descending", 3)):
        frame, order = apply(data, method="buckets", key="true_quality", buckets=4, quality_order=quality_order)
        assert frame.filter(pl.col("id").is_in(nulls))["bucket"].to_list() == [bucket, bucket]
        assert sorted(Counter(frame["bucket"].to_list()).values()) == [N // 4] * 4 and "null_bucket" not in order
    folded, _ = apply(data, method="folded", key="true_quality", folds=3)
    firsts = folded.group_by("phase").agg(pl.col("id").sort_by("position").first())["id"].to_list()
    assert set(nulls) <= set(firsts)  # ranks 0 and 1: each opens its phase
    for quality_order, phase in (("ascending", 0), ("descending", 3)):
        frame, _ = apply(data, method="replay", key="true_quality", phases=4, quality_order=quality_order)
        assert frame.filter(pl.col("id").is_in(nulls))["phase"].to_list() == [phase, phase]


def test_null_keys_last_follow_every_row_with_a_value(ray_address, corpus):
    nulls = sorted(NULL_IDS)
    frame, order = apply(corpus, method="quality_ascending", key="true_quality", nulls="last")
    assert frame["id"].to_list()[-2:] == nulls and order["nulls"] == "last"
    frame, order = apply(corpus, method="folded", key="true_quality", folds=3, nulls="last")
    assert frame["id"].to_list()[-2:] == nulls and frame["phase"].to_list()[-2:] == [3, 3]
    assert order["null_tail"] == {"rows": 2, "first_position": N - 2, "phase": 3}
    frame, order = apply(corpus, method="pacing", key="true_quality", nulls="last", total_samples=100, batch_size=8)
    assert frame["id"].to_list()[-2:] == nulls and frame["step"].to_list()[-2:] == [13, 13]
    assert frame.height == 102 and order["null_tail"] == {"rows": 2, "first_position": 100, "first_step": 13}
    assert frame.filter(pl.col("source_id").is_in(nulls)).height == 2  # shown once each, in the tail only
    frame, order = apply(corpus, method="replay", key="true_quality", nulls="last")
    assert frame["id"].to_list()[-2:] == nulls and frame["phase"].to_list()[-2:] == [4, 4]
    assert frame.filter(pl.col("source_id").is_in(nulls)).height == 2


def test_null_keys_dropped_go_to_the_runner_with_their_reason(ray_address, corpus):
    for params in ({"method": "domain_interleave", "key": "true_quality", "group": "topic"},
                   {"method": "random", "key": "true_quality"}, {"method": "sort", "key": "tied"}):
        frame, order, dropped = apply_split(corpus, nulls="drop", **params)
        assert frame.height == N - 2 and set(frame["id"].to_list()).isdisjoint(NULL_IDS)
        assert sorted(dropped["id"].to_list()) == sorted(NULL_IDS) and order["nulls"] == "drop"
        assert dropped["_drop_reason"].to_list() == ["order.null_key"] * 2 and dropped["position"].null_count() == 2


# ----------------------------------------------------------------------------- config validation


@pytest.mark.parametrize("entry, message", [
    ({"method": "shuffle"}, "stages[0].method: Input should be 'random', 'sort'"),
    ({"method": "sort"}, "method 'sort' needs key"),
    ({"method": "pacing"}, "total_samples: method 'pacing' needs total_samples"),
    ({"method": "sort", "key": "q", "buckets": 4},
     "buckets: not a parameter of method 'sort'; method 'sort' takes: key, direction"),
    ({"method": "quality_ascending", "direction": "descending"}, "higher_is_better and quality_order, not direction"),
    ({"method": "buckets", "buckets": 0}, "stages[0].buckets: Input should be greater than or equal to 1"),
    ({"method": "pacing", "total_samples": 9, "pacing": {"function": "cosine"}},
     "stages[0].pacing.function: Input should be 'fixed_linear'"),
    ({"method": "pacing", "total_samples": 9, "pacing": {"function": "sqrt", "root_degree": 2}},
     "root_degree: not a parameter of pacing function 'sqrt' (its parameters: initial_competence, total_curriculum_step"),
    ({"method": "pacing", "total_samples": 9, "pacing": {"function": "fixed_discrete", "difficulty": [0.2, 1.0]}},
     "max_step: needs len(difficulty) - 1 = 1 entries"),
    ({"method": "pacing", "total_samples": 9, "pacing": {"function": "fixed_linear", "min_difficulty": 5}},
     "stages[0].pacing.min_difficulty: Input should be less than or equal to 1"),
    ({"method": "replay", "replay_fraction": 1.0}, "stages[0].replay_fraction: Input should be less than 1"),
    ({"method": "random", "key": "quality"}, "key: not a parameter of method 'random'"),
    ({"method": "random", "nulls": "drop"}, "key: method 'random' with nulls: drop needs key"),
    ({"method": "sort", "key": "q", "nulls": "first"}, "stages[0].nulls: Input should be 'worst', 'last' or 'drop'"),
    ({"method": "sort", "key": "q", "replay_clock": "introduced"}, "replay_clock: not a parameter of method 'sort'"),
    ({"method": "replay", "replay_clock": "first_seen"},
     "stages[0].replay_clock: Input should be 'last_seen' or 'introduced'"),
])
def test_config_errors_name_the_key_and_the_allowed_values(entry, message):
    with pytest.raises(ConfigError) as info:
        validate_config({"stages": [{"name": "order", **entry}]})
    assert message in str(info.value), str(info.value)


def test_defaults_are_filled_per_method_and_shown_in_the_resolved_config():
    config = validate_config({"stages": [{"name": "order", "method": "pacing", "total_samples": 100}]})
    stage = config.resolved()["stages"][0]
    assert stage["key"] == "quality" and stage["higher_is_better"] is True and stage["quality_order"] == "ascending"
    assert stage["batch_size"] == 16 and stage["pacing"]["function"] == "fixed_linear"
    assert stage["pacing"]["min_difficulty"] == 0.01 and stage["buckets"] is None and stage["direction"] is None
    # A resolved config validates again unchanged (the manifest's config can be rerun).
    assert validate_config(config.resolved()).resolved() == config.resolved()
    sort = validate_config({"stages": [{"name": "order", "method": "sort", "key": "n_words"}]}).stages[0]
    assert sort.direction == "ascending" and sort.higher_is_better is None and sort.nulls == "worst"
    replay = validate_config({"stages": [{"name": "order", "method": "replay"}]}).stages[0]
    assert replay.replay_clock == "last_seen" and replay.nulls == "worst"
    random = validate_config({"stages": [{"name": "order", "nulls": "drop", "key": "q"}]}).stages[0]
    assert random.method == "random" and random.key == "q" and OrderStage(random).requires() == ["q"]


# ----------------------------------------------------------------------------- end to end


def test_pacing_run_shards_survive_datasets_and_ray_round_trips(ray_address, tmp_path):
    import datasets

    config = validate_config({
        "run": {"seed": 3},
        "input": {"format": "synthetic", "synthetic": {"docs": 150}},
        "stages": [{"name": "quality"},
                   {"name": "order", "method": "pacing", "key": "alpha_ratio", "total_samples": 400, "batch_size": 8,
                    "pacing": {"function": "sqrt", "initial_competence": 0.1}}],
        "output": {"rows_per_shard": 64},
    })
    out = tmp_path / "run"
    manifest = run_pipeline(config, out, log=lambda _m: None)
    order_stage, order = manifest["stages"][-1], manifest["order"]
    assert manifest["counts"]["output_rows"] == 400 and order_stage["added"] - order_stage["dropped"] == 250
    assert order_stage["added_by"] == {"order.repeat": order["repeat_rows"]} == {"order.repeat": 400 - order["rows_shown"]}
    assert order_stage.get("dropped_by", {}) == ({"order.never_shown": order["rows_never_shown"]}
                                                 if order["rows_never_shown"] else {})
    assert order["method"] == "pacing" and order["key"] == "alpha_ratio"
    assert sum(int(k) * v for k, v in order["times_shown"].items()) == 400
    files = sorted(str(p) for p in (out / "shards").glob("part-*.parquet"))
    assert len(files) == 7
    reference = pl.read_parquet(files)
    assert reference["position"].to_list() == list(range(400))
    assert reference["id"].n_unique() == 400 and set(reference["repeat"].to_list()) >= {0, 1}

    hf = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert hf["position"] == list(range(400)) and hf["id"] == reference["id"].to_list()
    rows = ray.data.read_parquet(str(out / "shards")).sort("position").select_columns(["id", "position", "step"]).take_all()
    assert [r["id"] for r in rows] == reference["id"].to_list()
    assert [r["step"] for r in rows] == [p // 8 for p in range(400)]


def test_counts_balance_and_never_shown_rows_are_findable(ray_address, tmp_path):
    """input_rows = quarantined + Σ dropped + output_rows − Σ added, with the null-key rows and the
    rows pacing never draws stored under the order stage's dropped/ folder with their reason."""
    rows = [{"id": f"doc-{i:03d}", "text": f"document number {i} " * 3,
             "q": None if i % 9 == 0 else (i * 37 % 101) / 100} for i in range(120)]
    rows.append({"id": "empty", "text": "  ", "q": 0.5})  # quarantined at read time
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = validate_config({
        "run": {"seed": 1},
        "input": {"format": "jsonl", "path": str(path), "id_field": "id"},
        "stages": [{"name": "order", "method": "pacing", "key": "q", "nulls": "drop", "total_samples": 150,
                    "batch_size": 5, "pacing": {"function": "fixed_linear", "min_difficulty": 0.2}}],
    })
    out = tmp_path / "run"
    manifest = run_pipeline(config, out, log=lambda _m: None)
    counts, stages, order = manifest["counts"], manifest["stages"], manifest["order"]
    assert counts == {"input_rows": 121, "quarantined": 1, "output_rows": 150}
    assert counts["input_rows"] == (counts["quarantined"] + sum(s["dropped"] for s in stages) + counts["output_rows"]
                                    - sum(s["added"] for s in stages))
    null_ids = {r["id"] for r in rows[:120] if r["q"] is None}
    stage = stages[-1]
    assert order["rows_never_shown"] > 0 and order["rows_shown"] + order["rows_never_shown"] == 120 - len(null_ids)
    assert order["rows_shown"] + order["repeat_rows"] == order["sequence_rows"] == 150
    assert stage["dropped_by"] == {"order.never_shown": order["rows_never_shown"], "order.null_key": len(null_ids)}
    assert stage["added_by"] == {"order.repeat": order["repeat_rows"]}

    folder = out / "stages" / f"01-order-{stage['key'][:16]}"
    dropped = pl.read_parquet(str(folder / "dropped" / "*.parquet"))
    shards = pl.read_parquet(str(out / "shards" / "*.parquet"))
    never = dropped.filter(pl.col("_drop_reason") == "order.never_shown")
    valued = {r["id"] for r in rows[:120]} - null_ids
    assert set(never["id"].to_list()) == valued - set(shards["source_id"].to_list())
    assert set(dropped.filter(pl.col("_drop_reason") == "order.null_key")["id"].to_list()) == null_ids
    assert dropped.height == stage["dropped"] and dropped["position"].null_count() == dropped.height


class _LosesARow(OrderStage):
    """Test-only: the order stage, except that it silently loses the row at position 0."""

    def apply(self, ds: ray.data.Dataset, ctx: StageContext) -> ray.data.Dataset:
        out = super().apply(ds, ctx)
        return out.map_batches(lambda t: t.filter(pc.not_equal(t["position"], 0)), batch_format="pyarrow")


def test_a_stage_that_loses_a_row_fails_the_run_naming_it(ray_address, tmp_path, monkeypatch):
    real = runner.build_stage
    monkeypatch.setattr(runner, "build_stage", lambda params: _LosesARow(params) if params.name == "order" else real(params))
    config = validate_config({"input": {"format": "synthetic", "synthetic": {"docs": 40}},
                              "stages": [{"name": "quality"}, {"name": "order", "method": "quality_ascending",
                                                               "key": "alpha_ratio"}]})
    with pytest.raises(StageError, match=r"stage 'order' \(stages\[1\]\): 40 rows in and 39 out.*-1 rows unaccounted"):
        run_pipeline(config, tmp_path / "run", log=lambda _m: None)


def test_a_sort_combines_small_blocks_and_keeps_the_order(ray_address) -> None:
    from pipeline.core.sorting import MIN_PIECE_BYTES, distributed_sort, sort_blocks

    # Every one of the blocks² shuffle pieces should hold >= 1 MiB (Ray inlines < 100 KB into the driver).
    assert sort_blocks(250 * 2**20, 200) == 15 and sort_blocks(10 * 2**30, 64) == 64 and sort_blocks(1000, 30) == 1
    assert MIN_PIECE_BYTES == 2**20
    ds = ray.data.from_items([{"id": f"{i:04d}", "key": (i * 7919) % 1000} for i in range(1000)],
                             override_num_blocks=40)
    out = distributed_sort(ds, ["key", "id"]).materialize()
    assert out.num_blocks() == 1  # 40 tiny blocks combined: a few KB in all
    rows = [(r["key"], r["id"]) for r in out.take_all()]
    assert rows == sorted(rows) and len(rows) == 1000
