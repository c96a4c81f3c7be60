"""STAR (seed paper 002, MICCAI 2025) at slice level, and the evenly spaced slice baseline.

Runs with ``unit: slice`` query single slices ``"<case>@<axis>:<index>"`` (:mod:`raylearn.units`). STAR:

1. initial labels every ``spacing``-th slice (``j``, 10 by default) of every case: indices ``0, j, 2j, ...``;
2. the slices of a case fall into groups of ``j + 1`` slices ``[g j, (g + 1) j]`` (both ends on the initial grid;
   the last group ends at the case's last slice), see :func:`group_of`;
3. after each round's labels, :meth:`Star.propagate` trains (fine-tunes from its checkpoint) the spatial
   cross-attention network of :mod:`raylearn.models.star` on the annotated slices, predicts a pseudo-label for every
   unlabelled slice of a group from the group's labelled slices, keeps the ``n_pseudo`` lowest-entropy ones and
   scores each unlabelled slice ``1 - mean cosine similarity`` of its ``f_U`` features to its group's labelled
   slices (the loop hands the scores back as the feature ``propagation_score``);
4. :meth:`Star.select` queries, group by group, the slice least similar to its labelled neighbours (highest
   ``propagation_score``), best groups first, one slice per group before a second.

Where this follows the authors' code (HelenMa9998/STAR, read, not copied) rather than the paper's text: the
similarity is the per-position cosine of concatenated multi-scale features averaged over positions and labelled
slices; the kept pseudo-labels are the ``N`` (the code: 100) lowest-entropy ones over the whole pool. Where it
departs: the code compares the query slice's ``f_U`` features with the labelled slices' ``f_L`` features; here
both sides are ``f_U`` features (one feature space for the similarity of the *images*); the code ranks all
slices globally, the issue (and the paper's text) asks for one query per group, which is what :meth:`Star.select`
does.

``even_slices`` is the paper's "evenly spaced" baseline and STAR's cold start: the unlabelled grid slices first
(round-robin over cases, farthest from a case's labelled slices first), then the slice farthest from any labelled
slice of its case, over the whole pool (halving the largest gaps).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np

from raylearn.strategies.base import PoolView, QueryStrategy, register_strategy
from raylearn.units import PropagationContext, PropagationResult, is_slice_id, parse_unit

if TYPE_CHECKING:
    from raylearn.models.star_train import StarTrainParams

logger = logging.getLogger(__name__)

__all__ = ["EvenSlices", "Star", "grid_slices", "group_bounds", "group_of", "pool_slices", "star_order"]

#: the feature the loop fills from :attr:`raylearn.units.PropagationResult.unit_scores`
PROPAGATION_FEATURE = "propagation_score"


def _positive_int(name: str, v: object, low: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")


def grid_slices(n: int, spacing: int) -> np.ndarray:
    """The initial slice indices of a case with ``n`` slices: ``0, j, 2j, ... < n`` (``int [ceil(n / j)]``)."""
    _positive_int("n", n)
    _positive_int("spacing", spacing)
    return np.arange(0, n, spacing, dtype=np.int64)


def group_of(n: int, spacing: int) -> np.ndarray:
    """Group index of every slice of a case with ``n`` slices (``int [n]``).

    Group ``g`` spans slices ``[g j, min((g + 1) j, n - 1)]`` (``j + 1`` slices, both ends on the grid; neighbouring
    groups share their end slice). A slice is assigned to the group it starts or lies inside; the last slice to the
    last group.
    """
    _positive_int("n", n)
    _positive_int("spacing", spacing)
    n_groups = max(1, -(-(n - 1) // spacing))
    return np.minimum(np.arange(n) // spacing, n_groups - 1).astype(np.int64)


def group_bounds(n: int, spacing: int) -> np.ndarray:
    """``int [G, 2]`` first and last slice (inclusive) of every group of a case with ``n`` slices."""
    n_groups = int(group_of(n, spacing)[-1]) + 1
    starts = np.arange(n_groups, dtype=np.int64) * spacing
    return np.stack([starts, np.minimum(starts + spacing, n - 1)], axis=1)


def pool_slices(pool: PoolView, who: str) -> tuple[list[str], dict[str, np.ndarray], dict[str, int]]:
    """Split a slice-unit pool by case.

    A bare case id (a volume unit) counts as a case of one slice: on a volume pool the slice strategies degrade to
    "one unit per case" (evenly spaced = every case, in a seeded random order) and log a warning.

    Returns:
        cases in pool order of first appearance; case -> ``int [n_c]`` positions into ``pool.ids`` ordered by slice
        index (``-1`` where the pool lacks that slice); case -> slice count ``n_c`` (largest index + 1).

    Raises:
        ValueError: the pool mixes slice axes.
    """
    by_case: dict[str, list[tuple[int, int]]] = defaultdict(list)
    axes: set[int] = set()
    n_volumes = 0
    for pos, uid in enumerate(pool.ids):
        uid = str(uid)
        if is_slice_id(uid):
            u = parse_unit(uid)
            axes.add(u.axis)
            by_case[u.case].append((u.index, pos))
        else:
            n_volumes += 1
            by_case[uid].append((0, pos))
    if len(axes) > 1:
        raise ValueError(f"{who}: the pool mixes slice axes {sorted(axes)}; one axis per run")
    if n_volumes:
        logger.warning("%s queries slices, but %d pool unit(s) are whole volumes (run with 'unit: slice'); each "
                       "volume counts as one slice", who, n_volumes)
    cases = list(by_case)
    positions, sizes = {}, {}
    for c in cases:
        n = max(i for i, _ in by_case[c]) + 1
        arr = np.full(n, -1, dtype=np.int64)
        for i, pos in by_case[c]:
            if arr[i] >= 0:
                raise ValueError(f"{who}: case {c!r} appears both as a volume and as slice 0")
            arr[i] = pos
        positions[c], sizes[c] = arr, n
    return cases, positions, sizes


def _even_order(pool: PoolView, spacing: int, budget: int, rng: np.random.Generator, who: str,
                skip: set[int] | None = None) -> list[int]:
    """Positions of ``budget`` unlabelled slices in the evenly spaced order (see the module docstring); ``skip``:
    positions already chosen (counted as labelled)."""
    cases, positions, sizes = pool_slices(pool, who)
    labelled = pool.labeled_mask.copy()
    for p in skip or ():
        labelled[p] = True
    order = [cases[i] for i in rng.permutation(len(cases))]
    dist: dict[str, np.ndarray] = {}
    has_labels: dict[str, bool] = {}
    for c in order:
        pos, n = positions[c], sizes[c]
        lab = np.flatnonzero((pos >= 0) & labelled[np.maximum(pos, 0)])
        idx = np.arange(n)
        # distance to the nearest labelled slice; none labelled: prefer the centre (larger = better)
        d = (np.abs(idx[:, None] - lab[None, :]).min(axis=1).astype(np.float64) if len(lab)
             else n - np.abs(idx - (n - 1) / 2.0))
        d[(pos < 0) | labelled[np.maximum(pos, 0)]] = -np.inf
        dist[c], has_labels[c] = d, bool(len(lab))
    picked: list[int] = []

    def take(c: str, i: int) -> None:
        picked.append(int(positions[c][i]))
        d = dist[c]
        avail = np.isfinite(d)
        new = np.abs(np.arange(sizes[c]) - i).astype(np.float64)
        d[avail] = np.minimum(d[avail], new[avail]) if has_labels[c] else new[avail]
        d[i] = -np.inf
        has_labels[c] = True

    # phase 1: grid slices, round-robin over cases, the farthest from the case's labelled slices first
    while len(picked) < budget:
        progressed = False
        for c in order:
            if len(picked) == budget:
                break
            grid = grid_slices(sizes[c], spacing)
            d = dist[c][grid]
            if not np.isfinite(d).any():
                continue
            take(c, int(grid[int(np.argmax(d))]))
            progressed = True
        if not progressed:
            break
    # phase 2: the slice farthest from any labelled slice of its case, over the pool (ties: case order, lower index)
    while len(picked) < budget:
        best_c, best_i, best_d = None, -1, -np.inf
        for c in order:
            i = int(np.argmax(dist[c]))
            if dist[c][i] > best_d:
                best_c, best_i, best_d = c, i, dist[c][i]
        if best_c is None:
            break
        take(best_c, best_i)
    return picked


@register_strategy("even_slices")
class EvenSlices(QueryStrategy):
    """Evenly spaced slices: every ``spacing``-th slice of each case first, then the centres of the largest gaps.

    The paper's "evenly spaced" baseline and STAR's cold start (``cold_start: {strategy: even_slices}``).

    Args:
        spacing: ``j``, slices between grid slices (the paper: 10).
        random_state: seed of the case order (round-robin and ties).
    """

    requires = frozenset()
    units = frozenset({"slice"})

    def __init__(self, *, spacing: int = 10, random_state: int | None = 0) -> None:
        self.spacing = spacing
        self.random_state = random_state

    def check_params(self) -> None:
        _positive_int("spacing", self.spacing)

    def _select(self, pool: PoolView, budget: int) -> np.ndarray:
        self.check_params()
        return np.asarray(_even_order(pool, self.spacing, budget, self._rng(), self.name), dtype=np.int64)


def star_order(pool: PoolView, scores: np.ndarray, spacing: int, budget: int, rng: np.random.Generator,
               who: str = "star") -> list[int]:
    """STAR's query order: unlabelled grid slices first (as :class:`EvenSlices`), then per group the unlabelled
    slice with the highest score (least similar to the group's labelled slices), groups with the best such slice
    first, one slice per group before any group gets a second; slices without a finite score last, evenly spaced.

    Args:
        pool: a slice-unit pool.
        scores: ``float [N]`` aligned with ``pool.ids`` (``propagation_score``; NaN = not scored).
        spacing: ``j``.
        budget: slices to pick.
        rng: case order of the evenly spaced parts.
        who: the strategy's name, for errors.

    Returns:
        ``budget`` positions into ``pool.ids`` (fewer only if the pool has fewer unlabelled slices).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != pool.ids.shape:
        raise ValueError(f"{who}: {PROPAGATION_FEATURE} must be [N] = {pool.ids.shape}, got {scores.shape}")
    cases, positions, sizes = pool_slices(pool, who)
    unl = ~pool.labeled_mask
    grid = [int(positions[c][i]) for c in cases for i in grid_slices(sizes[c], spacing) if positions[c][i] >= 0]
    picked = _even_order(pool, spacing, min(budget, sum(bool(unl[p]) for p in grid)), rng, who)
    # per group: its unlabelled scored slices, best first (ties: lower slice index)
    queues: list[list[tuple[float, int]]] = []
    for c in cases:
        pos, groups = positions[c], group_of(sizes[c], spacing)
        for g in range(int(groups[-1]) + 1):
            members = [int(pos[i]) for i in np.flatnonzero(groups == g) if pos[i] >= 0]
            q = [(-scores[p], p) for p in members if unl[p] and np.isfinite(scores[p]) and p not in picked]
            if q:
                queues.append(sorted(q))
    taken = set(picked)
    while len(picked) < budget and queues:
        queues.sort(key=lambda q: q[0])  # the group whose best remaining slice scores highest first
        for q in list(queues):
            if len(picked) == budget:
                break
            _, p = q.pop(0)
            picked.append(p)
            taken.add(p)
        queues = [q for q in queues if q]
    if len(picked) < budget:
        n_missing = budget - len(picked)
        logger.info("%s: %d slice(s) have no %s (their group has no labelled slice yet); evenly spaced instead",
                    who, n_missing, PROPAGATION_FEATURE)
        picked += _even_order(pool, spacing, n_missing, rng, who, skip=taken)
    return picked


@register_strategy("star")
class Star(QueryStrategy):
    """STAR: query the slice of each group least similar to its labelled slices; pseudo-label the rest.

    Selection reads the loop-supplied feature ``propagation_score`` (``1 -`` mean cosine similarity, from
    :meth:`propagate`); before any propagation (or for groups without a labelled slice) it falls back to the
    evenly spaced order, so ``star`` is also its own cold start.

    Args:
        spacing: ``j``: initial labels every ``j``-th slice, groups of ``j + 1`` slices (the paper: 10).
        n_pseudo: pseudo-labelled slices kept per round, the lowest-entropy ones (the code: 100).
        drop_blank_pseudo: leave out candidates whose pseudo-label has no foreground voxel before ranking (the
            authors' ``Data.delete_black_patch``, which their ``main.py`` does not call; off by default, as there).
            On small structures the lowest-entropy slices are the blank ones: in the hippocampus benchmark every
            kept pseudo-label of the default was all background.
        backbone: ``small`` (CPU default), ``resnet18`` or ``resnet50`` (the paper's).
        width: ``small`` backbone's base channels (``D = 8 width``).
        decoder_dim: decoder channels (None: 256 for ResNets as the code, ``4 width`` for ``small``).
        stage1_steps: optimiser steps of stage 1 (focal loss on labelled slices) per round.
        stage2_steps: optimiser steps of stage 2 (propagation between nearest labelled slices) per round.
        batch_size: slices / slice pairs per step (the code: 2).
        lr1: stage-1 Adam learning rate (the code: 1e-4).
        lr2: stage-2 Adam learning rate (the code: 5e-5).
        focal_gamma: focal loss gamma (the code: 2).
        focal_alpha: MONAI focal loss alpha (None: off; see :mod:`raylearn.models.star`).
        reinit_label_encoder: copy ``f_U`` into ``f_L`` before each stage 2 (the code does).
        chunk: slices per inference batch.
        torch_threads: torch intra-op threads while :meth:`propagate` runs (restored after); None leaves torch's
            setting. On a shared CPU machine 1 can be far faster (measured on 2 oversubscribed cores, load ~15:
            0.07 s per training step with 1 thread, 6 s with 2).
        random_state: seed of the evenly spaced parts' case order.
    """

    #: ``propagation_score`` is not required: the loop adds it to the view once a stage has run, and until then
    #: (and for groups it did not score) the selection is evenly spaced
    requires = frozenset()
    units = frozenset({"slice"})

    def __init__(self, *, spacing: int = 10, n_pseudo: int = 100, drop_blank_pseudo: bool = False,
                 backbone: str = "small", width: int = 16,
                 decoder_dim: int | None = None, stage1_steps: int = 200, stage2_steps: int = 200,
                 batch_size: int = 2, lr1: float = 1e-4, lr2: float = 5e-5, focal_gamma: float = 2.0,
                 focal_alpha: float | None = None, reinit_label_encoder: bool = True, chunk: int = 32,
                 torch_threads: int | None = None, random_state: int | None = 0) -> None:
        self.spacing = spacing
        self.n_pseudo = n_pseudo
        self.drop_blank_pseudo = drop_blank_pseudo
        self.backbone = backbone
        self.width = width
        self.decoder_dim = decoder_dim
        self.stage1_steps = stage1_steps
        self.stage2_steps = stage2_steps
        self.batch_size = batch_size
        self.lr1 = lr1
        self.lr2 = lr2
        self.focal_gamma = focal_gamma
        self.focal_alpha = focal_alpha
        self.reinit_label_encoder = reinit_label_encoder
        self.chunk = chunk
        self.torch_threads = torch_threads
        self.random_state = random_state

    def check_params(self) -> None:
        _positive_int("spacing", self.spacing)
        _positive_int("n_pseudo", self.n_pseudo, low=0)
        if self.torch_threads is not None:
            _positive_int("torch_threads", self.torch_threads)
        _positive_int("width", self.width, low=2)
        _positive_int("chunk", self.chunk)
        if self.decoder_dim is not None:
            _positive_int("decoder_dim", self.decoder_dim)
        if self.backbone not in ("small", "resnet18", "resnet50"):
            raise ValueError(f"backbone must be one of small, resnet18, resnet50, got {self.backbone!r}")
        if not isinstance(self.drop_blank_pseudo, bool):
            raise ValueError(f"drop_blank_pseudo must be true or false, got {self.drop_blank_pseudo!r}")
        if not isinstance(self.reinit_label_encoder, bool):
            raise ValueError(f"reinit_label_encoder must be true or false, got {self.reinit_label_encoder!r}")
        self.train_params()  # validates steps, batch size, learning rates, focal settings

    def train_params(self) -> StarTrainParams:
        """The two-stage training settings as :class:`raylearn.models.star_train.StarTrainParams`."""
        from raylearn.models.star_train import StarTrainParams

        return StarTrainParams(stage1_steps=self.stage1_steps, stage2_steps=self.stage2_steps,
                               batch_size=self.batch_size, lr1=self.lr1, lr2=self.lr2, focal_gamma=self.focal_gamma,
                               focal_alpha=self.focal_alpha, reinit_label_encoder=self.reinit_label_encoder)

    def _select(self, pool: PoolView, budget: int) -> np.ndarray:
        self.check_params()
        scores = pool.features.get(PROPAGATION_FEATURE)
        if scores is None:
            scores = np.full(len(pool.ids), np.nan)
        return np.asarray(star_order(pool, scores, self.spacing, budget, self._rng(), self.name), dtype=np.int64)

    def propagate(self, ctx: PropagationContext) -> PropagationResult:
        """Train the propagation network on the annotated slices and pseudo-label the groups' unlabelled slices.

        See :func:`raylearn.models.star_propagate.run_propagation` (torch, imported here so that selection stays
        numpy-only).
        """
        from raylearn.models.star_propagate import run_propagation

        self.check_params()
        return run_propagation(self, ctx)
