"""SUGFW's GSCU selector: one case per k-means cluster, spreading the batch over uncertainty levels."""

from __future__ import annotations

import numpy as np

from raylearn.strategies._embed import embeddings, kmeans_labels
from raylearn.strategies.base import PoolView, QueryStrategy, configurable_requires, register_strategy

__all__ = ["GSCU"]


@register_strategy("gscu")
class GSCU(QueryStrategy):
    """Greedy Selection with Cluster and Uncertainty (SUGFW).

    K-means with ``k = budget`` on the unlabelled embeddings (by default the uncertainty-weighted PGDR
    embedding). Clusters are visited from the largest; in the first the case with the median uncertainty
    (nearest the cluster's median) is taken, in each next one the case maximising the minimum absolute
    uncertainty gap to the cases already taken. Missing picks (fewer non-empty clusters than ``budget``)
    follow the same gap rule over all remaining cases.

    Args:
        score: global uncertainty feature.
        embedding: embedding feature name (``weighted_embedding`` = PGDR).
        normalize: L2-normalise embeddings first.
        random_state: seed of k-means.
    """

    requires = configurable_requires(frozenset({"weighted_embedding", "entropy"}))

    def __init__(
        self,
        *,
        score: str = "entropy",
        embedding: str = "weighted_embedding",
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
        unl = pool.unlabeled_index
        u = np.asarray(pool.features[self.score], dtype=np.float64).reshape(len(pool.ids))
        labels = kmeans_labels(embeddings(pool, self.embedding, self.normalize)[unl], budget, self.random_state)
        sizes = np.bincount(labels)
        order = np.lexsort((np.arange(len(sizes)), -sizes))
        picked: list[int] = []

        def gap_pick(cands: np.ndarray) -> int:
            gaps = np.abs(u[cands][:, None] - u[picked][None, :]).min(axis=1)
            return int(cands[np.argmax(gaps)])

        for c in order:
            if sizes[c] == 0:
                continue
            members = unl[labels == c]
            if not picked:
                med = np.median(u[members])
                picked.append(int(members[np.argmin(np.abs(u[members] - med))]))
            else:
                picked.append(gap_pick(members))
        while len(picked) < budget:
            picked.append(gap_pick(np.setdiff1d(unl, picked)))
        return np.array(picked[:budget], dtype=np.int64)
