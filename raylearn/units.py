"""Annotation units below a volume: slice ids, and the contract of a pseudo-labelling stage.

A run with ``unit: slice`` labels single slices of a volume along one axis. A slice unit is named
``"<case_id>@<axis>:<index>"`` (``hippocampus_001@2:17``: case ``hippocampus_001``, axis 2 of the stored
``[D, H, W]`` grid, slice 17). Case ids never contain ``@`` or ``:`` (the label store refuses them), so the id
splits back unambiguously. A volume unit is the bare case id, as before.

A strategy that fills unannotated voxels with pseudo-labels (STAR) implements ``propagate(ctx)``; the loop calls
it after each round's labels arrive and before training, writes :attr:`PropagationResult.pseudo` into the label
store (``source="pseudo"``: never counted as annotation cost) and hands :attr:`PropagationResult.unit_scores` to
the next selection as the feature ``propagation_score``. Pure: no Ray, no torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "PropagationContext",
    "PropagationResult",
    "SliceUnit",
    "UnitSpace",
    "is_slice_id",
    "parse_unit",
    "slice_of",
    "slice_units",
    "unit_id",
]

_UNIT = re.compile(r"^(?P<case>[A-Za-z0-9._-]{1,200})@(?P<axis>[0-2]):(?P<index>\d{1,6})$")


@dataclass(frozen=True, order=True)
class SliceUnit:
    """One slice of one case: ``index`` along ``axis`` (0, 1 or 2) of the case's stored ``[D, H, W]`` grid."""

    case: str
    axis: int
    index: int

    def __post_init__(self) -> None:
        if self.axis not in (0, 1, 2):
            raise ValueError(f"slice axis must be 0, 1 or 2, got {self.axis!r}")
        if isinstance(self.index, bool) or not isinstance(self.index, int | np.integer) or self.index < 0:
            raise ValueError(f"slice index must be a non-negative integer, got {self.index!r}")

    @property
    def id(self) -> str:
        return unit_id(self.case, self.axis, self.index)


def unit_id(case: str, axis: int, index: int) -> str:
    """The id of slice ``index`` along ``axis`` of ``case``."""
    uid = f"{case}@{int(axis)}:{int(index)}"
    if not _UNIT.match(uid):
        raise ValueError(f"cannot name a slice unit for case {case!r}, axis {axis!r}, index {index!r}")
    return uid


def is_slice_id(uid: str) -> bool:
    """True for a slice unit id, False for a bare case id."""
    return "@" in uid


def parse_unit(uid: str) -> SliceUnit:
    """Split a slice unit id; a clear ``ValueError`` naming the id when it is not one."""
    m = _UNIT.match(uid)
    if m is None:
        raise ValueError(f"{uid!r} is not a slice unit id (expected '<case_id>@<axis 0-2>:<index>')")
    return SliceUnit(m["case"], int(m["axis"]), int(m["index"]))


def slice_units(case: str, shape: Sequence[int], axis: int) -> list[SliceUnit]:
    """Every slice of a case whose stored grid has ``shape`` (``[D, H, W]``, or ``[C, D, H, W]``: the last 3)."""
    shape = tuple(shape)[-3:]
    if len(shape) != 3:
        raise ValueError(f"a slice unit needs a 3-d grid, got shape {tuple(shape)}")
    return [SliceUnit(case, axis, i) for i in range(int(shape[axis]))]


def slice_of(shape: Sequence[int], unit: SliceUnit) -> tuple[slice | int, ...]:
    """The numpy index selecting ``unit``'s slice in an array of ``shape`` (spatial axes last, 3 of them)."""
    shape = tuple(shape)
    if len(shape) < 3:
        raise ValueError(f"a slice unit needs an array with 3 spatial axes, got shape {shape}")
    lead = len(shape) - 3
    size = shape[lead + unit.axis]
    if unit.index >= size:
        raise ValueError(f"slice {unit.id} is outside the case: axis {unit.axis} has {size} slices")
    index: list[slice | int] = [slice(None)] * len(shape)
    index[lead + unit.axis] = unit.index
    return tuple(index)


class UnitSpace:
    """The annotation units of a pool: whole cases (``kind="volume"``) or every slice of every case along ``axis``.

    The driver's bookkeeping of a run with ``unit: slice``: the unit ids in pool order (cases in the given order,
    slices by index: ``c@2:9`` before ``c@2:10``), the case of a unit, which cases still have unlabelled units (they
    stay on the pool's shards), which cases training reads, and per-case score vectors spread over the units.

    Args:
        case_ids: the pool's case ids, in pool order.
        kind: ``"volume"`` or ``"slice"``.
        axis: the slicing axis (slice units).
        shapes: case id -> stored grid ``(D, H, W)`` (slice units).
    """

    def __init__(self, case_ids: Sequence[str], kind: str = "volume", axis: int = 2,
                 shapes: dict[str, Sequence[int]] | None = None) -> None:
        if kind not in ("volume", "slice"):
            raise ValueError(f"unit kind must be 'volume' or 'slice', got {kind!r}")
        self.kind, self.axis = kind, int(axis)
        self.case_ids = [str(c) for c in case_ids]
        self.n_slices: dict[str, int] = {}
        if kind == "slice":
            shapes = shapes or {}
            missing = [c for c in self.case_ids if c not in shapes]
            if missing:
                raise ValueError(f"slice units need the grid shape of every case; missing {missing[:5]}")
            self.n_slices = {c: int(tuple(shapes[c])[-3:][self.axis]) for c in self.case_ids}
            self.ids = [unit_id(c, self.axis, i) for c in self.case_ids for i in range(self.n_slices[c])]
        else:
            self.ids = list(self.case_ids)

    @property
    def slices(self) -> bool:
        return self.kind == "slice"

    def __len__(self) -> int:
        return len(self.ids)

    def case_of(self, uid: str) -> str:
        """The case a unit belongs to (a volume unit is its case)."""
        return parse_unit(uid).case if self.slices else uid

    def labelled_cases(self, labelled: Sequence[str]) -> list[str]:
        """Cases with at least one labelled unit, in pool order."""
        have = {self.case_of(u) for u in labelled}
        return [c for c in self.case_ids if c in have]

    def complete_cases(self, labelled: Sequence[str]) -> list[str]:
        """Cases whose every unit is labelled (they leave the pool's shards), in pool order."""
        if not self.slices:
            return self.labelled_cases(labelled)
        count: dict[str, int] = {}
        for u in set(labelled):
            c = self.case_of(u)
            count[c] = count.get(c, 0) + 1
        return [c for c in self.case_ids if count.get(c, 0) >= self.n_slices[c]]

    def open_cases(self, labelled: Sequence[str]) -> list[str]:
        """Cases with at least one unlabelled unit (what the pool's shards hold and score), in pool order."""
        done = set(self.complete_cases(labelled))
        return [c for c in self.case_ids if c not in done]

    def spread(self, case_id: str, values: np.ndarray) -> dict[str, float]:
        """A case's per-slice scores ``[S]`` as ``{unit id: score}`` (slice units)."""
        values = np.asarray(values).ravel()
        if values.size != self.n_slices[case_id]:
            raise ValueError(f"case {case_id!r}: {values.size} slice scores for {self.n_slices[case_id]} slices "
                             f"along axis {self.axis}")
        return {unit_id(case_id, self.axis, i): float(v) for i, v in enumerate(values)}

    def align(self, scores: dict[str, float]) -> np.ndarray:
        """``float64 [len(self)]`` of ``scores`` in unit order, NaN for absent units; unknown ids raise."""
        index = {u: i for i, u in enumerate(self.ids)}
        unknown = sorted(set(scores) - set(index))
        if unknown:
            raise ValueError(f"{len(unknown)} unit id(s) are not units of this pool: {unknown[:5]}")
        out = np.full(len(self.ids), np.nan)
        for u, v in scores.items():
            out[index[u]] = float(v)
        return out


@dataclass
class PropagationContext:
    """What a pseudo-labelling stage sees after a round's labels arrived.

    Attributes:
        round_index: the round whose labels just arrived (0 = cold start).
        seed: the round's seed.
        axis: the run's slice axis.
        case_ids: every pool case id, in pool order.
        labelled_units: slice unit ids annotated so far (by people or the simulated oracle).
        image: case id -> image ``float32 [C, D, H, W]`` as the segmenter's training reads it.
        label: case id -> ``(label uint8 [D, H, W], annotated bool [D, H, W])``: the annotated voxels' labels
            (0 elsewhere) and which voxels somebody annotated.
        num_classes: classes including background.
        work_dir: a directory the stage owns for its checkpoints (it survives a killed run: resume from it).
        device: ``"cpu"`` or ``"cuda"``.
        params: the strategy's parameters from the experiment config.
    """

    round_index: int
    seed: int
    axis: int
    case_ids: list[str]
    labelled_units: list[str]
    image: Callable[[str], np.ndarray]
    label: Callable[[str], tuple[np.ndarray, np.ndarray]]
    num_classes: int
    work_dir: Path
    device: str = "cpu"
    params: dict = field(default_factory=dict)


@dataclass
class PropagationResult:
    """What a pseudo-labelling stage returns.

    Attributes:
        pseudo: case id -> ``(label uint8 [D, H, W], filled bool [D, H, W])``: pseudo-labels for the voxels in
            ``filled`` (never an annotated voxel: the loop refuses an overlap). Cases absent keep no pseudo-label.
        unit_scores: slice unit id -> score for the next query (higher = ask first); units absent score NaN.
        info: figures to log (kept pseudo-labelled slices, training loss, seconds).
    """

    pseudo: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    unit_scores: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
