"""Annotation units below a volume: slice and patch ids, and the contract of a pseudo-labelling stage.

A run with ``unit: slice`` labels single slices of a volume along one axis. A slice unit is named
``"<case_id>@<axis>:<index>"`` (``hippocampus_001@2:17``: case ``hippocampus_001``, axis 2 of the stored
``[D, H, W]`` grid, slice 17). A run with ``unit: {kind: patch, size: [d, h, w]}`` labels 3D patches, as nnActive
queries them: each case's grid is tiled by non-overlapping boxes of at most ``size`` (along an axis of length ``L``
there are ``ceil(L / s)`` boxes of near-equal length, :func:`patch_boxes`), and a patch unit names its box:
``"<case_id>@p:<z0>-<z1>,<y0>-<y1>,<x0>-<x1>"`` (half-open voxel ranges). Case ids never contain ``@`` or ``:``
(the label store refuses them), so an id splits back unambiguously and says which voxels it covers without the
run's config. A volume unit is the bare case id, as before.

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
    "PatchUnit",
    "PropagationContext",
    "PropagationResult",
    "SliceUnit",
    "UnitGrid",
    "UnitSpace",
    "is_slice_id",
    "is_unit_id",
    "parse_unit",
    "patch_boxes",
    "region_of",
    "slice_of",
    "slice_units",
    "unit_id",
]

_CASE = r"(?P<case>[A-Za-z0-9._-]{1,200})"
_UNIT = re.compile(rf"^{_CASE}@(?P<axis>[0-2]):(?P<index>\d{{1,6}})$")
_PATCH = re.compile(rf"^{_CASE}@p:(?P<z0>\d{{1,6}})-(?P<z1>\d{{1,6}}),(?P<y0>\d{{1,6}})-(?P<y1>\d{{1,6}}),"
                    r"(?P<x0>\d{1,6})-(?P<x1>\d{1,6})$")


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

    def region(self, shape: Sequence[int]) -> tuple[slice | int, ...]:
        """The numpy index of this slice in an array of ``shape`` (see :func:`region_of`)."""
        return slice_of(shape, self)


@dataclass(frozen=True, order=True)
class PatchUnit:
    """One 3D patch of one case: the half-open box ``box[a] = (start, stop)`` along each axis ``a`` of the case's
    stored ``[D, H, W]`` grid."""

    case: str
    box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]

    def __post_init__(self) -> None:
        box = tuple(tuple(int(v) for v in b) for b in self.box)
        if len(box) != 3 or any(len(b) != 2 or b[0] < 0 or b[1] <= b[0] for b in box):
            raise ValueError(f"a patch box needs 3 (start, stop) pairs with 0 <= start < stop, got {self.box!r}")
        object.__setattr__(self, "box", box)
        if not re.fullmatch(_CASE, self.case):
            raise ValueError(f"cannot name a patch unit for case {self.case!r}")

    @property
    def id(self) -> str:
        (z0, z1), (y0, y1), (x0, x1) = self.box
        return f"{self.case}@p:{z0}-{z1},{y0}-{y1},{x0}-{x1}"

    @property
    def voxels(self) -> int:
        return int(np.prod([b - a for a, b in self.box]))

    def region(self, shape: Sequence[int]) -> tuple[slice, ...]:
        """The numpy index of this patch in an array of ``shape`` (spatial axes last, 3 of them); a clear
        ``ValueError`` naming the unit when the box does not fit the case."""
        shape = tuple(shape)
        if len(shape) < 3:
            raise ValueError(f"a patch unit needs an array with 3 spatial axes, got shape {shape}")
        lead = len(shape) - 3
        for a, (_, stop) in enumerate(self.box):
            if stop > shape[lead + a]:
                raise ValueError(f"patch {self.id} is outside the case: axis {a} has {shape[lead + a]} voxels")
        return (*([slice(None)] * lead), *(slice(a, b) for a, b in self.box))


def patch_boxes(shape: Sequence[int], size: Sequence[int]) -> list[tuple[tuple[int, int], ...]]:
    """The non-overlapping boxes tiling a ``[D, H, W]`` grid (the last 3 axes of ``shape``), at most ``size``.

    Along an axis of length ``L`` and patch size ``s`` there are ``n = ceil(L / s)`` boxes whose edges are
    ``round(linspace(0, L, n + 1))``: near-equal lengths (none longer than ``s``), rather than ``floor(L / s)`` full
    boxes and a thin remainder. Boxes are listed in C order (``z`` slowest).
    """
    shape = tuple(int(x) for x in tuple(shape)[-3:])
    size = tuple(int(x) for x in size)
    if len(shape) != 3 or len(size) != 3:
        raise ValueError(f"patch_boxes: need a 3-d grid and 3 patch sizes, got shape {shape}, size {size}")
    if min(size) < 1 or min(shape) < 1:
        raise ValueError(f"patch_boxes: sizes must be >= 1, got shape {shape}, size {size}")
    edges = []
    for length, s in zip(shape, size, strict=True):
        n = -(-length // s)
        cuts = np.rint(np.linspace(0, length, n + 1)).astype(int)
        edges.append([(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:], strict=True)])
    return [(z, y, x) for z in edges[0] for y in edges[1] for x in edges[2]]


def region_of(shape: Sequence[int], unit: SliceUnit | PatchUnit) -> tuple[slice | int, ...]:
    """The numpy index selecting a slice or patch unit in an array of ``shape`` (spatial axes last, 3 of them)."""
    return unit.region(shape)


def unit_id(case: str, axis: int, index: int) -> str:
    """The id of slice ``index`` along ``axis`` of ``case``."""
    uid = f"{case}@{int(axis)}:{int(index)}"
    if not _UNIT.match(uid):
        raise ValueError(f"cannot name a slice unit for case {case!r}, axis {axis!r}, index {index!r}")
    return uid


def is_slice_id(uid: str) -> bool:
    """True for a slice unit id, False for a bare case id or a patch unit id."""
    return "@" in uid and not is_patch_id(uid)


def is_patch_id(uid: str) -> bool:
    """True for a patch unit id (``"<case>@p:..."``)."""
    return "@p:" in uid


def is_unit_id(uid: str) -> bool:
    """True for a slice or patch unit id (a unit below a volume), False for a bare case id."""
    return "@" in uid


def parse_unit(uid: str) -> SliceUnit | PatchUnit:
    """Split a slice or patch unit id; a clear ``ValueError`` naming the id when it is neither."""
    m = _PATCH.match(uid)
    if m is not None:
        try:
            return PatchUnit(m["case"], ((int(m["z0"]), int(m["z1"])), (int(m["y0"]), int(m["y1"])),
                                         (int(m["x0"]), int(m["x1"]))))
        except ValueError as err:
            raise ValueError(f"{uid!r} is not a patch unit id: {err}") from None
    m = _UNIT.match(uid)
    if m is None:
        raise ValueError(f"{uid!r} is not a slice unit id (expected '<case_id>@<axis 0-2>:<index>') "
                         "nor a patch unit id ('<case_id>@p:<z0>-<z1>,<y0>-<y1>,<x0>-<x1>')")
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


@dataclass(frozen=True)
class UnitGrid:
    """How a run cuts a case into annotation units below a volume: ``kind="slice"`` along ``axis``, or
    ``kind="patch"`` tiles of at most ``size`` (:func:`patch_boxes`). Small and picklable: the pool's shards get it
    to score each unit, the driver's :class:`UnitSpace` to name them, in the same order."""

    kind: str
    axis: int = 2
    size: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("slice", "patch"):
            raise ValueError(f"a unit grid is 'slice' or 'patch', got {self.kind!r}")
        if self.kind == "slice" and self.axis not in (0, 1, 2):
            raise ValueError(f"slice axis must be 0, 1 or 2, got {self.axis!r}")
        if self.kind == "patch":
            size = tuple(int(x) for x in (self.size or ()))
            if len(size) != 3 or min(size) < 1:
                raise ValueError(f"patch units need 3 patch sizes >= 1, got {self.size!r}")
            object.__setattr__(self, "size", size)

    def units(self, case: str, shape: Sequence[int]) -> list[SliceUnit | PatchUnit]:
        """The case's units in order (slices by index; patches in C order of their boxes)."""
        if self.kind == "slice":
            return slice_units(case, shape, self.axis)
        return [PatchUnit(case, box) for box in patch_boxes(shape, self.size)]

    def count(self, shape: Sequence[int]) -> int:
        """How many units a ``[D, H, W]`` grid (the last 3 axes of ``shape``) has."""
        shape = tuple(int(x) for x in tuple(shape)[-3:])
        if self.kind == "slice":
            return shape[self.axis]
        return len(patch_boxes(shape, self.size))

    def regions(self, shape: Sequence[int]) -> list[tuple[slice | int, ...]]:
        """The numpy index of each unit of a ``[D, H, W]`` grid (the last 3 axes of ``shape``), in unit order."""
        shape = tuple(shape)[-3:]
        return [u.region(shape) for u in self.units("c", shape)]


class UnitSpace:
    """The annotation units of a pool: whole cases (``kind="volume"``), every slice of every case along ``axis``
    (``kind="slice"``), or every patch of at most ``patch_size`` of every case (``kind="patch"``).

    The driver's bookkeeping of a run with units below a volume: the unit ids in pool order (cases in the given
    order; slices by index: ``c@2:9`` before ``c@2:10``; patches in C order of their boxes), the case of a unit,
    which cases still have unlabelled units (they stay on the pool's shards), which cases training reads, and
    per-case score vectors spread over the units.

    Args:
        case_ids: the pool's case ids, in pool order.
        kind: ``"volume"``, ``"slice"`` or ``"patch"``.
        axis: the slicing axis (slice units).
        shapes: case id -> stored grid ``(D, H, W)`` (slice and patch units).
        patch_size: the largest patch ``(d, h, w)`` (patch units).
    """

    def __init__(self, case_ids: Sequence[str], kind: str = "volume", axis: int = 2,
                 shapes: dict[str, Sequence[int]] | None = None,
                 patch_size: Sequence[int] | None = None) -> None:
        if kind not in ("volume", "slice", "patch"):
            raise ValueError(f"unit kind must be 'volume', 'slice' or 'patch', got {kind!r}")
        self.kind, self.axis = kind, int(axis)
        self.case_ids = [str(c) for c in case_ids]
        self.grid: UnitGrid | None = None
        self.n_units: dict[str, int] = {}
        self._by_case: dict[str, list[str]] = {}
        if kind == "volume":
            self.ids = list(self.case_ids)
            return
        self.grid = UnitGrid(kind, self.axis, tuple(patch_size) if patch_size is not None else None)
        shapes = shapes or {}
        missing = [c for c in self.case_ids if c not in shapes]
        if missing:
            raise ValueError(f"{kind} units need the grid shape of every case; missing {missing[:5]}")
        for c in self.case_ids:
            self._by_case[c] = [u.id for u in self.grid.units(c, shapes[c])]
            self.n_units[c] = len(self._by_case[c])
        self.ids = [u for c in self.case_ids for u in self._by_case[c]]

    @property
    def slices(self) -> bool:
        """Slice units (STAR's pseudo-labelling works on slices only)."""
        return self.kind == "slice"

    @property
    def partial(self) -> bool:
        """Units below a volume (slices or patches): partial labels, masked training, per-unit scores."""
        return self.kind != "volume"

    def __len__(self) -> int:
        return len(self.ids)

    def case_of(self, uid: str) -> str:
        """The case a unit belongs to (a volume unit is its case)."""
        return parse_unit(uid).case if self.partial else uid

    def units_of(self, case_id: str) -> list[str]:
        """A case's unit ids in order (its own id for volume units)."""
        return list(self._by_case[case_id]) if self.partial else [case_id]

    def labelled_cases(self, labelled: Sequence[str]) -> list[str]:
        """Cases with at least one labelled unit, in pool order."""
        have = {self.case_of(u) for u in labelled}
        return [c for c in self.case_ids if c in have]

    def complete_cases(self, labelled: Sequence[str]) -> list[str]:
        """Cases whose every unit is labelled (they leave the pool's shards), in pool order."""
        if not self.partial:
            return self.labelled_cases(labelled)
        count: dict[str, int] = {}
        for u in set(labelled):
            c = self.case_of(u)
            count[c] = count.get(c, 0) + 1
        return [c for c in self.case_ids if count.get(c, 0) >= self.n_units[c]]

    def open_cases(self, labelled: Sequence[str]) -> list[str]:
        """Cases with at least one unlabelled unit (what the pool's shards hold and score), in pool order."""
        done = set(self.complete_cases(labelled))
        return [c for c in self.case_ids if c not in done]

    def spread(self, case_id: str, values: np.ndarray) -> dict[str, float | np.ndarray]:
        """A case's per-unit scores as ``{unit id: score}``: ``[S]`` gives floats, ``[S, K]`` (a vector per unit,
        e.g. ``class_entropy``) gives ``float64 [K]`` arrays."""
        values = np.asarray(values)
        n = self.n_units[case_id]
        if values.ndim == 0 or values.shape[0] != n or values.ndim > 2:
            where = f"slices along axis {self.axis}" if self.slices else "patches"
            raise ValueError(f"case {case_id!r}: {values.shape[0] if values.ndim else 1} unit scores for {n} "
                             f"{where} (shape {values.shape})")
        if values.ndim == 1:
            return {u: float(v) for u, v in zip(self._by_case[case_id], values, strict=True)}
        return {u: np.asarray(v, dtype=np.float64) for u, v in zip(self._by_case[case_id], values, strict=True)}

    def align(self, scores: dict[str, float | np.ndarray]) -> np.ndarray:
        """``float64 [len(self)]`` (or ``[len(self), K]`` for vector scores) of ``scores`` in unit order, NaN for
        absent units; unknown ids raise."""
        index = {u: i for i, u in enumerate(self.ids)}
        unknown = sorted(set(scores) - set(index))
        if unknown:
            raise ValueError(f"{len(unknown)} unit id(s) are not units of this pool: {unknown[:5]}")
        widths = {np.asarray(v).size for v in scores.values() if np.asarray(v).ndim > 0}
        if len(widths) > 1:
            raise ValueError(f"unit scores of different lengths {sorted(widths)}")
        out = np.full((len(self.ids), *widths), np.nan)
        for u, v in scores.items():
            out[index[u]] = v
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
