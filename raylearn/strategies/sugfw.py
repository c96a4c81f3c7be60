"""SUGFW's GSCU selector: one case per k-means cluster, spreading the batch over uncertainty levels.

Checked against the authors' ``UC-SAM/select_samples.py`` (HiLab-git/SUGFW, commit 6979278, ``my_select``):
k-means (``k`` = the number to select) on the PGDR features; in the first cluster the case whose uncertainty is
nearest the cluster's median, in each next one the case maximising the minimum absolute uncertainty gap to those
already taken. The features come from SUGFW's SAM extractor (:mod:`raylearn.models.sam2d`) at the cold start.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raylearn.strategies._embed import embeddings, kmeans_labels
from raylearn.strategies.base import PoolView, QueryStrategy, configurable_requires, register_strategy
from raylearn.strategies.csal3d import ColdStartSource, _ColdStartMixin

__all__ = ["GSCU"]


@register_strategy("gscu")
class GSCU(_ColdStartMixin, QueryStrategy):
    """Greedy Selection with Cluster and Uncertainty (SUGFW).

    K-means with ``k = budget`` on the unlabelled embeddings (PGDR). Clusters are visited from the largest; in
    the first the case with the median uncertainty (nearest the cluster's median) is taken, in each next one the
    case maximising the minimum absolute uncertainty gap to the cases already taken. Missing picks (fewer
    non-empty clusters than ``budget``) follow the same gap rule over all remaining cases.

    Args:
        source: ``auto`` (default: SUGFW's SAM extractor features at round 0, the segmenter's ``embedding`` /
            ``score`` afterwards), ``extractor`` (the SAM features every round, from the store's cache) or
            ``segmenter``.
        extractor: settings of the SAM extractor (:class:`raylearn.models.sam2d.SugfwParams`; ``checkpoint`` is
            required, nothing is downloaded).
        score: the segmenter's global uncertainty feature.
        embedding: the segmenter's embedding feature (``weighted_embedding`` = PGDR on the segmenter).
        normalize: L2-normalise embeddings first.
        random_state: seed of k-means.
    """

    requires = configurable_requires(frozenset({"weighted_embedding", "entropy"}))
    _extractor_name = "sugfw"
    _extractor_features = ("sugfw_embedding", "sugfw_uncertainty")

    def __init__(
        self,
        *,
        source: ColdStartSource = "auto",
        extractor: dict[str, Any] | None = None,
        score: str = "entropy",
        embedding: str = "weighted_embedding",
        normalize: bool = False,
        random_state: int | None = 0,
    ) -> None:
        self.source = source
        self.extractor = dict(extractor or {})
        self.score = score
        self.embedding = embedding
        self.normalize = normalize
        self.random_state = random_state

    def _select(self, pool: PoolView, budget: int) -> np.ndarray:
        emb_name, u_name = self._features()
        unl = pool.unlabeled_index
        u = np.asarray(pool.features[u_name], dtype=np.float64).reshape(len(pool.ids))
        labels = kmeans_labels(embeddings(pool, emb_name, self.normalize)[unl], budget, self.random_state)
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
