"""Helpers shared by the embedding-based strategies (private)."""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import pairwise_distances
from sklearn.neighbors import NearestNeighbors

from raylearn.strategies.base import PoolView


def embeddings(pool: PoolView, name: str, normalize: bool) -> np.ndarray:
    """Feature ``name`` as ``float64 [N, F]``, optionally L2-normalised per row."""
    x = np.asarray(pool.features[name], dtype=np.float64).reshape(len(pool.ids), -1)
    if normalize:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.where(norms > 0, norms, 1.0)
    return x


def kmeans_labels(x: np.ndarray, n_clusters: int, random_state: int | None) -> np.ndarray:
    """K-means cluster labels ``int [N]`` (``n_clusters`` clamped to the number of distinct rows)."""
    n_distinct = len(np.unique(x, axis=0))
    k = max(1, min(n_clusters, n_distinct))
    if k == 1:
        return np.zeros(len(x), dtype=np.int64)
    seed = None if random_state is None else int(random_state) % 2**32  # sklearn accepts [0, 2**32)
    km = KMeans(n_clusters=k, n_init=3, random_state=seed)
    return km.fit_predict(x).astype(np.int64)


def typicality(x: np.ndarray, knn: int) -> np.ndarray:
    """TypiClust typicality ``1 / mean distance to the knn nearest neighbours`` for each row of ``x [n, F]``.

    A lone point (n = 1) gets ``inf``; duplicates (distance 0) get a large finite value.
    """
    n = len(x)
    if n == 1:
        return np.array([np.inf])
    k = min(knn, n - 1)
    if n <= 2048:  # small clusters: one dense distance matrix is far cheaper than building a tree
        d = pairwise(x)
        np.fill_diagonal(d, np.inf)
        nearest = np.partition(d, k - 1, axis=1)[:, :k]
        return 1.0 / (nearest.mean(axis=1) + 1e-12)
    dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    return 1.0 / (dist[:, 1:].mean(axis=1) + 1e-12)


def pairwise(x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    """Euclidean distances ``[len(x), len(y)]``."""
    return pairwise_distances(x, y if y is not None else x, metric="euclidean")
