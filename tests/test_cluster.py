"""k-means clustering (the cluster stage, pipeline/models/kmeans.py) and semantic deduplication (the semdedup
stage) on real all-MiniLM-L6-v2 vectors of the synthetic graded corpus, through a real local Ray
cluster and real parquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
import ray.data
from sklearn.metrics import normalized_mutual_info_score

from pipeline.core.errors import ConfigError
from pipeline.engine.config import validate_config
from pipeline.engine.runner import pipeline_data_context
from pipeline.io.synth import graded_document
from pipeline.models.encoder import SentenceEncoder
from pipeline.models.kmeans import assign, fit_kmeans, normalize_rows
from pipeline.models.vectors import arrow_to_vectors, vectors_to_arrow
from stages.base import StageContext
from stages.cluster import CENTROIDS_FILE, ClusterParams, ClusterStage
from stages.semdedup import REASON, SemDedupParams, SemDedupStage, _dedup_group, greedy_near_duplicates

DOCS = 200  # 10 topics; full 256-token windows (at 64 tokens MiniLM reaches only NMI ~0.8 on this corpus)


@pytest.fixture(scope="module", autouse=True)
def data_context():
    """The runner's Ray Data settings (the sort-based shuffle for groupby) for the whole module: a
    dataset keeps the context it was created in, so the test's datasets must be made inside it."""
    with pipeline_data_context():
        yield


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder()


@pytest.fixture(scope="module")
def corpus(encoder: SentenceEncoder) -> pa.Table:
    docs = [graded_document(i) for i in range(DOCS)]
    vectors, _, reasons = encoder.embed([d["text"] for d in docs])
    assert reasons == [None] * DOCS
    return pa.table({"id": [d["id"] for d in docs], "topic": [d["topic"] for d in docs],
                     "quality": [d["true_quality"] for d in docs],
                     "embedding": vectors_to_arrow(vectors, np.ones(DOCS, dtype=bool))})


@pytest.fixture(scope="module")
def corpus_path(corpus: pa.Table, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "vectors.parquet"
    pq.write_table(corpus, path, row_group_size=50)
    return path


@pytest.fixture(scope="module")
def clustered(ray_address: str, corpus_path: Path, tmp_path_factory) -> tuple[pa.Table, StageContext]:
    """The corpus read from parquet and clustered with k = 10 (the ten topics), default params."""
    return _cluster({"k": 10}, ray.data.read_parquet(str(corpus_path)), tmp_path_factory.mktemp("clustered"))


def _run(stage, ds: ray.data.Dataset, tmp_path: Path, seed: int = 0) -> tuple[pa.Table, StageContext]:
    ctx = StageContext(run_dir=tmp_path, artifact_dir=tmp_path / "artifacts", seed=seed, input_columns=ds.schema().names)
    out = stage.apply(ds, ctx)
    table = pa.concat_tables(ray.get(out.to_arrow_refs()))
    return table.sort_by("id"), ctx


def _cluster(params: dict, ds: ray.data.Dataset, tmp_path: Path, seed: int = 0) -> tuple[pa.Table, StageContext]:
    return _run(ClusterStage(ClusterParams(**params)), ds, tmp_path, seed)


# --------------------------------------------------------------------------- cluster


def test_kmeans_with_ten_clusters_recovers_the_ten_topics(clustered: tuple[pa.Table, StageContext]) -> None:
    table, ctx = clustered
    nmi = normalized_mutual_info_score(table["topic"].to_pylist(), table["cluster"].to_pylist())
    assert nmi >= 0.8, nmi  # measured 0.992 (seed 0)
    assert table.schema.field("cluster").type == pa.int32() and table.schema.field("cluster_dist").type == pa.float32()
    info = ctx.info
    assert info["k"] == 10 and info["k_source"] == "given" and info["fit_rows"] == DOCS and info["backend"] == "sklearn"
    assert sum(info["sizes"]) == DOCS and info["empty_clusters"] == 0 and info["null_vectors"] == 0
    assert ctx.artifacts["cluster_centroids"] == f"artifacts/{CENTROIDS_FILE}"
    centroids = np.load(ctx.run_dir / ctx.artifacts["cluster_centroids"], allow_pickle=False)
    assert centroids.shape == (10, 384) and centroids.dtype == np.float32
    assert np.abs(np.linalg.norm(centroids, axis=1) - 1).max() < 1e-5  # spherical: unit centroids
    x, _ = arrow_to_vectors(table["embedding"])
    labels, dist = assign(x, centroids, "cosine")
    assert np.array_equal(labels, table["cluster"].to_numpy()) and np.array_equal(dist, table["cluster_dist"].to_numpy())
    cosine = (normalize_rows(x) * centroids[labels]).sum(axis=1)
    assert np.allclose(dist, 1 - cosine, atol=1e-6) and (dist >= -1e-6).all() and dist.max() < 1


def test_k_auto_picks_the_best_silhouette_and_records_every_candidate(ray_address: str, corpus_path: Path,
                                                                      tmp_path: Path) -> None:
    _, ctx = _cluster({"k": "auto", "k_candidates": [2, 5, 10, 20]}, ray.data.read_parquet(str(corpus_path)), tmp_path)
    scores = ctx.info["silhouette"]
    assert set(scores) == {"2", "5", "10", "20"} and all(-1 <= s <= 1 for s in scores.values())
    assert ctx.info["k_source"] == "auto" and ctx.info["k"] == int(max(scores, key=scores.get))
    assert ctx.info["silhouette_rows"] == DOCS and len(ctx.info["sizes"]) == ctx.info["k"]


def test_k_larger_than_the_rows_is_a_config_error_naming_k(ray_address: str, corpus: pa.Table, tmp_path: Path) -> None:
    small = ray.data.from_arrow(corpus.slice(0, 6))
    with pytest.raises(ConfigError, match=r"k = 8 is more than the 6 rows with a vector.*stages\.cluster\.k"):
        _cluster({"k": 8}, small, tmp_path)
    with pytest.raises(ConfigError, match=r"k = 8 is more than fit_rows \(5\).*stages\.cluster\.fit_rows"):
        _cluster({"k": 8, "fit_rows": 5}, small, tmp_path)
    with pytest.raises(ConfigError, match=r"stages\[0\]\.k: must be a positive integer or 'auto' \(got 0\)"):
        validate_config({"stages": [{"name": "cluster", "k": 0}]})
    with pytest.raises(ConfigError, match=r"stages\[0\]\.k_candidates"):
        validate_config({"stages": [{"name": "cluster", "k_candidates": [1, 4]}]})


def test_the_fit_uses_at_most_fit_rows_and_every_row_is_assigned(ray_address: str, corpus_path: Path,
                                                                 tmp_path: Path) -> None:
    table, ctx = _cluster({"k": 10, "fit_rows": 60}, ray.data.read_parquet(str(corpus_path)), tmp_path)
    assert ctx.info["fit_rows"] == 60 and ctx.info["fit_rows_limit"] == 60
    assert table.num_rows == DOCS and table["cluster"].null_count == 0 and sum(ctx.info["sizes"]) == DOCS


def test_same_seed_same_clusters_across_runs_block_layouts_and_backends(clustered: tuple[pa.Table, StageContext],
                                                                        corpus: pa.Table, tmp_path: Path) -> None:
    first, ctx = clustered  # read from parquet in row groups of 50
    one_block = ray.data.from_arrow(corpus).repartition(1)
    reversed_many = ray.data.from_arrow(corpus.take(np.arange(DOCS)[::-1])).repartition(7)
    again, _ = _cluster({"k": 10}, one_block, tmp_path / "b")
    shuffled, _ = _cluster({"k": 10, "batch_size": 13}, reversed_many, tmp_path / "c")
    for other in (again, shuffled):
        assert other["cluster"].equals(first["cluster"]) and other["cluster_dist"].equals(first["cluster_dist"])
    pytest.importorskip("faiss")
    faiss_out, faiss_ctx = _cluster({"k": 10, "backend": "faiss"}, one_block, tmp_path / "d")
    # the same k-means++ seeds and the same Lloyd iterations: the same model, whichever backend runs it
    assert np.mean(faiss_out["cluster"].to_numpy() == first["cluster"].to_numpy()) >= 0.99
    assert abs(faiss_ctx.info["objective"] - ctx.info["objective"]) < 1e-4


def test_assignment_does_not_depend_on_the_rows_beside_it(corpus: pa.Table) -> None:
    x, _ = arrow_to_vectors(corpus["embedding"])
    centroids = fit_kmeans(x, 10, seed=0).centroids
    labels, dist = assign(x, centroids, "cosine")
    for part in (slice(0, 1), slice(3, 20), slice(150, 200)):
        sub_labels, sub_dist = assign(x[part], centroids, "cosine")
        assert np.array_equal(sub_labels, labels[part]) and np.array_equal(sub_dist, dist[part])
    e_labels, e_dist = assign(x, centroids, "euclidean")
    assert np.allclose(e_dist, np.linalg.norm(x - centroids[e_labels], axis=1), atol=1e-5)


def test_both_backends_fit_the_same_euclidean_model(corpus: pa.Table) -> None:
    pytest.importorskip("faiss")
    x, _ = arrow_to_vectors(corpus["embedding"])
    fits = {b: fit_kmeans(x, 10, "euclidean", seed=3, backend=b) for b in ("faiss", "sklearn")}
    labels = {b: assign(x, f.centroids, "euclidean")[0] for b, f in fits.items()}
    assert np.mean(labels["faiss"] == labels["sklearn"]) >= 0.99
    assert abs(fits["faiss"].objective - fits["sklearn"].objective) < 1e-4
    with pytest.raises(ValueError, match="unknown k-means backend"):
        fit_kmeans(x, 10, backend="scipy")


def test_rows_without_a_vector_get_no_cluster(ray_address: str, corpus: pa.Table, tmp_path: Path) -> None:
    x, _ = arrow_to_vectors(corpus["embedding"])
    valid = np.ones(DOCS, dtype=bool)
    valid[[3, 50, 51]] = False
    table = corpus.set_column(3, "embedding", vectors_to_arrow(x, valid))
    out, ctx = _cluster({"k": 10, "metric": "euclidean"}, ray.data.from_arrow(table), tmp_path)
    assert out["cluster"].null_count == 3 and out["cluster_dist"].null_count == 3
    assert ctx.info["null_vectors"] == 3 and sum(ctx.info["sizes"]) == DOCS - 3 and ctx.info["fit_rows"] == DOCS - 3


# --------------------------------------------------------------------------- semdedup


def test_greedy_pass_keeps_a_row_unless_a_kept_row_is_too_close() -> None:
    angle = np.deg2rad([0.0, 15.0, 30.0, 90.0])  # a~b and b~c (cos 15 deg = 0.966), a and c apart (0.866)
    x = np.stack([np.cos(angle), np.sin(angle), np.zeros(4)], axis=1).astype(np.float32)
    assert greedy_near_duplicates(x, 0.95).tolist() == [False, True, False, False]  # b goes; c stays (b was dropped)
    assert greedy_near_duplicates(x[[1, 0, 2, 3]], 0.95).tolist() == [False, True, True, False]  # b first: a, c go


def _planted(corpus: pa.Table, encoder: SentenceEncoder) -> tuple[pa.Table, dict[str, str]]:
    """60 distinct documents plus planted copies: exact copies with a higher quality, a near copy
    (a few words changed) with a lower quality, and two equal-quality copies of one document.
    Returns the table and, per planted pair, the id that must be kept -> the id that must go."""
    base = corpus.slice(0, 60).drop_columns(["topic"])
    rows = base.to_pylist()
    texts = {d["id"]: d["text"] for d in (graded_document(i) for i in range(60))}
    extra, expected = [], {}
    for r in rows[:4]:  # exact copies, better quality: the copy is kept
        extra.append({**r, "id": f"{r['id']}-copy", "quality": r["quality"] + 1})
        expected[f"{r['id']}-copy"] = r["id"]
    near_source = rows[10]
    near_text = texts[near_source["id"]].replace(" the ", " a ", 2) + " Indeed."
    near = encoder.embed([near_text])[0][0]
    extra.append({"id": "near-copy", "quality": near_source["quality"] - 0.5, "embedding": near.tolist()})
    expected[near_source["id"]] = "near-copy"
    for tag in ("tie-a", "tie-b"):
        extra.append({**rows[20], "id": f"{rows[20]['id']}-{tag}"})
    table = pa.concat_tables([base, pa.Table.from_pylist(extra, schema=base.schema)])
    return table, expected


def test_semdedup_drops_planted_duplicates_keeping_the_better_one(ray_address: str, corpus: pa.Table,
                                                                  encoder: SentenceEncoder, tmp_path: Path) -> None:
    table, expected = _planted(corpus, encoder)
    x, _ = arrow_to_vectors(table["embedding"])
    ids = table["id"].to_pylist()
    source = next(keep for keep, drop in expected.items() if drop == "near-copy")
    near_cosine = float((normalize_rows(x[[ids.index("near-copy")]]) @ normalize_rows(x[[ids.index(source)]]).T)[0, 0])
    assert 0.95 < near_cosine < 0.999, near_cosine  # a near copy, not an exact one
    clustered, _ = _cluster({"k": 6}, ray.data.from_arrow(table), tmp_path / "cluster")
    marked, ctx = _run(SemDedupStage(SemDedupParams()), ray.data.from_arrow(clustered).repartition(5), tmp_path)
    dropped = set(marked.filter(pc.is_valid(marked["_drop_reason"]))["id"].to_pylist())
    ties = {i for i in ids if "-tie-" in i} | {corpus["id"][20].as_py()}
    kept_tie = ties - dropped
    assert set(expected.values()) <= dropped and not set(expected) & dropped
    assert len(kept_tie) == 1  # three copies of equal quality: one is kept (by the seeded id hash)
    assert dropped == set(expected.values()) | (ties - kept_tie), dropped  # and nothing else goes
    assert set(marked["_drop_reason"].drop_null().to_pylist()) == {REASON}
    assert marked.num_rows == table.num_rows and ctx.info["dropped"] == len(dropped) == 7
    assert ctx.info["threshold"] == 0.95 and sum(v["dropped"] for v in ctx.info["dropped_by_cluster_top"].values()) == 7
    assert "_semdedup_group" not in marked.column_names

    # The same rows in another order and layout, and in other blocks, give the same decisions.
    reordered = ray.data.from_arrow(clustered.take(np.arange(clustered.num_rows)[::-1])).repartition(2)
    again, _ = _run(SemDedupStage(SemDedupParams()), reordered, tmp_path / "again")
    assert again["_drop_reason"].equals(marked["_drop_reason"])

    # The same cluster-level function, in-process: lower is better keeps the other member of each
    # pair; a threshold of 0.999 keeps the near copy and still drops the exact copies.
    groups = pa.table({**{c: clustered[c] for c in clustered.column_names},
                       "_semdedup_group": pc.cast(clustered["cluster"], pa.int64())})
    for higher, threshold, must_go, must_stay, n_gone in (
            (False, 0.95, set(expected), set(expected.values()), 7),
            (True, 0.999, {d for d in expected.values() if d != "near-copy"}, {"near-copy", *expected}, 6)):
        gone: set[str] = set()
        for cluster in set(clustered["cluster"].to_pylist()):
            part = groups.filter(pc.equal(groups["cluster"], cluster))
            out = _dedup_group(part, "embedding", "quality", higher, threshold, seed=0)
            gone |= set(out.filter(pc.is_valid(out["_drop_reason"]))["id"].to_pylist())
        assert must_go <= gone and not must_stay & gone and len(gone) == n_gone  # with 2 of the 3 ties


def test_semdedup_keeps_distinct_documents_and_rows_without_a_cluster(clustered: tuple[pa.Table, StageContext],
                                                                      tmp_path: Path) -> None:
    table = clustered[0]
    x, _ = arrow_to_vectors(table["embedding"])
    sims = normalize_rows(x) @ normalize_rows(x).T
    np.fill_diagonal(sims, 0)
    assert sims.max() < 0.95  # the graded corpus has no near-duplicates at 0.95
    no_cluster = table.set_column(table.column_names.index("cluster"), "cluster",
                                  pa.array([None] * 5 + table["cluster"].to_pylist()[5:], pa.int32()))
    marked, ctx = _run(SemDedupStage(SemDedupParams(key=None)), ray.data.from_arrow(no_cluster), tmp_path)
    assert marked["_drop_reason"].null_count == DOCS and ctx.info["dropped"] == 0
    assert ctx.info["rows_without_cluster"] == 5 and ctx.info["clusters"] == 10
    # a loose threshold drops many, and every drop is inside a cluster with a kept row close to it
    loose, loose_ctx = _run(SemDedupStage(SemDedupParams(threshold=0.7)), ray.data.from_arrow(table),
                            tmp_path / "loose")
    gone = pc.is_valid(loose["_drop_reason"]).to_numpy(zero_copy_only=False)
    assert 0 < gone.sum() == loose_ctx.info["dropped"] < DOCS
    labels = loose["cluster"].to_numpy()
    kept_sims = normalize_rows(x) @ normalize_rows(x[~gone]).T
    same = labels[:, None] == labels[~gone][None, :]
    assert (np.where(same, kept_sims, -1)[gone].max(axis=1) > 0.7).all()
    kept_only = np.where(same[~gone], kept_sims[~gone], -1)
    np.fill_diagonal(kept_only, -1)
    assert kept_only.max() <= 0.7  # no two kept rows of a cluster are too close
