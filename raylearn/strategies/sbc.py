"""SBC-AL: Structure and Boundary Consistency-based Active Learning (MICCAI 2024, seed paper 003; no code was
released, this is a first public implementation, in 3D).

The model (``model: {arch: sbc_unet}``, :mod:`raylearn.models.sbc`) predicts a coarse segmentation, per-class
distance maps (SFP head) and a refined segmentation (ASR module). The pool shards reduce the three outputs of every
unlabelled case to the feature ``sbc_consistency = (Q_cos, Q_dice, HD)`` (:mod:`raylearn.scoring.sbc`); this
strategy only combines and ranks:

``SCS = w_cos * Q_cos + w_dice * Q_dice``, ``BCS = (HD - min HD) / (max HD - min HD)`` over the unlabelled cases,
``CS = w_structure * SCS + w_boundary * BCS``, and the ``budget`` cases with the highest CS (least consistent) are
queried. Paper weights: ``w_cos = 0.6``, ``w_dice = 0.4``, ``w_structure = 0.8``, ``w_boundary = 0.2``.

Differences from the paper (2D patches of ACDC / KiTS19): scores are per 3D volume, the unit raylearn queries
(distance transforms, cosine, Dice and Hausdorff over the whole volume), averaged over foreground classes; HD is
in voxels of the resampled grid (its unit cancels in the pool normalisation); ``Q_cos`` is read as the cosine
*distance* (see :mod:`raylearn.scoring.sbc` for why the printed formula looks like a typo).
"""

from __future__ import annotations

import numpy as np

from raylearn.scoring.sbc import consistency_score
from raylearn.strategies.base import PoolView, QueryStrategy, register_strategy

__all__ = ["SBC"]


@register_strategy("sbc")
class SBC(QueryStrategy):
    """Top-K by SBC-AL's consistency score CS (needs ``model.arch: sbc_unet``).

    Args:
        w_cos: weight of ``Q_cos`` in SCS (paper 0.6).
        w_dice: weight of ``Q_dice`` in SCS (paper 0.4).
        w_structure: weight of SCS in CS (paper 0.8).
        w_boundary: weight of BCS (the pool-normalised Hausdorff distance) in CS (paper 0.2).
        random_state: seed of the tie-break among equal scores.
    """

    requires = frozenset({"sbc_consistency"})

    def __init__(self, *, w_cos: float = 0.6, w_dice: float = 0.4, w_structure: float = 0.8,
                 w_boundary: float = 0.2, random_state: int | None = 0) -> None:
        self.w_cos = w_cos
        self.w_dice = w_dice
        self.w_structure = w_structure
        self.w_boundary = w_boundary
        self.random_state = random_state

    def check_params(self) -> None:
        names = ("w_cos", "w_dice", "w_structure", "w_boundary")
        for name in names:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not np.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.w_structure == 0 and self.w_boundary == 0:
            raise ValueError("w_structure and w_boundary are both 0: every case would score the same")
        if self.w_structure > 0 and self.w_cos == 0 and self.w_dice == 0:
            raise ValueError("w_cos and w_dice are both 0 while w_structure > 0: SCS would be 0 for every case")

    def scores(self, pool: PoolView) -> np.ndarray:
        """CS of the unlabelled cases, ``float64 [U]`` in :attr:`PoolView.unlabeled_index` order."""
        comp = np.asarray(pool.features["sbc_consistency"], dtype=np.float64)
        if comp.ndim != 2 or comp.shape[1] != 3:
            raise ValueError(f"{self.name}: sbc_consistency must be [N, 3] (Q_cos, Q_dice, HD), got {comp.shape}")
        return consistency_score(comp[pool.unlabeled_index], self.w_cos, self.w_dice, self.w_structure,
                                 self.w_boundary)

    def _select(self, pool: PoolView, budget: int) -> np.ndarray:
        self.check_params()
        unl = pool.unlabeled_index
        cs = self.scores(pool)
        perm = self._rng().permutation(len(unl))  # ties in a seeded random order
        order = perm[np.argsort(-cs[perm], kind="stable")]
        return unl[order[:budget]]
