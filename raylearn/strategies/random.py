"""Random baselines: uniform random and nnActive's foreground-aware random variants.

nnActive (Lüth, Traub et al., TMLR 2025, arXiv 2511.19183) found that no AL method reliably beat a random
baseline that knows where the foreground is. Its variants, in MIC-DKFZ/nnActive (read, not copied):

- ``random-label`` ("Random 66% FG", ``nnactive/strategies/randomlabel.py`` lines 97-266): each query draws its
  kind from ``all / seg / border`` uniformly; ``all`` is a uniformly random region, ``seg`` and ``border`` are
  centred on a random voxel (or class-border voxel) of a random foreground class present in the image, using the
  simulated annotator's ground truth (``raw_labels_path`` "a fully annotated dataset", line 55);
- ``random-label2`` ("Random 33% FG", ``randomlabel2.py`` lines 12-16): kinds ``all`` x4, ``seg``, ``border``;
- ``...-all-classes`` (``nnactive/strategies/utils.py`` lines 200-338, used for the starting budget): first
  ``num_per_label`` queries containing each class, the class present in the fewest images first;
- images are visited in one shuffled order, cycling (``random.py`` lines 53-56 and 68).

With ``unit: volume`` raylearn queries whole volumes, where "a region centred on foreground" becomes "a case that
contains foreground" (and ``border`` the same as ``seg``): when every case contains every class (hippocampus), these
variants choose like uniform random, by construction. With ``unit: patch`` (nnActive's setting) or ``unit: slice``
the unit is a fixed tile or slice and ``seg`` / ``border`` become "a unit that contains ground-truth foreground"
(``label_class_voxels`` counted per unit); a tile is not re-centred on the chosen voxel as nnActive's free-placed
patches are.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np

from raylearn.strategies.base import PoolView, QueryStrategy, configurable_requires, register_strategy

logger = logging.getLogger(__name__)

__all__ = ["ForegroundRandom", "ForegroundRandom33", "RandomStrategy", "fg_aware_random"]


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


#: query kinds of nnActive's foreground-aware random variants (drawn uniformly per query)
VARIANT_KINDS: dict[str, tuple[str, ...]] = {
    "nnactive66": ("all", "seg", "border"),
    "nnactive33": ("all", "all", "all", "all", "seg", "border"),
}
VARIANTS = (*VARIANT_KINDS, "predicted_cover")


def fg_aware_random(
    class_voxels: np.ndarray,
    candidates: np.ndarray,
    budget: int,
    kinds: tuple[str, ...],
    rng: np.random.Generator,
    all_classes: bool = False,
    num_per_label: int = 2,
) -> np.ndarray:
    """nnActive's foreground-aware random at case level.

    Args:
        class_voxels: ``[N, K-1]`` ground-truth voxels of each foreground class per case.
        candidates: ``int [U]`` eligible positions (unlabelled cases).
        budget: cases to pick (``<= U``).
        kinds: query kinds drawn uniformly per pick: ``all`` (any case) or ``seg`` / ``border`` (a case with
            foreground; when none is left, any case).
        rng: generator (shuffled visiting order, per-class shuffles, kind draws).
        all_classes: first pick ``num_per_label`` cases containing each class, the class in the fewest
            candidates first (a class with fewer cases gives what it has).
        num_per_label: cases per class for ``all_classes``.

    Returns:
        ``int [budget]`` positions in pick order.
    """
    vox = np.asarray(class_voxels, dtype=np.float64).reshape(len(class_voxels), -1)
    order = rng.permutation(np.asarray(candidates, dtype=np.int64))
    picked: list[int] = []
    taken: set[int] = set()
    if all_classes:
        files = {c: [int(i) for i in order if vox[i, c] > 0] for c in range(vox.shape[1])}
        while files and len(picked) < budget:
            cls = min(files, key=lambda c: len(files[c]))  # fewest cases first; ties: lower class first
            cases = files.pop(cls)
            rng.shuffle(cases)
            got = 0
            for i in cases:
                if got == num_per_label or len(picked) == budget:
                    break
                if i not in taken:
                    picked.append(i)
                    taken.add(i)
                    got += 1
            if got < num_per_label and len(picked) < budget:
                logger.info("fg_random: class %d is in only %d unlabelled case(s); wanted %d", cls + 1, got,
                            num_per_label)
    has_fg = (vox > 0).any(axis=1)
    pos = 0
    n = len(order)
    while len(picked) < budget:
        kind = kinds[int(rng.integers(len(kinds)))]
        need_fg = kind != "all" and any(has_fg[i] and int(i) not in taken for i in order)
        for step in range(n):
            i = int(order[(pos + step) % n])
            if i in taken or (need_fg and not has_fg[i]):
                continue
            picked.append(i)
            taken.add(i)
            pos = (pos + step + 1) % n
            break
    return np.asarray(picked, dtype=np.int64)


@register_strategy("fg_random")
class ForegroundRandom(QueryStrategy):
    """Foreground-aware random: nnActive's variants (default: "Random 66% FG"), or the earlier predicted-cover rule.

    Variants:

    - ``nnactive66`` / ``nnactive33``: per pick, with probability 2/3 (1/3) a case containing ground-truth
      foreground, else any case, visiting the unlabelled cases in one shuffled order (see the module docstring
      and :func:`fg_aware_random`). Needs ``label_class_voxels`` (the store's ground truth; simulated oracle),
      so it also works as a cold start (no model needed); ``all_classes: true`` is nnActive's starting-budget
      form (``num_per_label`` cases per class first).
    - ``predicted_cover``: raylearn's earlier ``fg_random``: random among unlabelled cases whose *predicted*
      volume (``fg_volume [K-1]``) is at least ``min_voxels`` for every class, filled at random when too few are.

    Args:
        variant: ``nnactive66``, ``nnactive33`` or ``predicted_cover``.
        all_classes: nnActive variants: cover every class ``num_per_label`` times first.
        num_per_label: see ``all_classes`` (nnActive: 2).
        min_voxels: ``predicted_cover``: least predicted voxels per class for a case to count as covering it.
        random_state: seed.
    """

    requires = configurable_requires(frozenset({"label_class_voxels"}))
    default_variant = "nnactive66"

    def __init__(
        self,
        *,
        variant: Literal["nnactive66", "nnactive33", "predicted_cover"] | None = None,
        all_classes: bool = False,
        num_per_label: int = 2,
        min_voxels: float = 1.0,
        random_state: int | None = 0,
    ) -> None:
        self.variant = variant
        self.all_classes = all_classes
        self.num_per_label = num_per_label
        self.min_voxels = min_voxels
        self.random_state = random_state

    def _variant(self) -> str:
        return self.default_variant if self.variant is None else self.variant

    def required_features(self) -> frozenset[str]:
        return frozenset({"fg_volume"} if self._variant() == "predicted_cover" else {"label_class_voxels"})

    def check_params(self) -> None:
        if self._variant() not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if not isinstance(self.all_classes, bool):
            raise ValueError(f"all_classes must be true or false, got {self.all_classes!r}")
        if isinstance(self.num_per_label, bool) or not isinstance(self.num_per_label, int) or self.num_per_label < 1:
            raise ValueError(f"num_per_label must be an integer >= 1, got {self.num_per_label!r}")
        if self.all_classes and self._variant() == "predicted_cover":
            raise ValueError("all_classes applies to the nnactive variants only, not to predicted_cover")

    def _select(self, pool: PoolView, budget: int) -> np.ndarray:
        self.check_params()
        rng = self._rng()
        unl = pool.unlabeled_index
        variant = self._variant()
        if variant != "predicted_cover":
            vox = np.asarray(pool.features["label_class_voxels"], dtype=np.float64).reshape(len(pool.ids), -1)
            return fg_aware_random(vox, unl, budget, VARIANT_KINDS[variant], rng, self.all_classes,
                                   self.num_per_label)
        vol = np.asarray(pool.features["fg_volume"], dtype=np.float64)
        vol = vol.reshape(len(pool.ids), -1)[unl]
        covers = (vol >= self.min_voxels).all(axis=1)
        eligible, others = unl[covers], unl[~covers]
        if len(eligible) >= budget:
            return rng.choice(eligible, size=budget, replace=False)
        logger.info("fg_random: only %d of %d wanted cases cover every class; filling at random", len(eligible), budget)
        fill = rng.choice(others, size=budget - len(eligible), replace=False)
        return np.concatenate([rng.permutation(eligible), fill])


@register_strategy("fg_random33")
class ForegroundRandom33(ForegroundRandom):
    """nnActive's "Random 33% FG" (``random-label2``): :class:`ForegroundRandom` with ``variant: nnactive33`` by
    default, registered under its own name so ``compare`` can run it beside ``fg_random``."""

    default_variant = "nnactive33"
