"""Top-k by an uncertainty score: one named strategy per score feature (higher score = more uncertain)."""

from __future__ import annotations

import numpy as np

from raylearn.strategies.base import PoolView, QueryStrategy, register_strategy

__all__ = [
    "BALDStrategy",
    "EntropyStrategy",
    "LeastConfidenceStrategy",
    "MCEntropyStrategy",
    "MarginStrategy",
    "TTAVarianceStrategy",
    "TopKScore",
    "top_k",
]


def top_k(scores: np.ndarray, candidates: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """The ``k`` candidates with the largest scores, ties broken at random by ``rng``.

    Args:
        scores: ``[N]`` scores of the whole pool.
        candidates: ``int [U]`` positions eligible for selection.
        k: how many to return (``<= U``).
        rng: generator for the tie-break.

    Returns:
        ``int [k]`` positions, best first.
    """
    order = rng.permutation(candidates)
    ranked = order[np.argsort(-np.asarray(scores, dtype=np.float64)[order], kind="stable")]
    return ranked[:k]


class TopKScore(QueryStrategy):
    """Base for "take the ``budget`` most uncertain cases" by the feature named in ``score_feature``."""

    score_feature = ""

    def __init__(self, *, random_state: int | None = 0) -> None:
        self.random_state = random_state

    def _select(self, pool: PoolView, budget: int) -> np.ndarray:
        scores = np.asarray(pool.features[self.score_feature]).reshape(len(pool.ids))
        return top_k(scores, pool.unlabeled_index, budget, self._rng())


def _topk_class(name: str, feature: str, doc: str) -> type[TopKScore]:
    cls = type(
        f"{''.join(p.capitalize() for p in name.split('_'))}Strategy",
        (TopKScore,),
        {"score_feature": feature, "requires": frozenset({feature}), "__doc__": doc, "__module__": __name__},
    )
    return register_strategy(name)(cls)


LeastConfidenceStrategy = _topk_class(
    "least_confidence",
    "least_confidence",
    "Top-k by least confidence (reduced ``1 - max p``): \"From Prediction to Prompt\"'s |1 - ŷ| with ŷ the winning "
    "class's probability (see :func:`raylearn.scoring.uncertainty.least_confidence`).",
)
EntropyStrategy = _topk_class("entropy", "entropy", "Top-k by reduced voxel entropy.")
MarginStrategy = _topk_class("margin", "margin", "Top-k by margin uncertainty ``1 - (p1 - p2)``.")
MCEntropyStrategy = _topk_class("mc_entropy", "mc_entropy", "Top-k by MC-dropout predictive entropy.")
BALDStrategy = _topk_class("bald", "bald", "Top-k by BALD mutual information over MC-dropout samples.")
TTAVarianceStrategy = _topk_class("tta_variance", "tta_variance", "Top-k by variance across flip TTA.")
