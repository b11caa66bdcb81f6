"""k-means clusters of the embedding vectors: ``cluster`` (int32) and ``cluster_dist`` (float32) per row.

Method: the clustering step of Diversify and Conquer (Yu et al., 2024: k-means over sentence
embeddings, k chosen by silhouette score) and SemDeDup (Abbas et al., 2023). Spherical k-means
(cosine) by default. The model is fitted on a bounded hashed sample of at most ``fit_rows``
vectors (``pipeline.core.sampling``: the same rows whatever the block layout), then every row
is assigned to its nearest centroid with ``map_batches``; the driver never holds more than the
sample. With ``k: auto`` each of ``k_candidates`` is fitted and the one with the highest
silhouette on the first ``silhouette_rows`` rows of the sample wins. The centroids are saved as
``centroids.npy`` (float32 ``(k, dim)``, read with ``np.load(allow_pickle=False)``) and listed in
the manifest's artifacts as ``cluster_centroids``.

Backend: ``sklearn`` (k-means++ seeds, then Lloyd on the sphere in NumPy/SciPy, or
scikit-learn's ``KMeans`` for euclidean) by default, because it measured faster than faiss-cpu
here: fit-and-assign at 1M x 384, k = 64, 18.0 s against 23.8 s (the fit on the 100k-row sample
9.0 s against 11.5 s), same objective (``benchmarks/bench_diversity.py``, benchmarks/README.md).
``faiss`` (``pip install data-curriculum[faiss]``) fits the same model from the same seeds.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import time
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from pydantic import Field, field_validator

from pipeline.core.errors import ConfigError, StageError
from pipeline.core.sampling import hashed_sample
from pipeline.models.kmeans import BACKENDS, KMeansFit, assign, fit_kmeans, silhouette
from pipeline.models.vectors import arrow_to_vectors, has_vector, is_vector_type
from stages.base import Stage, StageContext, StageParams

_FIT_SALT = "cluster.fit"
CENTROIDS_FILE = "centroids.npy"


class ClusterParams(StageParams):
    name: Literal["cluster"] = "cluster"
    column: str = Field("embedding", min_length=1, description="The vector column (a fixed-size list of floats, "
                        "as the embed stage writes it).")
    k: int | Literal["auto"] = Field("auto", description="Number of clusters, or auto: the candidate of "
                                     "k_candidates with the highest silhouette score (Yu et al., 2024).")
    k_candidates: list[int] = Field([4, 8, 16, 32, 64], min_length=1,
                                    description="k: auto tries these (each capped by the sample size).")
    silhouette_rows: int = Field(5000, ge=10, description="k: auto scores each candidate on this many sampled rows "
                                 "(silhouette is quadratic in rows).")
    fit_rows: int = Field(100_000, ge=2, description="The model is fitted on a hashed sample of at most this many "
                          "vectors; every row is then assigned.")
    metric: Literal["cosine", "euclidean"] = Field("cosine", description="cosine: spherical k-means (unit "
                                                   "centroids, nearest = largest dot product); euclidean: Lloyd.")
    iterations: int = Field(25, ge=1, description="Lloyd iterations at most.")
    n_init: int = Field(1, ge=1, description="Starts per fit; the lowest objective wins.")
    seed: int | None = Field(None, ge=0, description="Seeds the sample and the fit; defaults to run.seed.")
    backend: Literal["sklearn", "faiss"] = Field("sklearn", description="sklearn (the faster one measured here) "
                                                 "or faiss (optional faiss-cpu): the same model from the same seeds.")
    batch_size: int = Field(4096, ge=1, description="Rows per assignment call.")

    @field_validator("k", mode="before")
    @classmethod
    def _k(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"must be a positive integer or 'auto' (got {value!r})")

    @field_validator("k_candidates")
    @classmethod
    def _candidates(cls, value: list[int]) -> list[int]:
        if any(k < 2 for k in value):
            raise ValueError("every candidate must be at least 2 (a silhouette needs two clusters)")
        return sorted(set(value))


class ClusterStage(Stage):
    name: ClassVar[str] = "cluster"
    Params = ClusterParams
    columns: ClassVar[tuple[str, ...]] = ("cluster", "cluster_dist")

    def requires(self) -> list[str]:
        return [self.params.column]

    def apply(self, ds: ray.data.Dataset, ctx: StageContext) -> ray.data.Dataset:
        p = self.params
        assert p.backend in BACKENDS
        if p.backend == "faiss" and importlib.util.find_spec("faiss") is None:
            raise ConfigError("cluster: stages.cluster.backend faiss needs faiss-cpu "
                              "(pip install data-curriculum[faiss]); or use backend: sklearn")
        seed = ctx.seed if p.seed is None else p.seed
        t0 = time.time()
        _check_vector_column(ds, p.column)
        sample = hashed_sample(ds, p.fit_rows, seed, _FIT_SALT, [p.column],
                               eligible=functools.partial(has_vector, column=p.column))
        x, _ = arrow_to_vectors(sample[p.column]) if sample.num_rows else (np.zeros((0, 0), np.float32), None)
        del sample
        n_fit = x.shape[0]
        if n_fit == 0:
            raise StageError(f"cluster: no row has a vector in column {p.column!r}")
        all_rows_sampled = n_fit < p.fit_rows  # the sample is then every row with a vector
        timings = {"sample": time.time() - t0}
        info: dict[str, Any] = {"backend": p.backend, "metric": p.metric, "iterations": p.iterations,
                                "n_init": p.n_init, "seed": seed, "column": p.column, "fit_rows": n_fit,
                                "fit_rows_limit": p.fit_rows, "dim": int(x.shape[1])}
        if p.k == "auto":
            k, fit, scores = self._choose_k(x, seed)
            info.update(k_source="auto", silhouette={str(c): s for c, s in scores.items()},
                        silhouette_rows=min(p.silhouette_rows, n_fit))
        else:
            k = p.k
            if k > n_fit:
                where = (f"the {n_fit} rows with a vector in {p.column!r}" if all_rows_sampled
                         else f"fit_rows ({p.fit_rows}), the rows the model is fitted on")
                raise ConfigError(f"cluster: k = {k} is more than {where}; lower stages.cluster.k (or use k: auto)"
                                  + ("" if all_rows_sampled else " or raise stages.cluster.fit_rows"))
            fit = fit_kmeans(x, k, p.metric, p.iterations, p.n_init, seed, p.backend)
            info["k_source"] = "given"
        timings["fit"] = time.time() - t0 - timings["sample"]
        del x
        info.update(k=k, objective=round(fit.objective, 6))

        ctx.artifact_dir.mkdir(parents=True, exist_ok=True)
        path = ctx.artifact_dir / CENTROIDS_FILE
        tmp = ctx.artifact_dir / f".{CENTROIDS_FILE}.tmp.npy"
        np.save(tmp, fit.centroids.astype(np.float32), allow_pickle=False)
        tmp.replace(path)
        ctx.artifacts["cluster_centroids"] = os.path.relpath(path, ctx.run_dir)

        t1 = time.time()
        out = ds.map_batches(_assign_batch, batch_format="pyarrow", batch_size=p.batch_size, fn_kwargs={
            "centroids": fit.centroids, "column": p.column, "metric": p.metric}).materialize()
        timings["assign"] = time.time() - t1
        sizes = np.zeros(k, dtype=np.int64)
        nulls = 0
        for row in out.select_columns(["cluster"]).map_batches(_sizes, batch_format="pyarrow", batch_size=None,
                                                               fn_kwargs={"k": k}).take_all():
            sizes += np.asarray(row["sizes"], dtype=np.int64)
            nulls += int(row["nulls"])
        timings["statistics"] = time.time() - t1 - timings["assign"]
        info.update(sizes=sizes.tolist(), empty_clusters=int((sizes == 0).sum()), null_vectors=nulls,
                    seconds={name: round(v, 2) for name, v in timings.items()})
        ctx.info.update(info)
        return out

    def _choose_k(self, x: np.ndarray, seed: int) -> tuple[int, KMeansFit, dict[int, float | None]]:
        """(k, fitted model, silhouette per candidate) for k: auto."""
        p = self.params
        scored = x[: p.silhouette_rows]  # the sample is in hash order: its head is a hashed sample too
        usable = [c for c in p.k_candidates if c <= min(x.shape[0], scored.shape[0]) - 1]
        if not usable:
            raise ConfigError(f"cluster: no candidate of stages.cluster.k_candidates {p.k_candidates} fits "
                              f"{min(x.shape[0], scored.shape[0])} rows (a silhouette needs k <= rows - 1)")
        scores: dict[int, float | None] = {}
        best: tuple[float, int, Any] | None = None
        for c in usable:
            fit = fit_kmeans(x, c, p.metric, p.iterations, p.n_init, seed, p.backend)
            labels, _ = assign(scored, fit.centroids, p.metric)
            score = silhouette(scored, labels, p.metric)
            scores[c] = None if score is None else round(score, 6)
            if score is not None and (best is None or score > best[0]):  # ties: the smaller k (first)
                best = (score, c, fit)
        if best is None:
            raise StageError(f"cluster: no candidate k gave a silhouette score ({scores}); give k explicitly")
        return best[1], best[2], scores


def _check_vector_column(ds: ray.data.Dataset, column: str) -> None:
    schema = ds.schema()
    names = list(schema.names)
    if column not in names:
        raise StageError(f"cluster: column {column!r} does not exist (columns: {names}); run the embed stage first")
    arrow_type = schema.base_schema.field(column).type if hasattr(schema, "base_schema") else None
    if arrow_type is not None and not is_vector_type(arrow_type):
        raise StageError(f"cluster: column {column!r} has type {arrow_type}, not a fixed-size list of floats")


def _assign_batch(table: pa.Table, centroids: np.ndarray, column: str, metric: str) -> pa.Table:
    x, valid = arrow_to_vectors(table[column])
    labels, dist = assign(x, centroids, metric)
    table = table.drop_columns([c for c in ("cluster", "cluster_dist") if c in table.column_names])
    table = table.append_column("cluster", pa.array(labels, pa.int32(), mask=~valid))
    return table.append_column("cluster_dist", pa.array(dist, pa.float32(), mask=~valid))


def _sizes(table: pa.Table, k: int) -> pa.Table:
    column = table["cluster"]
    labels = pc.drop_null(column).to_numpy(zero_copy_only=False)
    sizes = np.bincount(labels.astype(np.int64), minlength=k)
    return pa.table({"sizes": pa.array([sizes.tolist()], pa.list_(pa.int64())), "nulls": [column.null_count]})
