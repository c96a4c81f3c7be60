"""Random baselines: uniform random and foreground-aware random (nnActive's strong baseline)."""

from __future__ import annotations

import logging

import numpy as np

from raylearn.strategies.base import PoolView, QueryStrategy, register_strategy

logger = logging.getLogger(__name__)

__all__ = ["ForegroundRandom", "RandomStrategy"]


@register_strategy("random")
class RandomStrategy(QueryStrategy):
    """Uniformly random unlabelled cases.

    Args:
        random_state: seed of ``np.random.default_rng``.
    """

    requires = frozenset()

    def __init__(self, *, random_state: int | None = 0) -> None:
        self.random_state = random_state

    def _select(self, pool: PoolView, budget: int) -> np.ndarray:
        return self._rng().choice(pool.unlabeled_index, size=budget, replace=False)


@register_strategy("fg_random")
class ForegroundRandom(QueryStrategy):
    """Random among unlabelled cases whose predicted foreground covers every class.

    A case is eligible when its predicted volume (``fg_volume [K-1]``, voxels) is at least ``min_voxels`` for
    every foreground class. When fewer than ``budget`` cases are eligible, all eligible ones are taken and the
    rest is filled uniformly at random from the other unlabelled cases (logged at INFO).

    Args:
        min_voxels: least predicted voxels per class for a case to count as covering it.
        random_state: seed.
    """

    requires = frozenset({"fg_volume"})

    def __init__(self, *, min_voxels: float = 1.0, random_state: int | None = 0) -> None:
        self.min_voxels = min_voxels
        self.random_state = random_state

    def _select(self, pool: PoolView, budget: int) -> np.ndarray:
        rng = self._rng()
        unl = pool.unlabeled_index
        vol = np.asarray(pool.features["fg_volume"], dtype=np.float64)
        vol = vol.reshape(len(pool.ids), -1)[unl]
        covers = (vol >= self.min_voxels).all(axis=1)
        eligible, others = unl[covers], unl[~covers]
        if len(eligible) >= budget:
            return rng.choice(eligible, size=budget, replace=False)
        logger.info("fg_random: only %d of %d wanted cases cover every class; filling at random", len(eligible), budget)
        fill = rng.choice(others, size=budget - len(eligible), replace=False)
        return np.concatenate([rng.permutation(eligible), fill])
