"""The order stage as a user meets it: each curriculum strategy, its manifest, and its shards.

Most tests apply the stage to a small Ray dataset built from the synthetic graded corpus (its
``true_quality`` is the key, with a few nulls added) and check the order against numbers
recomputed here from the input; one end-to-end run goes through the runner and the shard
writer, and reads the shards back with polars, ``datasets`` and Ray.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import ray
import ray.data

from pipeline.core.errors import ConfigError, StageError
from pipeline.core.hashing import hash64
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


def apply(corpus: pa.Table, blocks: int = 3, seed: int = 0, **params: Any) -> tuple[pl.DataFrame, dict[str, Any]]:
    stage = OrderStage(OrderParams(name="order", **params))
    ctx = StageContext(run_dir=Path("."), artifact_dir=Path("."), seed=seed, input_columns=corpus.column_names)
    out = stage.apply(ray.data.from_arrow(corpus).repartition(blocks), ctx)
    table = pa.concat_tables([t for t in ray.get(out.to_arrow_refs()) if t.num_rows])
    frame = pl.from_arrow(table).sort("position")
    assert frame["position"].to_list() == list(range(frame.height))
    assert frame["id"].n_unique() == frame.height
    assert not [c for c in frame.columns if c.startswith("_")]
    return frame, ctx.order or {}


def curriculum_ranks(corpus: pa.Table, key: str = "true_quality", descending: bool = False) -> dict[str, int]:
    """The exact rank of every id along (nulls last, key, id), recomputed here from the input."""
    df = pl.from_arrow(corpus).with_columns(pl.col(key).is_null().alias("null"))
    df = df.with_columns((-pl.col(key) if descending else pl.col(key)).alias("k")).sort(["null", "k", "id"])
    return {i: r for r, i in enumerate(df["id"].to_list())}


# ----------------------------------------------------------------------------- random, sort, quality


def test_random_keeps_its_hash_order_and_sort_its_key_order(ray_address, corpus):
    frame, order = apply(corpus, method="random", seed=5)
    expected = sorted(corpus["id"].to_pylist(), key=lambda i: (int(hash64([i], 5, "order.random")[0]), i))
    assert frame["id"].to_list() == expected
    assert order == {"method": "random", "ties": "id ascending", "nulls": "last", "key": None, "direction": None, "seed": 5}

    frame, order = apply(corpus, method="sort", key="tied", direction="descending")
    values = frame["tied"].to_list()
    assert values[-2:] == [None, None]  # nulls last, whatever the direction
    assert values[:-2] == sorted(values[:-2], reverse=True)
    for value in {0.2, 0.5}:  # ties broken by id
        ids = frame.filter(pl.col("tied") == value)["id"].to_list()
        assert ids == sorted(ids) and len(ids) > 3
    assert order["key"] == "tied" and order["direction"] == "descending"


def test_quality_methods_read_the_key_through_higher_is_better(ray_address, corpus):
    worst_first, order = apply(corpus, method="quality_ascending", key="true_quality")
    q = worst_first["true_quality"].to_list()
    assert q[:-2] == sorted(q[:-2]) and q[-2:] == [None, None]
    assert order["direction"] == "ascending" and order["reads_as"] == "worst first, best last"
    # With "lower is better", worst first means the highest values first: the same as best first
    # on a higher-is-better reading of the same column.
    low_better, order_low = apply(corpus, method="quality_ascending", key="true_quality", higher_is_better=False)
    best_first, order_best = apply(corpus, method="quality_descending", key="true_quality")
    assert low_better["id"].to_list() == best_first["id"].to_list()
    assert low_better["true_quality"][0] == max(v for v in q if v is not None)
    assert order_low["direction"] == order_best["direction"] == "descending"
    assert order_best["reads_as"] == "best first, worst last"


# ----------------------------------------------------------------------------- buckets and folded


def test_buckets_are_exact_quantiles_shuffled_inside(ray_address, corpus):
    frame, order = apply(corpus, method="buckets", key="true_quality", buckets=4)
    buckets = frame["bucket"].to_list()
    assert buckets == sorted(buckets)
    valued = N - len(NULL_IDS)
    sizes = Counter(buckets)
    # N <= sample_size: the quantiles are exact, so every bucket has its exact share.
    assert [sizes[b] for b in range(4)] == [(b + 1) * valued // 4 - b * valued // 4 for b in range(4)]
    assert sizes[4] == len(NULL_IDS) and order["null_bucket"] == 4 and order["exact_quantiles"]
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
        assert nonnull == sorted(nonnull) and q[: len(nonnull)] == nonnull
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
    frame, order = apply(corpus, method="pacing", key="true_quality", total_samples=total, batch_size=batch,
                         pacing=schedule)
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
    assert order["repeats"] == {str(k): v for k, v in sorted(histogram.items()) if v}
    assert order["never_shown"] == N - len(times) and order["steps"] == steps
    assert order["curve"][0]["pool_rows"] == int(0.25 * N) and order["curve"][-1]["pool_rows"] == N


def test_pacing_rejects_a_schedule_that_admits_no_row(ray_address, corpus):
    with pytest.raises(StageError, match="admits no row"):
        apply(corpus, method="pacing", key="true_quality", total_samples=10,
              pacing={"function": "sqrt", "initial_competence": 0.001})


def test_replay_repeats_earlier_phases_by_the_power_law(ray_address, corpus):
    frame, order = apply(corpus, method="replay", key="true_quality", phases=4, replay_fraction=0.3,
                         replay_exponent=1.0)
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
    assert order["realised"] == realised.tolist()
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
    assert sort.direction == "ascending" and sort.higher_is_better is None


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
    order_stage = manifest["stages"][-1]
    assert manifest["counts"]["output_rows"] == 400 and order_stage["added"] == 250
    assert manifest["order"]["method"] == "pacing" and manifest["order"]["key"] == "alpha_ratio"
    assert sum(int(k) * v for k, v in manifest["order"]["repeats"].items()) == 400
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
