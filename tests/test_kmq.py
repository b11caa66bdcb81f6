"""The kmq stage: Gumbel-top-k draws, exact budgets, clusters, temperature, and a run through the runner.

The corpus is the synthetic graded one: ``cluster`` is the topic's index (until the cluster stage
provides it) and the key is ``true_quality`` plus seeded noise, so the selection can be checked
against the truth. Stage results are read back from a real Ray dataset.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
import ray.data
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.errors import ConfigError
from pipeline.core.hashing import uniform
from pipeline.engine.config import validate_config
from pipeline.engine.report import inspect_run
from pipeline.engine.runner import run_pipeline
from pipeline.io.synth import TOPICS, graded_document
from stages.base import StageContext
from stages.kmq import UNSELECTED, KMQParams, KMQStage, allocate, budget_rows, gumbel, minimums

N = 600
TOPIC_NAMES = sorted(TOPICS)


@pytest.fixture(scope="module")
def corpus() -> pa.Table:
    rows = [graded_document(i, seed=0) for i in range(N)]
    truth = np.array([r["true_quality"] for r in rows])
    noisy = truth + np.random.default_rng(7).normal(0, 0.1, N)
    return pa.table({
        "id": [r["id"] for r in rows],
        "text": [r["text"][:60] for r in rows],
        "cluster": pa.array([TOPIC_NAMES.index(r["topic"]) for r in rows], pa.int32()),
        "true_quality": truth,
        "quality": noisy,
    })


def run_stage(table: pa.Table, blocks: int = 4, seed: int = 0, cpus: float | None = None,
              **params: Any) -> tuple[pa.Table, dict[str, Any]]:
    """(the selected rows, the stage's info): the stage on a ``blocks``-block Ray dataset, at most
    ``cpus`` CPUs for Ray Data, split as the runner splits it."""
    stage = KMQStage(KMQParams(name="kmq", **params))
    ds = ray.data.from_arrow(table).repartition(blocks).materialize()
    assert ds.num_blocks() == blocks
    ctx = StageContext(run_dir=Path("."), artifact_dir=Path("."), seed=seed, input_columns=table.column_names)
    options = ray.data.DataContext.get_current().execution_options
    previous = options.resource_limits
    if cpus is not None:
        options.resource_limits = ray.data.ExecutionResources(cpu=cpus)
    try:
        out = pa.concat_tables([t for t in ray.get(stage.apply(ds, ctx).to_arrow_refs()) if t.num_rows])
    finally:
        options.resource_limits = previous
    assert out.num_rows == table.num_rows
    reasons = set(out["_drop_reason"].drop_null().to_pylist())
    assert reasons <= {UNSELECTED}
    selected = out.filter(pc.is_null(out["_drop_reason"])).drop_columns(["_drop_reason"])
    assert selected.column_names == table.column_names
    return selected, ctx.info


# --------------------------------------------------------------------------- pure parts


def _sequential_inclusion(weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact P(first draw = i) and P(i among k draws) for k draws without replacement ∝ weights."""
    n = len(weights)
    first = weights / weights.sum()
    inclusion = np.zeros(n)
    for seq in itertools.permutations(range(n), k):
        p, left = 1.0, weights.sum()
        for i in seq:
            p *= weights[i] / left
            left -= weights[i]
        inclusion[list(seq)] += p
    return first, inclusion


def test_gumbel_top_k_draws_like_sequential_softmax_sampling():
    """Top-k of key / T + Gumbel(seed, id), over many seeds: the frequencies of the sequential
    softmax draw without replacement (first pick and inclusion in k = 2), within 4 sigma."""
    ids = [f"doc-{i}" for i in range(5)]
    key = np.array([0.9, 0.5, 0.4, 0.1, -0.3])
    temperature, k, draws = 0.5, 2, 4000
    first_count, included = np.zeros(5), np.zeros(5)
    for seed in range(draws):
        z = key / temperature + gumbel(ids, seed)
        order = np.argsort(-z)
        first_count[order[0]] += 1
        included[order[:k]] += 1
    first, inclusion = _sequential_inclusion(np.exp(key / temperature), k)
    for observed, p in ((first_count / draws, first), (included / draws, inclusion)):
        sigma = np.sqrt(p * (1 - p) / draws)
        assert np.all(np.abs(observed - p) < 4 * sigma + 1e-9), (observed, p)
    assert inclusion.sum() == pytest.approx(k)


@settings(max_examples=300, deadline=None)
@given(sizes=st.lists(st.integers(0, 60), min_size=1, max_size=25),
       weights=st.lists(st.floats(0, 10, allow_nan=False), min_size=25, max_size=25),
       share=st.floats(0, 1), minimum=st.integers(0, 3))
def test_budgets_add_up_exactly(sizes: list[int], weights: list[float], share: float, minimum: int):
    sizes_a = np.array(sizes)
    w = np.array(weights[: len(sizes)])
    total = int(round(share * sizes_a.sum()))
    lower = minimums(sizes_a, total, minimum)
    alloc = allocate(total, sizes_a, w, lower=lower)
    assert alloc.sum() == total
    assert np.all(alloc <= sizes_a) and np.all(alloc >= lower) and np.all(alloc >= 0)
    if lower.any():  # the minimum is applied only when the budget covers it, and then fully
        assert np.all(alloc >= np.minimum(minimum, sizes_a))
    mass = sizes_a * w
    if not lower.any() and mass.sum() > 0:
        quota = total * mass / mass.sum()
        if np.all(quota <= sizes_a):  # no cluster is full: Hamilton's quota rule, floor or ceiling of the share
            assert np.all(np.abs(alloc - quota) < 1 + 1e-9), (alloc, quota)
        # a full cluster gives all its rows; the others get at least their floor
        assert np.all((alloc == sizes_a) | (alloc >= np.floor(np.minimum(quota, sizes_a)) - 1e-9))


def test_budget_values_and_errors():
    assert budget_rows(0.2, 600) == 120 and budget_rows(1.0, 600) == 600 and budget_rows(37, 600) == 37
    assert budget_rows(0.0001, 600) == 1  # a fraction never selects nothing
    with pytest.raises(ConfigError, match="budget: 601 rows asked, but only 600 rows"):
        budget_rows(601, 600)
    for bad in (0, -3, 1.5, True, "ten"):
        with pytest.raises(ValueError, match="budget"):
            KMQParams(name="kmq", budget=bad)
    with pytest.raises(ValueError, match="temperature"):
        KMQParams(name="kmq", budget=10, temperature=0)
    with pytest.raises(ValueError, match="weights"):
        KMQParams(name="kmq", budget=10, weights={"a": -1})
    assert KMQParams(name="kmq", budget=10, weights={3: 2}).weights == {"3": 2.0}  # YAML int labels


# --------------------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def twenty(corpus: pa.Table, ray_address: str) -> tuple[pa.Table, dict[str, Any]]:
    """20% of the corpus by kMQ on the noisy key, T = 0.1, on 8 blocks with both CPUs."""
    return run_stage(corpus, blocks=8, budget=0.2, key="quality", temperature=0.1)


def test_same_selection_whatever_the_block_layout_and_cpus(corpus: pa.Table, twenty):
    selected, info = twenty
    one_cpu, info_one = run_stage(corpus, blocks=1, cpus=1, budget=0.2, key="quality", temperature=0.1)
    assert sorted(one_cpu["id"].to_pylist()) == sorted(selected["id"].to_pylist())
    assert info_one["per_cluster"] == info["per_cluster"]


def test_topic_shares_and_quality_at_a_20_percent_budget(corpus: pa.Table, twenty):
    selected, info = twenty
    assert selected.num_rows == info["selected"] == info["budget_rows"] == 120
    sizes = np.bincount(corpus["cluster"].to_numpy(), minlength=10)
    chosen = np.bincount(selected["cluster"].to_numpy(), minlength=10)
    share = chosen / (0.2 * sizes)
    assert np.all((share > 0.7) & (share < 1.3)), share  # every topic within ±30% of its proportional share
    assert [c["selected"] for c in info["per_cluster"]] == chosen.tolist()
    assert [c["size"] for c in info["per_cluster"]] == sizes.tolist()
    # a seeded random 20% of the same rows (the 120 smallest id hashes)
    u = uniform(corpus["id"].to_pylist(), 0, "test.random")
    random_mean = float(np.mean(corpus["true_quality"].to_numpy()[np.argsort(u)[:120]]))
    kmq_mean = float(np.mean(selected["true_quality"].to_numpy()))
    assert kmq_mean > random_mean + 0.15, (kmq_mean, random_mean)
    assert info["mean_key_selected"] > info["mean_key"] + 0.15


def test_temperature_from_top_k_to_uniform(corpus: pa.Table):
    budgets = None
    key = corpus["quality"].to_numpy()
    clusters = corpus["cluster"].to_numpy()
    ids = np.array(corpus["id"].to_pylist())
    cold, info = run_stage(corpus, budget=0.2, key="quality", temperature=1e-4)
    budgets = [c["budget"] for c in info["per_cluster"]]
    top = {i for j in range(10) for i in ids[clusters == j][np.argsort(-key[clusters == j])[:budgets[j]]]}
    assert set(cold["id"].to_pylist()) == top  # T -> 0: the best rows of each cluster

    hot, info = run_stage(corpus, budget=0.2, key="quality", temperature=1e6)
    assert [c["budget"] for c in info["per_cluster"]] == budgets
    g = gumbel(ids.tolist(), 0)
    noise_only = {i for j in range(10) for i in ids[clusters == j][np.argsort(-g[clusters == j])[:budgets[j]]]}
    overlap = len(noise_only & set(hot["id"].to_pylist())) / len(noise_only)
    assert overlap > 0.97  # T -> inf: the key no longer matters, only the seeded noise
    sigma = key.std() / np.sqrt(120) * np.sqrt(1 - 0.2)
    assert abs(float(np.mean(hot["quality"].to_numpy())) - key.mean()) < 3 * sigma


@pytest.fixture(scope="module")
def lumpy(ray_address: str) -> pa.Table:
    """Clusters of 40, 15, 3 and 2 rows (labels a … d, and 4 rows without one); 5 null keys in b."""
    labels = ["a"] * 40 + ["b"] * 15 + ["c"] * 3 + ["d"] * 2 + [None] * 4
    key = np.linspace(0, 1, len(labels))
    nulls = {41, 43, 45, 47, 49}
    return pa.table({
        "id": [f"row-{i:03d}" for i in range(len(labels))],
        "text": ["x"] * len(labels),
        "cluster": pa.array(labels, pa.string()),
        "score": pa.array([None if i in nulls else float(v) for i, v in enumerate(key)], pa.float64()),
    })


def _by_cluster(selected: pa.Table) -> dict[Any, int]:
    labels, counts = np.unique(np.array(selected["cluster"].to_pylist(), dtype=object).astype(str), return_counts=True)
    return dict(zip(labels.tolist(), counts.tolist()))


def test_every_cluster_is_represented_when_the_budget_allows(lumpy: pa.Table):
    selected, info = run_stage(lumpy, budget=5, key="score")  # 5 clusters with the null label
    assert _by_cluster(selected) == {"a": 1, "b": 1, "c": 1, "d": 1, "None": 1} and info["minimum_applied"]
    # proportional only (min_per_cluster 0): 5 * (40, 15, 3, 2, 4) / 64 -> the small clusters get nothing
    selected, info = run_stage(lumpy, budget=5, key="score", min_per_cluster=0)
    assert _by_cluster(selected) == {"a": 3, "b": 1, "None": 1} and not info["minimum_applied"]
    selected, info = run_stage(lumpy, budget=4, key="score")  # fewer rows than clusters: no minimum
    assert sum(_by_cluster(selected).values()) == 4 and not info["minimum_applied"]


def test_a_cluster_smaller_than_its_share_gives_all_its_rows_and_null_keys_come_last(lumpy: pa.Table):
    selected, info = run_stage(lumpy, budget=30, key="score", weights={"c": 100})
    counts = _by_cluster(selected)
    assert counts["c"] == 3  # its weighted share (30 * 300 / 361) is far above its 3 rows
    # the other 27 rows, ∝ size, by largest remainder, at least one each
    rest = allocate(27, np.array([40, 15, 2, 4]), lower=np.ones(4, dtype=np.int64))
    assert [counts.get(k, 0) for k in ("a", "b", "d", "None")] == rest.tolist()
    assert sum(counts.values()) == 30 == info["selected"]
    assert {c["cluster"]: c["weight"] for c in info["per_cluster"]}["c"] == 100

    selected, info = run_stage(lumpy, budget=0.75, key="score", temperature=1e-3)
    b = selected.filter(pc.equal(selected["cluster"], "b"))
    budget_b = {c["cluster"]: c["budget"] for c in info["per_cluster"]}["b"]
    assert budget_b == 11 and b.num_rows == 11  # 10 rows with a key, then one of the 5 null keys
    assert b["score"].null_count == 1 and info["null_key_rows"] == 5


# --------------------------------------------------------------------------- through the runner and the CLI


def _config(tmp_path: Path, corpus: pa.Table, **kmq: Any) -> dict[str, Any]:
    path = tmp_path / "corpus.parquet"
    if not path.exists():
        pq.write_table(corpus, path)
    return {
        "run": {"name": "kmq", "seed": 0},
        "input": {"format": "parquet", "path": str(path), "id_field": "id"},
        "stages": [{"name": "kmq", "budget": 0.2, "key": "quality", "temperature": 0.1, **kmq},
                   {"name": "order", "method": "cluster_interleave", "key": "quality"}],
        "output": {"rows_per_shard": 50},
    }


def test_runner_keeps_the_unselected_rows_and_inspect_shows_the_clusters(corpus: pa.Table, twenty, tmp_path: Path,
                                                                         ray_address: str):
    out = tmp_path / "run"
    manifest = run_pipeline(validate_config(_config(tmp_path, corpus)), out, address=ray_address, log=lambda m: None)
    kmq = next(s for s in manifest["stages"] if s["name"] == "kmq")
    assert kmq["dropped_by"] == {UNSELECTED: N - 120} and manifest["counts"]["output_rows"] == 120
    shards = pa.concat_tables([pq.read_table(out / s["path"]) for s in manifest["shards"]])
    assert sorted(shards["id"].to_pylist()) == sorted(twenty[0]["id"].to_pylist())  # the runner, like the stage
    dropped = pq.read_table(next(out.glob("stages/01-kmq-*")) / "dropped")
    assert dropped.num_rows == N - 120 and set(dropped["_drop_reason"].to_pylist()) == {UNSELECTED}
    assert "quality" in dropped.column_names  # every score stays with the dropped row
    assert kmq["info"]["per_cluster"] == twenty[1]["per_cluster"]

    summary, report = inspect_run(out)
    assert "kmq stage: 120 of 600 rows selected (budget 0.2) from 10 clusters" in summary
    first = twenty[1]["per_cluster"][0]
    assert any(line.split()[:4] == ["0", str(first["size"]), str(first["budget"]), str(first["selected"])]
               for line in summary.splitlines())
    page = report.read_text()
    assert "share of selection" in page and "kmq_clusters_0.png" in page

    too_many = _config(tmp_path, corpus, budget=N + 1)
    with pytest.raises(ConfigError, match=f"budget: {N + 1} rows asked, but only {N} rows"):
        run_pipeline(validate_config(too_many), out, address=ray_address, log=lambda m: None)
    assert json.loads((out / "manifest.json").read_text())["run_id"] == manifest["run_id"]  # left as it was


def test_cli_a_missing_key_column_names_the_column_before_any_stage_runs(cli, corpus: pa.Table, tmp_path: Path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_config(tmp_path, corpus, key="no_such_score")))
    result = cli("run", str(config), "--out", str(tmp_path / "out"))
    # the runner's requires() check: a config error (exit 2), the column named, no traceback
    assert result.returncode == 2, result.stderr[-2000:]
    assert "stages[0] kmq: needs column(s) ['no_such_score']" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "out").glob("stages/01-kmq-*"))
