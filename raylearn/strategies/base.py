"""Query-strategy contract: :class:`PoolView`, :class:`QueryStrategy`, the registry and :func:`build_strategy`.

Strategies follow scikit-learn's estimator rules: ``__init__`` only stores keyword hyperparameters
(including ``random_state``), :meth:`QueryStrategy.select` is deterministic for a given ``random_state``
and never mutates its input. Each strategy declares the per-case features it needs in ``requires``
(class level) / :meth:`QueryStrategy.required_features` (instance level, includes a configurable score
feature); the pool computes exactly those with :func:`raylearn.scoring.features.compute_features`.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

import numpy as np

__all__ = [
    "STRATEGIES",
    "PoolView",
    "QueryStrategy",
    "build_strategy",
    "configurable_requires",
    "register_strategy",
]


@dataclass(frozen=True)
class PoolView:
    """A read-only view of the pool handed to a strategy.

    Attributes:
        ids: ``[N]`` case ids (str), unique; slice unit ids (``"<case>@<axis>:<index>"``, :mod:`raylearn.units`)
            in a ``unit: slice`` run, where every feature is per slice.
        labeled_mask: ``bool [N]``, True where the case is already labelled.
        features: name -> array aligned with ``ids`` on axis 0: scalar scores ``[N]``, embeddings ``[N, F]``,
            ``fg_volume`` ``[N, K-1]``. Rows of labelled cases may be NaN (not scored) except for strategies whose
            :meth:`QueryStrategy.needs_labeled_features` is True (k-center, TypiClust, ProbCover use the
            labelled cases' embeddings).
        round_index: which round the selection is for (``1..n_rounds`` for query rounds, 0 for the cold start),
            or None when unknown. Scheduled strategies (ClaSP PE's noise schedule) read it.
        n_rounds: number of query rounds after the cold start in the whole experiment (``schedule.rounds``), or
            None when unknown.
    """

    ids: np.ndarray
    labeled_mask: np.ndarray
    features: Mapping[str, np.ndarray] = field(default_factory=dict)
    round_index: int | None = None
    n_rounds: int | None = None

    def __post_init__(self) -> None:
        ids = np.asarray(self.ids)
        if ids.dtype.kind != "U":  # object arrays of str, bytes, ...: one canonical dtype
            ids = ids.astype(str)
        mask = np.asarray(self.labeled_mask)
        if ids.ndim != 1:
            raise ValueError(f"PoolView.ids must be 1-d, got shape {ids.shape}")
        if mask.shape != ids.shape or mask.dtype != np.bool_:
            raise ValueError(
                f"PoolView.labeled_mask must be bool with shape {ids.shape}, got {mask.dtype} {mask.shape}"
            )
        if len(np.unique(ids)) != len(ids):
            raise ValueError("PoolView.ids contains duplicate case ids")
        feats = {}
        for name, arr in dict(self.features).items():
            arr = np.asarray(arr)
            if arr.ndim == 0 or arr.shape[0] != len(ids):
                raise ValueError(f"PoolView feature {name!r} has shape {arr.shape}; axis 0 must match {len(ids)} ids")
            feats[name] = arr
        for name in ("round_index", "n_rounds"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 0):
                raise ValueError(f"PoolView.{name} must be a non-negative integer or None, got {v!r}")
        if self.round_index is not None and self.n_rounds is not None and self.round_index > self.n_rounds:
            raise ValueError(f"PoolView.round_index {self.round_index} exceeds n_rounds {self.n_rounds}")
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "labeled_mask", mask)
        object.__setattr__(self, "features", MappingProxyType(feats))

    @property
    def n_labeled(self) -> int:
        return int(self.labeled_mask.sum())

    @property
    def unlabeled_index(self) -> np.ndarray:
        """Positions (``int [U]``) of the unlabelled cases, in pool order."""
        return np.flatnonzero(~self.labeled_mask)

    @classmethod
    def from_records(
        cls,
        ids: list[str],
        labeled: set[str] | list[str],
        records: Mapping[str, Mapping[str, np.ndarray]],
        round_index: int | None = None,
        n_rounds: int | None = None,
    ) -> PoolView:
        """Build a view from per-case feature dicts (as returned by ``compute_features``).

        Args:
            ids: case ids in pool order.
            labeled: ids already labelled.
            records: case id -> {feature: array}; every id must have the same feature names. Labelled cases
                may be missing; their rows are filled with NaN.
            round_index: see the class attributes.
            n_rounds: see the class attributes.
        """
        labeled = set(labeled)
        names: set[str] | None = None
        for cid in ids:
            if cid in records:
                these = set(records[cid])
                if names is not None and these != names:
                    raise ValueError(f"case {cid!r} has features {sorted(these)}, others have {sorted(names)}")
                names = these
            elif cid not in labeled:
                raise ValueError(f"unlabelled case {cid!r} has no features")
        feats: dict[str, np.ndarray] = {}
        for name in sorted(names or ()):
            template = next(np.asarray(records[c][name]) for c in ids if c in records)
            missing = np.full(template.shape, np.nan, dtype=np.result_type(template.dtype, np.float16))
            rows = [np.asarray(records[c][name]) if c in records else missing for c in ids]
            feats[name] = np.stack(rows)
        mask = np.array([c in labeled for c in ids], dtype=bool)
        return cls(np.asarray(ids, dtype=str), mask, feats, round_index=round_index, n_rounds=n_rounds)


class configurable_requires:  # noqa: N801  (used like a constant in class bodies)
    """``requires`` for strategies whose features are hyperparameters (e.g. ``score="bald"``).

    On the class it is the default set (a plain frozenset, as for every strategy); on an instance it is
    :meth:`QueryStrategy.required_features` of that configuration, so ``strategy.requires`` is always what the
    pool must compute.
    """

    def __init__(self, default: frozenset[str]) -> None:
        self.default = frozenset(default)

    def __get__(self, obj: QueryStrategy | None, objtype: type | None = None) -> frozenset[str]:
        return self.default if obj is None else obj.required_features()


class QueryStrategy(ABC):
    """Select the next batch of cases to label.

    Subclasses set ``name`` and ``requires`` and implement :meth:`_select`; hyperparameters are keyword
    arguments of ``__init__`` stored under the same attribute names (as in scikit-learn).
    """

    #: registry name
    name: ClassVar[str] = ""
    #: features the strategy always needs (see :data:`raylearn.scoring.features.FEATURES`)
    requires: ClassVar[frozenset[str]] = frozenset()
    #: annotation units it selects (``"volume"``, ``"slice"``, ``"patch"``; see :mod:`raylearn.units`); None =
    #: derived from the features (:meth:`supported_units`)
    units: ClassVar[frozenset[str] | None] = None

    def __init__(self, *, random_state: int | None = 0) -> None:
        self.random_state = random_state

    def required_features(self) -> frozenset[str]:
        """Features this configured instance needs (the class's ``requires`` plus any configurable feature).

        ``instance.requires`` returns the same set (see :class:`configurable_requires`).
        """
        return type(self).requires

    def check_params(self) -> None:  # noqa: B027  (a hook: most strategies have nothing to check)
        """Validate the hyperparameters; raise ``ValueError`` naming the bad one. :func:`build_strategy` calls it,
        so a config is refused before any round runs. Default: nothing to check."""

    def extractor_settings(self) -> dict[str, dict[str, Any]]:
        """Settings of the label-free extractors behind the extractor features this instance requires
        (``{extractor: settings}``, see :mod:`raylearn.extract`); empty by default (defaults are used)."""
        return {}

    def for_round(self, round_index: int) -> QueryStrategy:
        """The configuration that selects round ``round_index`` (0 = the cold start). Default: ``self``; the
        cold-start strategies with ``source: auto`` use their extractor's features at round 0 and the
        segmenter's afterwards."""
        return self

    def supported_units(self) -> frozenset[str]:
        """The annotation units this configured instance can select: ``units`` when the class sets it, else
        ``volume`` always, and ``slice`` and ``patch`` when every required feature exists per unit
        (:data:`~raylearn.scoring.features.PER_UNIT_FEATURES`, :data:`~raylearn.scoring.features.UNIT_FEATURES`)
        and it reads no labelled cases' features (a unit's score is its voxel map reduced over the unit's region; a
        strategy on case-level embeddings or predicted volumes has no per-unit version)."""
        if type(self).units is not None:
            return frozenset(type(self).units)
        from raylearn.scoring.features import PER_UNIT_FEATURES, UNIT_FEATURES

        per_unit = self.required_features() <= (PER_UNIT_FEATURES | set(UNIT_FEATURES))
        return frozenset({"volume", "slice", "patch"} if per_unit and not self.needs_labeled_features()
                         else {"volume"})

    def needs_labeled_features(self) -> bool:
        """Whether :meth:`select` also reads the required features of the *labelled* cases (so the pool must
        score them too). False by default; True for strategies seeded with the labelled set."""
        return False

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values() if p.name != "self" and p.kind == p.KEYWORD_ONLY]

    def get_params(self) -> dict[str, Any]:
        """Hyperparameters as a dict (scikit-learn style)."""
        return {p: getattr(self, p) for p in self._param_names()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng(self.random_state)

    def _check(self, pool: PoolView, budget: int) -> None:
        if not isinstance(pool, PoolView):
            raise TypeError(f"{self.name}: pool must be a PoolView, got {type(pool).__name__}")
        if isinstance(budget, bool) or not isinstance(budget, int | np.integer) or budget < 1:
            raise ValueError(f"{self.name}: budget must be a positive integer, got {budget!r}")
        n_unl = int((~pool.labeled_mask).sum())
        if budget > n_unl:
            raise ValueError(f"{self.name}: budget {budget} exceeds the {n_unl} unlabelled cases in the pool")
        missing = sorted(self.required_features() - set(pool.features))
        if missing:
            raise ValueError(
                f"{self.name}: pool lacks required feature(s) {missing} (has: {sorted(pool.features) or 'none'})"
            )
        from raylearn.scoring.features import UNIT_FEATURES

        for name in sorted(self.required_features() - set(UNIT_FEATURES)):  # unit features are NaN where absent
            arr = pool.features[name]
            if not np.all(np.isfinite(arr[~pool.labeled_mask])):
                raise ValueError(f"{self.name}: feature {name!r} has non-finite values for unlabelled cases")
            if self.needs_labeled_features() and not np.all(np.isfinite(arr[pool.labeled_mask])):
                raise ValueError(
                    f"{self.name}: feature {name!r} is missing (non-finite) for labelled cases; this strategy uses "
                    "the labelled cases' features too, so the pool must score them as well"
                )

    def select(self, pool: PoolView, budget: int) -> np.ndarray:
        """Choose ``budget`` unique unlabelled case ids (slice unit ids in a ``unit: slice`` run).

        Args:
            pool: the pool with the features in :meth:`required_features`.
            budget: number of cases to select, ``1 <= budget <= #unlabelled``.

        Returns:
            ``str [budget]`` case ids, in selection order (most preferred first where the strategy ranks).
        """
        self._check(pool, budget)
        budget = int(budget)
        idx = np.asarray(self._select(pool, budget), dtype=np.int64)
        if len(idx) != budget or len(np.unique(idx)) != budget or pool.labeled_mask[idx].any():
            raise RuntimeError(f"{self.name}: internal error, produced an invalid selection {idx.tolist()}")
        return pool.ids[idx].copy()

    @abstractmethod
    def _select(self, pool: PoolView, budget: int) -> np.ndarray:
        """Return ``budget`` positions into ``pool.ids`` of unlabelled cases."""


#: name -> strategy class
STRATEGIES: dict[str, type[QueryStrategy]] = {}

S = TypeVar("S", bound=type[QueryStrategy])


def register_strategy(name: str) -> Callable[[S], S]:
    """Class decorator adding a strategy to :data:`STRATEGIES` under ``name``."""

    def deco(cls: S) -> S:
        if name in STRATEGIES and STRATEGIES[name] is not cls:
            raise ValueError(f"strategy name {name!r} registered twice")
        cls.name = name
        STRATEGIES[name] = cls
        return cls

    return deco


def build_strategy(name: str, **params: Any) -> QueryStrategy:
    """Instantiate a registered strategy by name, e.g. ``build_strategy("typiclust", knn=20, random_state=0)``.

    Raises:
        ValueError: unknown name (lists the known ones) or unknown hyperparameter (lists the allowed ones).
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    cls = STRATEGIES[name]
    allowed = cls._param_names()
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"strategy {name!r}: unknown parameter(s) {unknown}; allowed: {', '.join(allowed)}")
    strategy = cls(**params)
    from raylearn.scoring.coldstart import EXTRACTOR_FEATURES
    from raylearn.scoring.features import FEATURES, LABEL_FEATURES, UNIT_FEATURES

    known = set(FEATURES) | set(LABEL_FEATURES) | set(EXTRACTOR_FEATURES) | set(UNIT_FEATURES)
    bad = sorted(strategy.required_features() - known)
    if bad:
        raise ValueError(f"strategy {name!r}: unknown feature(s) {bad}; known features: {', '.join(sorted(known))}")
    try:
        strategy.check_params()
    except ValueError as err:
        raise ValueError(f"strategy {name!r}: {err}") from None
    return strategy
