"""Diversity strategies on case embeddings: k-center greedy (core-set), TypiClust, ProbCover, FPS.

All work on an embedding feature (``embedding`` by default, ``weighted_embedding`` for SUGFW-style pooled
features), in Euclidean distance, optionally after L2 normalisation (``normalize=True``).
"""

from __future__ import annotations

import logging

import numpy as np

from raylearn.strategies._embed import embeddings, kmeans_labels, pairwise, typicality
from raylearn.strategies.base import PoolView, QueryStrategy, configurable_requires, register_strategy

logger = logging.getLogger(__name__)

__all__ = ["FarthestPointSampling", "KCenterGreedy", "ProbCover", "TypiClust"]


class _EmbeddingStrategy(QueryStrategy):
    requires = configurable_requires(frozenset({"embedding"}))
    embedding: str

    def required_features(self) -> frozenset[str]:
        return frozenset({self.embedding})

    def needs_labeled_features(self) -> bool:
        return True


def _farthest_first(x: np.ndarray, centers: np.ndarray, candidates: np.ndarray, budget: int) -> list[int]:
    """Greedy farthest-first: repeatedly take the candidate farthest from every centre chosen so far."""
    min_d = pairwise(x[candidates], x[centers]).min(axis=1) if len(centers) else np.full(len(candidates), np.inf)
    picked: list[int] = []
    alive = np.ones(len(candidates), dtype=bool)
    for _ in range(budget):
        j = int(np.argmax(np.where(alive, min_d, -np.inf)))
        picked.append(int(candidates[j]))
        alive[j] = False
        min_d = np.minimum(min_d, pairwise(x[candidates], x[candidates[j] : candidates[j] + 1])[:, 0])
    return picked


@register_strategy("kcenter")
class KCenterGreedy(_EmbeddingStrategy):
    """Core-set k-center greedy (Sener & Savarese): the labelled cases are the initial centres; each step takes
    the unlabelled case farthest from its nearest centre. With no labelled case the first pick is random.

    Args:
        embedding: embedding feature name.
        normalize: L2-normalise embeddings first.
        random_state: seed (only used for the first pick of a cold start).
    """

    def __init__(self, *, embedding: str = "embedding", normalize: bool = False, random_state: int | None = 0) -> None:
        self.embedding = embedding
        self.normalize = normalize
        self.random_state = random_state

    def _select(self, pool: PoolView, budget: int) -> np.ndarray:
        x = embeddings(pool, self.embedding, self.normalize)
        centers = np.flatnonzero(pool.labeled_mask)
        unl = pool.unlabeled_index
        if len(centers) == 0:
            first = int(self._rng().choice(unl))
            rest = unl[unl != first]
            return np.array([first, *_farthest_first(x, np.array([first]), rest, budget - 1)], dtype=np.int64)
        return np.array(_farthest_first(x, centers, unl, budget), dtype=np.int64)


@register_strategy("fps")
class FarthestPointSampling(_EmbeddingStrategy):
    """Farthest point sampling over the unlabelled cases: a random first case, then farthest-first. Unlike
    ``kcenter`` the labelled cases are ignored unless ``use_labeled=True`` (then it is k-center with a random
    start), which suits cold start and spreads every batch over the whole unlabelled pool.

    Args:
        embedding: embedding feature name.
        normalize: L2-normalise embeddings first.
        use_labeled: also treat labelled cases as centres.
        random_state: seed of the first pick.
    """

    def __init__(
        self,
        *,
        embedding: str = "embedding",
        normalize: bool = False,
        use_labeled: bool = False,
        random_state: int | None = 0,
    ) -> None:
        self.embedding = embedding
        self.normalize = normalize
        self.use_labeled = use_labeled
        self.random_state = random_state

    def needs_labeled_features(self) -> bool:
        return bool(self.use_labeled)

    def _select(self, pool: PoolView, budget: int) -> np.ndarray:
        x = embeddings(pool, self.embedding, self.normalize)
        unl = pool.unlabeled_index
        first = int(self._rng().choice(unl))
        centers = np.array([first, *(np.flatnonzero(pool.labeled_mask) if self.use_labeled else [])], dtype=np.int64)
        rest = unl[unl != first]
        return np.array([first, *_farthest_first(x, centers, rest, budget - 1)], dtype=np.int64)


@register_strategy("typiclust")
class TypiClust(_EmbeddingStrategy):
    """TypiClust (Hacohen et al., 2022): k-means with ``k = #labelled + budget`` clusters (at most
    ``max_clusters``) over all cases; repeatedly take the cluster with the fewest labelled/selected cases
    (ties: the largest) among clusters of at least ``min_cluster_size`` cases with unlabelled members, and
    pick its most typical unlabelled case, typicality = 1 / mean distance to its ``knn`` nearest neighbours
    inside the cluster.

    Args:
        knn: neighbours for typicality (20 in the paper; clamped to cluster size - 1).
        max_clusters: upper bound on k (500 in the paper).
        min_cluster_size: smaller clusters are used only when no larger one has unlabelled cases left.
        embedding: embedding feature name.
        normalize: L2-normalise embeddings first.
        random_state: seed of k-means.
    """

    def __init__(
        self,
        *,
        knn: int = 20,
        max_clusters: int = 500,
        min_cluster_size: int = 1,
        embedding: str = "embedding",
        normalize: bool = False,
        random_state: int | None = 0,
    ) -> None:
        self.knn = knn
        self.max_clusters = max_clusters
        self.min_cluster_size = min_cluster_size
        self.embedding = embedding
        self.normalize = normalize
        self.random_state = random_state

    def _select(self, pool: PoolView, budget: int) -> np.ndarray:
        if self.knn < 1 or self.max_clusters < 1:
            raise ValueError(f"typiclust: knn and max_clusters must be >= 1, got {self.knn}, {self.max_clusters}")
        x = embeddings(pool, self.embedding, self.normalize)
        labels = kmeans_labels(x, min(pool.n_labeled + budget, self.max_clusters), self.random_state)
        n_c = labels.max() + 1
        sizes = np.bincount(labels, minlength=n_c)
        covered = np.bincount(labels[pool.labeled_mask], minlength=n_c)
        available = ~pool.labeled_mask.copy()
        typ = np.empty(len(x))
        for c in range(n_c):
            members = np.flatnonzero(labels == c)
            typ[members] = typicality(x[members], self.knn)
        picked: list[int] = []
        for _ in range(budget):
            has = np.bincount(labels[available], minlength=n_c) > 0
            ok = has & (sizes >= self.min_cluster_size)
            if not ok.any():
                ok = has
            cands = np.flatnonzero(ok)
            # fewest covered first, then largest, then lowest index
            c = cands[np.lexsort((cands, -sizes[cands], covered[cands]))[0]]
            members = np.flatnonzero((labels == c) & available)
            i = int(members[np.argmax(typ[members])])
            picked.append(i)
            available[i] = False
            covered[c] += 1
        return np.array(picked, dtype=np.int64)


@register_strategy("probcover")
class ProbCover(_EmbeddingStrategy):
    """ProbCover (Yehuda et al., 2022): greedy maximum coverage of delta-balls in embedding space.

    Balls around labelled cases count as covered. Each step takes the unlabelled case whose ball covers
    the most still-uncovered cases (ties at random); once everything is covered the rest is random.

    ``delta=None`` picks delta as in the paper: the largest radius (among quantiles of the pairwise distances)
    whose ball purity w.r.t. k-means pseudo-labels (``k = #labelled + budget``) is at least ``purity``.

    Args:
        delta: ball radius in embedding units, or ``None`` for the purity rule.
        purity: purity threshold alpha for the automatic delta (0.95 in the paper).
        embedding: embedding feature name.
        normalize: L2-normalise embeddings first.
        random_state: seed of k-means and tie-breaks.
    """

    def __init__(
        self,
        *,
        delta: float | None = None,
        purity: float = 0.95,
        embedding: str = "embedding",
        normalize: bool = False,
        random_state: int | None = 0,
    ) -> None:
        self.delta = delta
        self.purity = purity
        self.embedding = embedding
        self.normalize = normalize
        self.random_state = random_state

    def auto_delta(self, dist: np.ndarray, pseudo: np.ndarray) -> float:
        """Largest candidate radius whose ball purity is >= ``purity`` (the smallest candidate if none is)."""
        off = dist[~np.eye(len(dist), dtype=bool)]
        candidates = np.unique(np.quantile(off, np.linspace(0.005, 0.5, 40))) if off.size else np.array([0.0])
        same = pseudo[:, None] == pseudo[None, :]
        best = float(candidates[0])
        for d in candidates:
            pure = ~((dist <= d) & ~same).any(axis=1)
            if pure.mean() >= self.purity:
                best = float(d)
            else:
                break
        return best

    def _select(self, pool: PoolView, budget: int) -> np.ndarray:
        rng = self._rng()
        x = embeddings(pool, self.embedding, self.normalize)
        dist = pairwise(x)
        if self.delta is None:
            pseudo = kmeans_labels(x, pool.n_labeled + budget, self.random_state)
            delta = self.auto_delta(dist, pseudo)
            logger.debug("probcover: automatic delta %.4g", delta)
        else:
            if self.delta < 0:
                raise ValueError(f"probcover: delta must be >= 0, got {self.delta}")
            delta = float(self.delta)
        adj = dist <= delta
        covered = adj[pool.labeled_mask].any(axis=0)
        available = ~pool.labeled_mask.copy()
        picked: list[int] = []
        for _ in range(budget):
            cands = rng.permutation(np.flatnonzero(available))
            gains = adj[np.ix_(cands, ~covered)].sum(axis=1)
            if gains.max() == 0:
                picked.extend(int(i) for i in cands[: budget - len(picked)])
                break
            i = int(cands[np.argmax(gains)])
            picked.append(i)
            available[i] = False
            covered |= adj[i]
        return np.array(picked, dtype=np.int64)
