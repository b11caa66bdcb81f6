"""k-means on embedding vectors: fit on a bounded sample, assign any number of rows batch by batch.

``metric: cosine`` is spherical k-means (Dhillon & Modha, 2001): rows and centroids live on the
unit sphere, a row goes to the centroid of largest dot product, and each centroid is the
normalized mean of its rows (Lloyd on the sphere). ``euclidean`` is plain Lloyd.

Both backends start from the same greedy k-means++ seeds (Arthur & Vassilvitskii, 2007, with
2 + ln k candidate rows per step, as scikit-learn does; :func:`kmeans_plusplus`, float32 dot
products: scikit-learn's own upcasts float32 rows to float64 and took 35 s at 100k x 384 here,
this one about 2 s) and run the same Lloyd iterations, so they fit the same model and differ
only in speed. Random-row starts, faiss' default, gave visibly worse clusters on the synthetic
topics (NMI 0.85-0.99 over seeds, against 0.92-0.99 from k-means++; benchmarks/README.md).

- ``sklearn`` (the default, faster here): scikit-learn's ``KMeans`` (Lloyd, from the same seeds)
  for euclidean; for cosine, Lloyd on the sphere in NumPy/SciPy (BLAS products, a sparse
  membership matrix for the sums, stopping when no row moves), since scikit-learn's ``KMeans``
  cannot renormalize the centroids each step;
- ``faiss`` (optional faiss-cpu, ``Kmeans`` with ``init_centroids``; ``spherical=True`` for
  cosine): every iteration runs.

With ``n_init`` > 1, start ``i`` uses seed ``seed + i`` and the lowest objective wins.

Assignment (:func:`assign`) is the same NumPy code for both, in fixed-shape chunks of
``ASSIGN_ROWS`` rows (the last one zero-padded), so every GEMM has the same shape and a row's
distance does not depend on which rows share its batch (CPU BLAS may round a row differently in
a matrix of another shape); ties go to the lowest centroid index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ASSIGN_ROWS = 1024
BACKENDS = ("sklearn", "faiss")


@dataclass
class KMeansFit:
    centroids: np.ndarray  # float32 (k, dim); unit rows for cosine
    objective: float  # mean cosine distance (cosine) or mean squared distance (euclidean) over the fit rows
    backend: str


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero), float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0).astype(np.float32)


def assign(x: np.ndarray, centroids: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(nearest centroid as int32, distance as float32) per row; batch-independent (module docstring).

    Cosine: rows are normalized, distance = 1 - cos. Euclidean: distance = ||x - c||, in float64.
    """
    n = x.shape[0]
    labels = np.zeros(n, dtype=np.int32)
    dist = np.zeros(n, dtype=np.float32)
    if n == 0:
        return labels, dist
    cosine = metric == "cosine"
    dtype = np.float32 if cosine else np.float64
    c = (normalize_rows(centroids) if cosine else centroids).astype(dtype)
    ct = np.ascontiguousarray(c.T)
    c_sq = (c * c).sum(axis=1)
    chunk = np.zeros((ASSIGN_ROWS, x.shape[1]), dtype=dtype)
    for start in range(0, n, ASSIGN_ROWS):
        part = x[start:start + ASSIGN_ROWS]
        m = part.shape[0]
        chunk[:m] = normalize_rows(part) if cosine else part
        chunk[m:] = 0.0
        dots = chunk @ ct
        if cosine:
            best = np.argmax(dots[:m], axis=1)
            labels[start:start + m] = best
            dist[start:start + m] = 1.0 - dots[np.arange(m), best]
        else:
            sq = (chunk[:m] * chunk[:m]).sum(axis=1, keepdims=True) - 2.0 * dots[:m] + c_sq[None, :]
            best = np.argmin(sq, axis=1)
            labels[start:start + m] = best
            dist[start:start + m] = np.sqrt(np.maximum(sq[np.arange(m), best], 0.0))
    return labels, dist


def fit_kmeans(x: np.ndarray, k: int, metric: str = "cosine", iterations: int = 25, n_init: int = 1, seed: int = 0,
               backend: str = "sklearn") -> KMeansFit:
    """k centroids of the rows of ``x`` (float32 ``(n, dim)``, n >= k); the best of ``n_init`` starts."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown k-means backend {backend!r} (one of {BACKENDS})")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if metric == "cosine":
        x = normalize_rows(x)
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k = {k} needs between 1 and {x.shape[0]} rows")
    best: KMeansFit | None = None
    for start in range(n_init):
        init = kmeans_plusplus(x, k, seed + start)
        if metric == "cosine":
            init = normalize_rows(init)
        if backend == "faiss":
            centroids = _lloyd_faiss(x, init, metric, iterations, seed + start)
        elif metric == "cosine":
            centroids = _spherical_lloyd(x, init, iterations)
        else:
            from sklearn.cluster import KMeans

            model = KMeans(n_clusters=k, init=init, n_init=1, max_iter=iterations, random_state=seed + start,
                           algorithm="lloyd")
            centroids = model.fit(x).cluster_centers_.astype(np.float32)
        _, dist = assign(x, centroids, metric)
        dist = dist.astype(np.float64)
        objective = float(np.mean(dist if metric == "cosine" else dist**2))
        if best is None or objective < best.objective:
            best = KMeansFit(centroids=centroids.astype(np.float32), objective=objective, backend=backend)
    assert best is not None
    return best


def kmeans_plusplus(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Greedy k-means++ seeds: k rows of ``x``, each step the best of 2 + ln k candidates drawn with
    probability proportional to the squared distance to the nearest seed so far."""
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    trials = 2 + int(np.log(k))
    sq = np.einsum("ij,ij->i", x, x)

    def dist2(rows: np.ndarray) -> np.ndarray:  # (len(rows), n) squared distances, >= 0
        centres = x[rows]
        d = sq[None, :] + np.einsum("ij,ij->i", centres, centres)[:, None] - 2.0 * (centres @ x.T)
        return np.maximum(d, 0.0, out=d)

    chosen = [int(rng.integers(n))]
    closest = dist2(np.array(chosen))[0]
    for _ in range(1, k):
        cumulative = np.cumsum(closest, dtype=np.float64)
        if cumulative[-1] <= 0:  # every row sits on a seed: take unseen rows in a seeded order
            rest = np.setdiff1d(rng.permutation(n), chosen, assume_unique=True)
            chosen.append(int(rest[0]))
            continue
        candidates = np.minimum(np.searchsorted(cumulative, rng.random(trials) * cumulative[-1]), n - 1)
        updated = np.minimum(closest[None, :], dist2(candidates))
        pick = int(np.argmin(updated.sum(axis=1, dtype=np.float64)))
        chosen.append(int(candidates[pick]))
        closest = updated[pick]
    return x[np.array(chosen)].copy()


def _lloyd_faiss(x: np.ndarray, init: np.ndarray, metric: str, iterations: int, seed: int) -> np.ndarray:
    import faiss

    n, dim = x.shape
    k = init.shape[0]
    # Every row of the (already bounded) sample takes part; faiss would otherwise subsample 256 k.
    km = faiss.Kmeans(dim, k, niter=iterations, nredo=1, spherical=metric == "cosine", seed=seed,
                      max_points_per_centroid=-(-n // k) + 1, min_points_per_centroid=1, verbose=False)
    km.train(x, init_centroids=np.ascontiguousarray(init, dtype=np.float32))
    return np.array(km.centroids, dtype=np.float32).reshape(k, dim)


def _spherical_lloyd(x: np.ndarray, init: np.ndarray, iterations: int) -> np.ndarray:
    """Lloyd on the unit sphere (x has unit rows) from ``init``; stops early when no row moves."""
    from scipy.sparse import csr_matrix

    n, k = x.shape[0], init.shape[0]
    centroids = init
    labels = None
    for _ in range(iterations):
        dots = x @ centroids.T
        new_labels = np.argmax(dots, axis=1)
        if labels is not None and np.array_equal(new_labels, labels):
            break
        labels = new_labels
        members = csr_matrix((np.ones(n, dtype=np.float32), (labels, np.arange(n))), shape=(k, n))
        sums = np.asarray(members @ x, dtype=np.float32)
        empty = np.flatnonzero(np.bincount(labels, minlength=k) == 0)
        if empty.size:  # reseed an empty cluster with the rows farthest from their centroids
            far = np.argsort(dots[np.arange(n), labels], kind="stable")[: empty.size]
            sums[empty] = x[far]
        centroids = normalize_rows(sums)
    return centroids


def silhouette(x: np.ndarray, labels: np.ndarray, metric: str) -> float | None:
    """Mean silhouette of the rows (scikit-learn), or None when it is undefined (one cluster, or a
    cluster per row)."""
    from sklearn.metrics import silhouette_score

    n_labels = len(np.unique(labels))
    if not 2 <= n_labels <= len(labels) - 1:
        return None
    return float(silhouette_score(x, labels, metric=metric))
