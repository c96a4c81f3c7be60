"""Batch-diverse uncertainty: top-1 per k-means cluster, and power sampling (so a batch is not near-copies)."""

from __future__ import annotations

import numpy as np

from raylearn.strategies._embed import embeddings, kmeans_labels
from raylearn.strategies.base import PoolView, QueryStrategy, configurable_requires, register_strategy
from raylearn.strategies.uncertainty import top_k

__all__ = ["ClusterTopK", "PowerSampling"]


def _scores(pool: PoolView, name: str) -> np.ndarray:
    return np.asarray(pool.features[name], dtype=np.float64).reshape(len(pool.ids))


@register_strategy("cluster_topk")
class ClusterTopK(QueryStrategy):
    """K-means (``k = budget``) on the unlabelled embeddings, then the most uncertain case of each cluster.

    Picks are ordered by score; if k-means yields fewer non-empty clusters than ``budget`` (duplicate
    embeddings), the rest is filled with the most uncertain remaining cases.

    Args:
        score: uncertainty feature (higher = more uncertain).
        embedding: embedding feature name.
        normalize: L2-normalise embeddings first.
        random_state: seed of k-means and tie-breaks.
    """

    requires = configurable_requires(frozenset({"embedding", "entropy"}))

    def __init__(
        self,
        *,
        score: str = "entropy",
        embedding: str = "embedding",
        normalize: bool = False,
        random_state: int | None = 0,
    ) -> None:
        self.score = score
        self.embedding = embedding
        self.normalize = normalize
        self.random_state = random_state

    def required_features(self) -> frozenset[str]:
        return frozenset({self.score, self.embedding})

    def _select(self, pool: PoolView, budget: int) -> np.ndarray:
        rng = self._rng()
        unl = pool.unlabeled_index
        s = _scores(pool, self.score)
        labels = kmeans_labels(embeddings(pool, self.embedding, self.normalize)[unl], budget, self.random_state)
        picked = [int(top_k(s, unl[labels == c], 1, rng)[0]) for c in np.unique(labels)]
        if len(picked) < budget:
            rest = np.setdiff1d(unl, picked)
            picked.extend(int(i) for i in top_k(s, rest, budget - len(picked), rng))
        picked_arr = np.array(picked, dtype=np.int64)
        return picked_arr[np.argsort(-s[picked_arr], kind="stable")]


@register_strategy("power")
class PowerSampling(QueryStrategy):
    """Power sampling (Kirsch et al., 2023): draw ``budget`` cases without replacement with probability
    proportional to ``score ** beta`` (Gumbel-top-k). ``beta -> inf`` approaches top-k, ``beta = 0`` is random.

    Args:
        score: non-negative uncertainty feature.
        beta: exponent (>= 0).
        random_state: seed.
    """

    requires = configurable_requires(frozenset({"entropy"}))

    def __init__(self, *, score: str = "entropy", beta: float = 1.0, random_state: int | None = 0) -> None:
        self.score = score
        self.beta = beta
        self.random_state = random_state

    def required_features(self) -> frozenset[str]:
        return frozenset({self.score})

    def _select(self, pool: PoolView, budget: int) -> np.ndarray:
        if self.beta < 0:
            raise ValueError(f"power: beta must be >= 0, got {self.beta}")
        unl = pool.unlabeled_index
        s = _scores(pool, self.score)[unl]
        if (s < 0).any():
            raise ValueError(f"power: score feature {self.score!r} has negative values; power sampling needs >= 0")
        logw = self.beta * np.log(np.maximum(s, 1e-300)) if self.beta > 0 else np.zeros(len(s))
        keys = logw + self._rng().gumbel(size=len(s))
        return unl[np.argsort(-keys, kind="stable")[:budget]]
