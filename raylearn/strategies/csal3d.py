"""CSAL-3D's URDS selector: typicality-gated uncertainty per k-means cluster."""

from __future__ import annotations

import numpy as np

from raylearn.strategies._embed import embeddings, kmeans_labels, typicality
from raylearn.strategies.base import PoolView, QueryStrategy, configurable_requires, register_strategy

__all__ = ["URDS"]


@register_strategy("urds")
class URDS(QueryStrategy):
    """Uncertainty-Representativeness Dual Selection (CSAL-3D).

    K-means (``k = budget``) on the L2-normalised unlabelled embeddings (Euclidean distance of unit vectors is
    monotone in cosine distance); in each cluster the ``n_cand`` most typical cases (typicality = 1 / mean
    distance to the ``knn`` nearest neighbours in the cluster) are candidates and the most uncertain candidate
    is taken. Missing picks are filled by the most uncertain remaining cases.

    Args:
        score: uncertainty feature.
        n_cand: candidates per cluster.
        knn: neighbours for typicality.
        embedding: embedding feature name.
        random_state: seed of k-means.
    """

    requires = configurable_requires(frozenset({"embedding", "entropy"}))

    def __init__(
        self,
        *,
        score: str = "entropy",
        n_cand: int = 5,
        knn: int = 10,
        embedding: str = "embedding",
        random_state: int | None = 0,
    ) -> None:
        self.score = score
        self.n_cand = n_cand
        self.knn = knn
        self.embedding = embedding
        self.random_state = random_state

    def required_features(self) -> frozenset[str]:
        return frozenset({self.score, self.embedding})

    def _select(self, pool: PoolView, budget: int) -> np.ndarray:
        if self.n_cand < 1 or self.knn < 1:
            raise ValueError(f"urds: n_cand and knn must be >= 1, got {self.n_cand}, {self.knn}")
        unl = pool.unlabeled_index
        u = np.asarray(pool.features[self.score], dtype=np.float64).reshape(len(pool.ids))
        x = embeddings(pool, self.embedding, normalize=True)[unl]
        labels = kmeans_labels(x, budget, self.random_state)
        picked: list[int] = []
        for c in np.unique(labels):
            local = np.flatnonzero(labels == c)
            typ = typicality(x[local], self.knn)
            cands = unl[local[np.argsort(-typ, kind="stable")[: self.n_cand]]]
            picked.append(int(cands[np.argmax(u[cands])]))
        if len(picked) < budget:
            rest = np.setdiff1d(unl, picked)
            picked.extend(int(i) for i in rest[np.argsort(-u[rest], kind="stable")[: budget - len(picked)]])
        return np.array(picked, dtype=np.int64)
