"""Oracles: who supplies labels for the cases a strategy selects.

``SimulatedOracle`` reveals the held-back ground truth already in the pool store (the papers'
simulation). A live oracle (annotators feeding masks over HTTP) implements the same interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Oracle", "SimulatedOracle", "LabelReceipt"]


@dataclass
class LabelReceipt:
    """What an oracle delivered: the labelled ids and the annotation effort they represent."""

    ids: list[str]
    voxels: int = 0
    foreground_voxels: int = 0
    per_case: dict[str, int] = field(default_factory=dict)


class Oracle(ABC):
    """Supplies labels for case ids. After ``label(ids)`` the labels of ``ids`` are usable for training."""

    @abstractmethod
    def label(self, ids: Sequence[str]) -> LabelReceipt:
        """Label ``ids`` (blocking until the labels are available)."""


class SimulatedOracle(Oracle):
    """Reveals ground-truth labels held in a :class:`raylearn.data.store.PoolStore`.

    Raises:
        ValueError: when a case has no ground-truth label, or is unknown to the store.
    """

    def __init__(self, store) -> None:
        self.store = store
        self.revealed: list[str] = []

    def label(self, ids: Sequence[str]) -> LabelReceipt:
        known = set(self.store.case_ids())
        receipt = LabelReceipt(ids=[])
        for cid in ids:
            if cid not in known:
                raise ValueError(f"oracle: case {cid!r} is not in the store {self.store.path}")
            case = self.store.get(cid)
            if case.label is None:
                raise ValueError(f"oracle: case {cid!r} has no ground-truth label to reveal")
            fg = int(np.count_nonzero(case.label))
            receipt.ids.append(cid)
            receipt.voxels += int(case.label.size)
            receipt.foreground_voxels += fg
            receipt.per_case[cid] = fg
            self.revealed.append(cid)
        return receipt
