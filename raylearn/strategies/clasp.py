"""ClaSP PE: Class-stratified Scheduled Power Predictive Entropy (Lüth, Traub et al., "Finally Outshining the
Random Baseline", TMLR 2026, arXiv 2601.13677), the query method that beat nnActive's foreground-aware random
baselines.

Checked against the authors' code, MIC-DKFZ/nnActive (read, not copied; line numbers of the GitHub snapshot):

- ``nnactive/strategies/entropy_balanced.py``: ``class_power_pe66_exp`` is ClaSP PE (the name
  ``analyze_results/setup.py`` line 27 gives it). Scores per stratum (lines 56-71 and 330-353): for every
  foreground class ``c`` the region mean of ``H * p_c``, plus one unstratified stratum (key ``-1``) with the mean
  of ``H``; each stratum's scores are power-noised independently with the round's ``beta``. Budget split (lines
  234-271): ``n_cls = int(budget * 0.66)`` over the classes, ``n_cls // n_classes`` each and the remainder to
  randomly shuffled classes, the other ``budget - n_cls`` to the unstratified stratum.
- ``nnactive/strategies/utils.py`` lines 162-187: ``power_noising`` = ``log(score) + Gumbel(0, 1 / beta)`` and
  ``exponential_schedule(n, a, b) = a * (b / a) ** linspace(0, 1, n)`` with ``a = 1, b = 100``, ``n =
  query_steps``, indexed by the loop (``entropy_balanced.py`` line 328/350); ``sigmoid_schedule`` (lines 190-197)
  is the paper's ablation.
- ``nnactive/strategies/uncertainties.py`` lines 109-135: the class maps are ``H * p_c`` with ``H`` the entropy
  of the (fold-averaged) softmax; ``nnactive/aggregations/convolution.py``: the region score is a mean.
- ``nnactive/cli/subcommands/run_al_loops.py`` lines 83-143 and ``nnactive/query_pool.py`` line 29: training
  loops ``0 .. query_steps - 1``, a query after every loop but the last, with ``loop_val`` = that loop. raylearn's
  cold start + ``R`` query rounds is ``query_steps = R + 1`` trainings, and query round ``r`` is ``loop_val =
  r - 1``: ``beta_r = 100 ** ((r - 1) / R)``, from 1 (diverse) towards 100 (near top-k).

Units: with ``unit: volume`` a query is a whole case and the region mean is the volume mean; with ``unit: {kind:
patch, size: [d, h, w]}`` (nnActive's setting) a query is one 3D patch and the region mean is the patch mean (the
shards reduce the class maps per patch); ``unit: slice`` works the same way on slices.

Deviations (one model; fixed patch grid):

- nnActive places each query patch anywhere in the image (the best window of its aggregated score map, then
  non-overlapping with earlier picks); raylearn's patches are the fixed tiles of :func:`raylearn.units.patch_boxes`
  (near-equal boxes of at most the configured size), which never overlap, so every tile is a candidate. nnActive
  resolves a region wanted by two strata in a random class order (``entropy_balanced.py`` lines 100-127); here the
  strata pick in turns (round robin: the classes in a random order, then the unstratified stratum), each taking its
  best noised score among the units not yet taken, until every quota is met (for whole volumes, nnActive's rule would
  hand each case to one random stratum and undo the stratification).
- nnActive averages the softmax of its 5 fold models; raylearn trains one segmenter per round, so ``H`` is the
  entropy of that model's softmax.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np

from raylearn.strategies.base import PoolView, QueryStrategy, register_strategy

logger = logging.getLogger(__name__)

__all__ = [
    "ClaSPPE",
    "beta_for_round",
    "exponential_schedule",
    "power_noising",
    "sigmoid_schedule",
    "stratified_select",
    "stratum_quotas",
]

SCHEDULES = ("exponential", "sigmoid", "constant", "none")


def exponential_schedule(n_steps: int, start: float = 1.0, end: float = 100.0) -> np.ndarray:
    """``start * (end / start) ** linspace(0, 1, n_steps)``: geometric steps from ``start`` to ``end``.

    Returns:
        ``float64 [n_steps]``; ``[start]`` when ``n_steps == 1``.
    """
    if n_steps < 1:
        raise ValueError(f"exponential_schedule: n_steps must be >= 1, got {n_steps}")
    if start <= 0 or end <= 0:
        raise ValueError(f"exponential_schedule: start and end must be > 0, got {start}, {end}")
    return start * (end / start) ** np.linspace(0.0, 1.0, n_steps)


def sigmoid_schedule(n_steps: int, start: float = 1.0, end: float = 100.0, temperature: float = 2.0) -> np.ndarray:
    """A logistic ramp from ``start`` to ``end``: ``sigmoid(linspace(-6, 6, n) / T)`` rescaled to the two ends
    (higher ``temperature`` = smoother; nnActive's ablations use ``T = 2`` and ``T = 0.5``).

    Returns:
        ``float64 [n_steps]``; ``[start]`` when ``n_steps == 1``.
    """
    if n_steps < 1:
        raise ValueError(f"sigmoid_schedule: n_steps must be >= 1, got {n_steps}")
    if temperature <= 0:
        raise ValueError(f"sigmoid_schedule: temperature must be > 0, got {temperature}")
    if n_steps == 1:
        return np.array([float(start)])
    sig = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, n_steps) / temperature))
    return start + (end - start) * (sig - sig.min()) / (sig.max() - sig.min())


def beta_for_round(
    schedule: str,
    round_index: int,
    query_steps: int,
    start: float = 1.0,
    end: float = 100.0,
    temperature: float = 2.0,
) -> float | None:
    """The power-noising ``beta`` of query round ``round_index`` (1-based) in nnActive's loop numbering.

    Args:
        schedule: ``exponential`` (ClaSP PE), ``sigmoid``, ``constant`` (``start`` every round: ClaP PE with
            ``beta = 1``) or ``none`` (no noise: nnActive's ``class_pe66``).
        round_index: query round, ``1 .. query_steps - 1``.
        query_steps: trainings in the experiment (cold start + query rounds).

    Returns:
        ``beta`` (> 0), or None for ``none``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    if schedule == "none":
        return None
    if schedule == "constant":
        return float(start)
    if not 1 <= round_index <= query_steps - 1:
        raise ValueError(f"query round {round_index} is outside 1..{query_steps - 1} (query_steps={query_steps})")
    if schedule == "exponential":
        return float(exponential_schedule(query_steps, start, end)[round_index - 1])
    return float(sigmoid_schedule(query_steps, start, end, temperature)[round_index - 1])


def power_noising(scores: np.ndarray, beta: float | None, rng: np.random.Generator) -> np.ndarray:
    """Log-scale power noising: ``log(score) + Gumbel(0, 1 / beta)``; taking the top-k of the result samples
    without replacement with probability proportional to ``score ** beta``.

    Args:
        scores: ``[M]`` non-negative scores (0 becomes ``-inf``: never preferred to a positive score).
        beta: inverse noise scale (> 0); None returns ``log(score)`` without drawing noise.
        rng: generator of the Gumbel draws (one per score).

    Returns:
        ``float64 [M]``.
    """
    s = np.asarray(scores, dtype=np.float64)
    if (s < 0).any():
        raise ValueError("power_noising: scores must be non-negative")
    with np.errstate(divide="ignore"):
        out = np.log(s)
    if beta is None:
        return out
    if not beta > 0:
        raise ValueError(f"power_noising: beta must be > 0, got {beta}")
    return out + rng.gumbel(0.0, 1.0 / beta, size=s.shape)


def stratum_quotas(budget: int, n_classes: int, fg_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """How many cases each stratum selects.

    ``int(budget * fg_ratio)`` cases are shared by the foreground classes, ``n // n_classes`` each, the remainder
    one each to classes chosen at random; the rest goes to the unstratified stratum.

    Returns:
        ``int64 [1 + n_classes]``: index 0 the unstratified stratum, index ``c`` class ``c``; sums to ``budget``.
    """
    if n_classes < 1:
        raise ValueError(f"stratum_quotas: need at least one foreground class, got {n_classes}")
    n_cls = int(budget * fg_ratio)
    quotas = np.zeros(1 + n_classes, dtype=np.int64)
    quotas[0] = budget - n_cls
    quotas[1:] = n_cls // n_classes
    extra = rng.permutation(np.arange(1, n_classes + 1))[: n_cls % n_classes]
    quotas[extra] += 1
    return quotas


def stratified_select(keys: np.ndarray, quotas: np.ndarray, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Strata take turns: each in ``order`` with quota left takes its highest-key case not yet taken.

    Args:
        keys: ``[U, S]`` (noised) scores of the ``U`` candidates for each of ``S`` strata.
        quotas: ``int [S]`` cases per stratum; ``sum <= U``.
        order: the strata's turn order (a permutation of ``0..S-1``).
        rng: tie-break (equal keys are ranked in a random order).

    Returns:
        ``int [sum(quotas)]`` candidate rows, in pick order.
    """
    keys = np.asarray(keys, dtype=np.float64)
    n, s = keys.shape
    quotas = np.asarray(quotas, dtype=np.int64).copy()
    if quotas.shape != (s,) or (quotas < 0).any() or quotas.sum() > n:
        raise ValueError(f"stratified_select: quotas {quotas.tolist()} do not fit {n} candidates in {s} strata")
    perm = rng.permutation(n)
    ranked = [perm[np.argsort(-keys[perm, j], kind="stable")] for j in range(s)]
    pointer = np.zeros(s, dtype=np.int64)
    taken = np.zeros(n, dtype=bool)
    picks: list[int] = []
    while quotas.sum() > 0:
        for j in order:
            if quotas[j] == 0:
                continue
            while taken[ranked[j][pointer[j]]]:
                pointer[j] += 1
            row = int(ranked[j][pointer[j]])
            taken[row] = True
            picks.append(row)
            quotas[j] -= 1
    return np.asarray(picks, dtype=np.int64)


@register_strategy("clasp_pe")
class ClaSPPE(QueryStrategy):
    """ClaSP PE on volumes, patches or slices (see the module docstring for the nnActive source and deviations).

    Per query round ``r`` of ``R``: every stratum's scores (``class_entropy [K]``: the unit's mean of ``H`` and of
    ``H * p_c`` for each foreground class ``c``) get log-scale power noise with ``beta_r`` from the schedule;
    ``int(budget * fg_ratio)`` units are shared by the foreground classes (each class's best units by its own
    noised score, so rare structures are covered) and the rest go to the best units by noised ``H``.

    The round comes from the pool view (``PoolView.round_index`` / ``n_rounds``, set by the loop); the schedule
    runs over ``query_steps = n_rounds + 1`` trainings as in nnActive, unless ``query_steps`` is given.

    Args:
        fg_ratio: share of the budget stratified over the foreground classes (nnActive: 0.66).
        schedule: ``exponential`` (ClaSP PE), ``sigmoid``, ``constant`` or ``none`` (see :func:`beta_for_round`).
        beta_start: ``beta`` of the first query round (nnActive: 1).
        beta_end: ``beta`` the schedule tends to (nnActive: 100; reached only at the step after the last query).
        temperature: smoothness of the ``sigmoid`` schedule (nnActive's ablations: 2 smooth, 0.5 sharp).
        query_steps: override of the schedule length (trainings incl. the cold start); None = from the pool view.
        random_state: seed of the noise, the class shuffles and tie-breaks.
    """

    requires = frozenset({"class_entropy"})

    def __init__(
        self,
        *,
        fg_ratio: float = 0.66,
        schedule: Literal["exponential", "sigmoid", "constant", "none"] = "exponential",
        beta_start: float = 1.0,
        beta_end: float = 100.0,
        temperature: float = 2.0,
        query_steps: int | None = None,
        random_state: int | None = 0,
    ) -> None:
        self.fg_ratio = fg_ratio
        self.schedule = schedule
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.temperature = temperature
        self.query_steps = query_steps
        self.random_state = random_state

    def check_params(self) -> None:
        if isinstance(self.fg_ratio, bool) or not isinstance(self.fg_ratio, int | float) or not 0 <= self.fg_ratio <= 1:
            raise ValueError(f"fg_ratio must be a number in [0, 1], got {self.fg_ratio!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        for name in ("beta_start", "beta_end", "temperature"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
                raise ValueError(f"{name} must be a number > 0, got {v!r}")
        q = self.query_steps
        if q is not None and (isinstance(q, bool) or not isinstance(q, int) or q < 2):
            raise ValueError(
                f"query_steps must be an integer >= 2 (cold start + at least one query) or null, got {q!r}"
            )

    def beta(self, pool: PoolView) -> float | None:
        """The noise ``beta`` for the round the view is for (None for ``schedule: none``)."""
        if self.schedule in ("none", "constant"):
            return beta_for_round(self.schedule, 1, 2, self.beta_start, self.beta_end, self.temperature)
        if pool.round_index is None or (self.query_steps is None and pool.n_rounds is None):
            raise ValueError(
                f"{self.name}: the {self.schedule} noise schedule needs the round (PoolView.round_index and n_rounds, "
                "set by the AL loop) or the query_steps parameter"
            )
        steps = self.query_steps if self.query_steps is not None else pool.n_rounds + 1
        return beta_for_round(self.schedule, pool.round_index, steps, self.beta_start, self.beta_end, self.temperature)

    def _select(self, pool: PoolView, budget: int) -> np.ndarray:
        self.check_params()
        beta = self.beta(pool)
        rng = self._rng()
        unl = pool.unlabeled_index
        scores = np.asarray(pool.features["class_entropy"], dtype=np.float64).reshape(len(pool.ids), -1)[unl]
        if scores.shape[1] < 2:
            raise ValueError(f"{self.name}: class_entropy must be [N, K] with K >= 2, got {scores.shape}")
        n_classes = scores.shape[1] - 1
        # nnActive noises the class strata first, then the unstratified one (its dict order: labels, then -1)
        keys = np.empty_like(scores)
        for j in [*range(1, n_classes + 1), 0]:
            keys[:, j] = power_noising(scores[:, j], beta, rng)
        quotas = stratum_quotas(budget, n_classes, self.fg_ratio, rng)
        order = np.concatenate([rng.permutation(np.arange(1, n_classes + 1)), [0]])
        logger.info("clasp_pe: round %s/%s beta=%s quotas (all, classes...)=%s", pool.round_index, pool.n_rounds,
                    None if beta is None else round(beta, 3), quotas.tolist())
        return unl[stratified_select(keys, quotas, order, rng)]
