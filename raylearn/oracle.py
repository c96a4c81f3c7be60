"""Oracles: who supplies labels for the cases a strategy selects. Both write into the label store
(:class:`raylearn.annotation.labels.LabelStore`), the only place training reads labels from.

``SimulatedOracle`` reveals the held-back ground truth of the pool store (the papers' simulation) by writing it
into the label store as ``source="simulated"`` labels, so simulated runs exercise the real path. Given slice unit
ids (``"<case>@<axis>:<index>"``, :mod:`raylearn.units`) it reveals only those slices: a partial label (the slices'
ground truth and the mask of their voxels) merged into the case's earlier ones.
``HumanOracle`` waits until people have uploaded ``final`` labels through the annotation API
(:mod:`raylearn.serve.annotation_api`), which writes them into the same store.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["HumanOracle", "LabelReceipt", "Oracle", "OracleTimeout", "SimulatedOracle", "make_oracle"]

log = logging.getLogger(__name__)


class OracleTimeout(TimeoutError):
    """People did not label the requested cases in time."""


@dataclass
class LabelReceipt:
    """What an oracle delivered: the labelled ids (case or slice unit ids) and the annotation effort they represent
    (``voxels`` / ``foreground_voxels``: of the revealed volumes or slices; ``per_case``: foreground voxels per id)."""

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
    """Reveals ground-truth labels held in a :class:`raylearn.data.store.PoolStore` into a label store.

    Args:
        store: the pool store holding the ground truth.
        labels: the run's :class:`~raylearn.annotation.labels.LabelStore`; each revealed label is written there
            durably (``source="simulated"``, annotator ``"simulated"``; re-revealing is idempotent).

    Raises:
        ValueError: when a case has no ground-truth label, or is unknown to the store.
    """

    def __init__(self, store, labels) -> None:
        self.store = store
        self.labels = labels
        self.revealed: list[str] = []

    def label(self, ids: Sequence[str]) -> LabelReceipt:
        from raylearn.units import is_unit_id, parse_unit

        known = set(self.store.case_ids())
        receipt = LabelReceipt(ids=[])
        slices: dict[str, list] = {}
        for cid in ids:
            unit = parse_unit(cid) if is_unit_id(cid) else None
            case_id = unit.case if unit is not None else cid
            if case_id not in known:
                raise ValueError(f"oracle: case {case_id!r} is not in the store {self.store.path}")
            if unit is not None:
                slices.setdefault(case_id, []).append(unit)
                continue
            case = self.store.get(cid)
            if case.label is None:
                raise ValueError(f"oracle: case {cid!r} has no ground-truth label to reveal")
            fg = int(np.count_nonzero(case.label))
            receipt.ids.append(cid)
            receipt.voxels += int(case.label.size)
            receipt.foreground_voxels += fg
            receipt.per_case[cid] = fg
            self.labels.put(cid, case.label, "simulated", "simulated")
            self.revealed.append(cid)
        for case_id, units in slices.items():  # one new label version per case, however many of its units
            case = self.store.get(case_id)
            if case.label is None:
                raise ValueError(f"oracle: case {case_id!r} has no ground-truth label to reveal")
            gt = np.asarray(case.label)
            mask = np.zeros(gt.shape, dtype=bool)
            for unit in units:
                index = unit.region(gt.shape)  # ValueError naming the unit when it lies outside the case
                mask[index] = True
                fg = int(np.count_nonzero(gt[index]))
                receipt.ids.append(unit.id)
                receipt.voxels += int(gt[index].size)
                receipt.foreground_voxels += fg
                receipt.per_case[unit.id] = fg
                self.revealed.append(unit.id)
            self.labels.put_partial(case_id, np.where(mask, gt, 0), mask, "simulated", "simulated",
                                    units=[u.id for u in units])
        return receipt


class HumanOracle(Oracle):
    """Labels come from people through the annotation API; ``label(ids)`` waits until all are in the store.

    Args:
        labels: the run's label store (the API writes ``final`` labels into it).
        timeout_s: give up (:class:`OracleTimeout`) after this many seconds; None waits for ever.
        poll_s: how often the store is checked.
    """

    def __init__(self, labels, timeout_s: float | None = None, poll_s: float = 0.5) -> None:
        self.labels, self.timeout_s, self.poll_s = labels, timeout_s, poll_s

    def label(self, ids: Sequence[str]) -> LabelReceipt:
        t0 = time.monotonic()
        want = [str(i) for i in ids]
        while True:
            missing = [c for c in want if self.labels.latest(c) is None]
            if not missing:
                break
            if self.timeout_s is not None and time.monotonic() - t0 > self.timeout_s:
                raise OracleTimeout(f"no label after {self.timeout_s:g} s for {len(missing)} case(s): {missing[:5]}")
            time.sleep(self.poll_s)
        receipt = LabelReceipt(ids=want)
        for cid in want:
            rec = self.labels.latest(cid)
            receipt.voxels += int(np.prod(rec.shape))
            receipt.foreground_voxels += rec.foreground_voxels
            receipt.per_case[cid] = rec.foreground_voxels
        return receipt


def make_oracle(kind: str, store, labels, timeout_s: float | None = None) -> Oracle:
    """The experiment's oracle (``oracle: simulated | human``), writing into / reading from ``labels``."""
    if kind == "simulated":
        return SimulatedOracle(store, labels)
    if kind == "human":
        return HumanOracle(labels, timeout_s=timeout_s)
    raise ValueError(f"oracle: unknown kind {kind!r} (simulated, human)")
