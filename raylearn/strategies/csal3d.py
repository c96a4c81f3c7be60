"""CSAL-3D's URDS selector: uncertainty-weighted multi-kernel k-means, typicality-gated, most uncertain per cluster.

Checked against the authors' ``CSAL_methods/ours.py`` (HiLab-git/CSAL-3D, commit e91b607,
``select_valuable_samples_Uncertainty_Kmeans``): uncertainties min-max scaled; RBF kernels
``exp(-gamma |x_i - x_j|^2 / 2)`` for ``gamma in {0.1, 1, 10}``, each multiplied by ``1 / (u_i + u_j)``;
kernel k-means (``k = budget``, random initial assignment) on their sum; in each cluster the ``n_cand``
(``search_nums``, 3) members of highest typicality ``1 / mean cosine distance to the cluster's members``, of
which the most uncertain is taken. Pure functions: :mod:`raylearn.scoring.coldstart`.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from raylearn.scoring.coldstart import kernel_kmeans, minmax, typicality_cosine, urds_kernels
from raylearn.strategies._embed import embeddings
from raylearn.strategies.base import PoolView, QueryStrategy, configurable_requires, register_strategy

__all__ = ["URDS", "ColdStartSource"]

ColdStartSource = Literal["auto", "extractor", "segmenter"]


class _ColdStartMixin:
    """``source`` of the features: ``extractor`` (the label-free extractor's, cached in the store; every round),
    ``segmenter`` (the segmenter's; not at round 0), ``auto`` (the extractor's at round 0, the segmenter's after)."""

    source: str
    extractor: dict[str, Any]
    _extractor_name: str = ""
    _extractor_features: tuple[str, str] = ("", "")  # (embedding, uncertainty)

    def _features(self) -> tuple[str, str]:
        """``(embedding, uncertainty)`` feature names this configuration reads."""
        if self.source == "extractor":
            return self._extractor_features
        return self.embedding, self.score  # type: ignore[attr-defined]

    def required_features(self) -> frozenset[str]:
        return frozenset(self._features())

    def extractor_settings(self) -> dict[str, dict[str, Any]]:
        return {self._extractor_name: dict(self.extractor)} if self.source == "extractor" else {}

    def for_round(self, round_index: int):
        if self.source != "auto":
            return self
        params = {**self.get_params(), "source": "extractor" if round_index == 0 else "segmenter"}  # type: ignore
        return type(self)(**params)

    def check_params(self) -> None:
        if self.source not in ("auto", "extractor", "segmenter"):
            raise ValueError(f"source: must be auto, extractor or segmenter, got {self.source!r}")
        if self.extractor or self.source == "extractor":  # defaults are checked when the extractor runs
            from raylearn.models.extractors import parse_params

            parse_params(self._extractor_name, self.extractor)  # ValueError naming extractor.<key>


@register_strategy("urds")
class URDS(_ColdStartMixin, QueryStrategy):
    """Uncertainty-Representativeness Dual Selection (CSAL-3D).

    Args:
        source: ``auto`` (default: CSAL-3D's extractor features at round 0, the segmenter's ``embedding`` /
            ``score`` afterwards), ``extractor`` (the extractor's every round, from the store's cache) or
            ``segmenter``.
        extractor: settings of the CSAL-3D extractor (:class:`raylearn.models.ssl3d.Csal3dParams`).
        score: the segmenter's uncertainty feature (``source`` segmenter / later rounds of auto).
        embedding: the segmenter's embedding feature.
        n_cand: candidates per cluster (``search_nums``, 3 in the authors' code).
        gammas: RBF kernel widths.
        normalize: L2-normalise the features before the kernels (the authors do not).
        max_iter: kernel k-means iterations.
        random_state: seed of the kernel k-means initialisation.
    """

    requires = configurable_requires(frozenset({"embedding", "entropy"}))
    _extractor_name = "csal3d"
    _extractor_features = ("csal3d_embedding", "csal3d_uncertainty")

    def __init__(
        self,
        *,
        source: ColdStartSource = "auto",
        extractor: dict[str, Any] | None = None,
        score: str = "entropy",
        embedding: str = "embedding",
        n_cand: int = 3,
        gammas: tuple[float, ...] = (0.1, 1.0, 10.0),
        normalize: bool = False,
        max_iter: int = 100,
        random_state: int | None = 0,
    ) -> None:
        self.source = source
        self.extractor = dict(extractor or {})
        self.score = score
        self.embedding = embedding
        self.n_cand = n_cand
        self.gammas = tuple(gammas)
        self.normalize = normalize
        self.max_iter = max_iter
        self.random_state = random_state

    def check_params(self) -> None:
        super().check_params()
        if self.n_cand < 1 or self.max_iter < 1 or not self.gammas or min(self.gammas) <= 0:
            raise ValueError(f"n_cand and max_iter must be >= 1 and gammas positive, got {self.n_cand}, "
                             f"{self.max_iter}, {self.gammas}")

    def _select(self, pool: PoolView, budget: int) -> np.ndarray:
        emb_name, u_name = self._features()
        unl = pool.unlabeled_index
        x = embeddings(pool, emb_name, self.normalize)[unl]
        u = minmax(np.asarray(pool.features[u_name], dtype=np.float64).reshape(len(pool.ids))[unl])
        kernel = np.sum(urds_kernels(x, u, self.gammas), axis=0)
        labels = kernel_kmeans(kernel, budget, self._rng(), self.max_iter)
        picked: list[int] = []
        for c in range(budget):
            local = np.flatnonzero(labels == c)
            if len(local) == 0:
                continue
            typ = typicality_cosine(x[local])
            cands = local[np.argsort(-typ, kind="stable")[: self.n_cand]]
            picked.append(int(unl[cands[np.argmax(u[cands])]]))
        if len(picked) < budget:  # fewer non-empty clusters than the budget: the most uncertain of the rest
            rest = np.setdiff1d(unl, picked)
            order = np.argsort(-u[np.searchsorted(unl, rest)], kind="stable")
            picked.extend(int(i) for i in rest[order[: budget - len(picked)]])
        return np.array(picked, dtype=np.int64)
