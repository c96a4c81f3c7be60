"""The label store: versioned, durable labels apart from the images; the only place training reads labels from.

Layout under ``root`` (``<output_dir>/labels`` of a run)::

    labels.jsonl                 the record of every label version (a :class:`raylearn.ledger.Ledger`: one
                                 checksummed, fsynced JSON line per version)
    cases/<case_id>/v0001.npy    uint8 [D, H, W] on the pool store's grid, one file per version
    .lock                        ``fcntl.flock`` serialising writers (Serve replicas, the driver, annotators)

A write (:meth:`LabelStore.put`) is durable before it returns: the array goes to a temporary file that is
fsynced, renamed into place (``os.replace``, atomic) and its directory fsynced; then the record is appended to
``labels.jsonl`` (fsynced). The record is the commit: a kill between the two leaves an orphan file that no
record names, so it is ignored (and overwritten by the next write of that version). Corrections add a new
version and keep every earlier one (:meth:`history`). Writing the same array again for the same case and tag
is idempotent: the latest version is returned, nothing is written (``created=False``).

Records: ``{"kind": "label", "case_id", "version", "tag", "source" ("simulated" | "human" | "pseudo"), "annotator",
"time" (unix s), "sha256" (of the array bytes and shape), "shape", "foreground_voxels", "path", "info"}``.

Partial labels (``unit: slice`` or ``unit: patch`` runs, :meth:`LabelStore.put_partial`): a version also names a
boolean mask of the annotated voxels (``cases/<case_id>/v0002.mask.npy``; record fields ``mask_path``,
``mask_sha256``, ``annotated_voxels`` and ``units``, the slice or patch unit ids annotated so far). A new unit adds
a version whose label and mask are the previous version's merged with the new unit (the mask is the union). A
version without ``mask_path`` is a whole-volume label (every voxel annotated). Pseudo-labels
(:meth:`LabelStore.put_pseudo`) are stored under their own tag ``pseudo`` with ``source="pseudo"``; each round's
replace the previous ones and they never count as cost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raylearn.ledger import Ledger

__all__ = ["LabelRecord", "LabelStore", "LabelStoreError", "PSEUDO_TAG", "label_digest", "fsync_dir",
           "file_lock", "mask_digest"]

log = logging.getLogger(__name__)

LEDGER = "labels.jsonl"
SOURCES = ("simulated", "human")
#: the tag (and source) of pseudo-labels: never what the annotation API serves as ``final``, never cost
PSEUDO_TAG = "pseudo"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


class LabelStoreError(ValueError):
    """A label cannot be stored or read (bad case id, array, or a file that does not match its record)."""


def label_digest(label: np.ndarray) -> str:
    """sha256 of a label array's shape and bytes (uint8, C order)."""
    arr = np.ascontiguousarray(label, dtype=np.uint8)
    h = hashlib.sha256(repr(tuple(arr.shape)).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def mask_digest(mask: np.ndarray) -> str:
    """sha256 of a boolean mask's shape and bytes (stored as uint8 0/1)."""
    return label_digest(np.asarray(mask, dtype=bool).astype(np.uint8))


def _write_npy(folder: Path, name: str, arr: np.ndarray) -> None:
    """Write ``folder/name`` durably: temporary file fsynced, renamed into place (atomic)."""
    tmp = folder / f".{name}.tmp"
    with open(tmp, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / name)


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename inside it survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` (created if missing) across processes."""
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@dataclass(frozen=True)
class LabelRecord:
    """One stored label version (see the module docstring for the fields)."""

    case_id: str
    version: int
    tag: str
    source: str
    annotator: str
    time: float
    sha256: str
    shape: tuple[int, ...]
    foreground_voxels: int
    path: str
    info: dict[str, Any] = field(default_factory=dict)
    created: bool = True
    #: partial labels only: the annotated-voxel mask's file and sha256, its voxel count, the slice units so far
    mask_path: str | None = None
    mask_sha256: str | None = None
    annotated_voxels: int | None = None
    units: tuple[str, ...] = ()

    @property
    def partial(self) -> bool:
        """True when only the voxels of :attr:`mask_path` are annotated (a whole-volume label otherwise)."""
        return self.mask_path is not None

    @classmethod
    def from_record(cls, rec: dict, created: bool = True) -> LabelRecord:
        return cls(case_id=rec["case_id"], version=int(rec["version"]), tag=rec["tag"], source=rec["source"],
                   annotator=rec["annotator"], time=float(rec["time"]), sha256=rec["sha256"],
                   shape=tuple(rec["shape"]), foreground_voxels=int(rec["foreground_voxels"]), path=rec["path"],
                   info=dict(rec.get("info") or {}), created=created, mask_path=rec.get("mask_path"),
                   mask_sha256=rec.get("mask_sha256"),
                   annotated_voxels=None if rec.get("annotated_voxels") is None else int(rec["annotated_voxels"]),
                   units=tuple(rec.get("units") or ()))

    def as_json(self) -> dict[str, Any]:
        out = {"case_id": self.case_id, "version": self.version, "tag": self.tag, "source": self.source,
               "annotator": self.annotator, "time": self.time, "sha256": self.sha256, "shape": list(self.shape),
               "foreground_voxels": self.foreground_voxels, "info": self.info}
        if self.partial:
            out.update(annotated_voxels=self.annotated_voxels, units=list(self.units))
        return out


class LabelStore:
    """Versioned labels of one run, shared by every process that opens the same ``root``.

    Args:
        root: the store's folder (created).
        known_ids: case ids that may be labelled (the pool store's); None accepts any safe id.
    """

    def __init__(self, root: str | Path, known_ids: set[str] | None = None) -> None:
        self.root = Path(root).expanduser().resolve()
        (self.root / "cases").mkdir(parents=True, exist_ok=True)
        self.known_ids = set(known_ids) if known_ids is not None else None
        self._records: list[dict] = []
        self._size = -1

    def __reduce__(self):
        return (LabelStore, (str(self.root), self.known_ids))

    # -- reading ----------------------------------------------------------------------------------
    def _refresh(self) -> list[dict]:
        """Re-read the record file when it grew (other processes append to it)."""
        path = self.root / LEDGER
        size = path.stat().st_size if path.exists() else 0
        if size != self._size:
            self._records = [r for r in Ledger(path, readonly=True).records if r.get("kind") == "label"]
            self._size = size
        return self._records

    def records(self) -> list[LabelRecord]:
        """Every label version in the order written."""
        return [LabelRecord.from_record(r) for r in self._refresh()]

    def history(self, case_id: str, tag: str | None = None) -> list[LabelRecord]:
        """All versions of a case (optionally of one tag), oldest first."""
        return [LabelRecord.from_record(r) for r in self._refresh()
                if r["case_id"] == case_id and (tag is None or r["tag"] == tag)]

    def latest(self, case_id: str, tag: str = "final") -> LabelRecord | None:
        """The newest version of ``case_id`` with ``tag``, or None."""
        hist = self.history(case_id, tag)
        return hist[-1] if hist else None

    def labelled_ids(self, tag: str = "final") -> list[str]:
        """Case ids with at least one ``tag`` label, in the order of their first label."""
        return list(dict.fromkeys(r["case_id"] for r in self._refresh() if r["tag"] == tag))

    def __contains__(self, case_id: object) -> bool:
        return any(r["case_id"] == case_id and r["tag"] == "final" for r in self._refresh())

    def read(self, case_id: str, version: int | None = None, tag: str = "final") -> np.ndarray:
        """The label array uint8 ``[D, H, W]`` of a version (default the latest), checked against its record.

        Raises:
            KeyError: the case has no such label.
            LabelStoreError: the file is missing or does not match its recorded sha256.
        """
        rec = self._record(case_id, version, tag)
        return self._load_checked(rec.path, rec.sha256, "label")

    def _load_checked(self, rel: str, sha256: str, what: str) -> np.ndarray:
        """The array at ``root / rel``, refused unless it matches its recorded ``sha256``."""
        try:
            arr = np.load(self.root / rel, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise LabelStoreError(f"{self.root / rel}: unreadable {what} file: {err}") from None
        if label_digest(arr) != sha256:
            raise LabelStoreError(f"{self.root / rel}: content does not match its record (sha256)")
        return arr

    def read_masked(self, case_id: str, version: int | None = None, tag: str = "final"
                    ) -> tuple[np.ndarray, np.ndarray]:
        """A version's label and annotated-voxel mask: ``(uint8 [D, H, W], bool [D, H, W])``.

        A whole-volume label's mask is all True; a partial label's label is 0 outside its mask.

        Raises:
            KeyError: the case has no such label.
            LabelStoreError: a file is missing or does not match its record.
        """
        label = self.read(case_id, version, tag)
        rec = self._record(case_id, version, tag)
        if not rec.partial:
            return label, np.ones(label.shape, dtype=bool)
        return label, self._load_checked(rec.mask_path, rec.mask_sha256, "mask").astype(bool)

    def _record(self, case_id: str, version: int | None, tag: str) -> LabelRecord:
        hist = self.history(case_id, tag)
        if version is not None:
            hist = [r for r in hist if r.version == int(version)]
        if not hist:
            raise KeyError(f"case {case_id!r} has no {tag!r} label"
                           + (f" version {version}" if version is not None else "") + f" in {self.root}")
        return hist[-1]

    def labelled_units(self, case_id: str | None = None) -> list[str]:
        """Slice or patch unit ids annotated so far (``final`` partial labels), of one case or of every case."""
        latest: dict[str, dict] = {}
        for r in self._refresh():
            if r["tag"] == "final" and (case_id is None or r["case_id"] == case_id):
                latest[r["case_id"]] = r
        return [u for r in latest.values() for u in (r.get("units") or ())]

    def pseudo_ids(self) -> list[str]:
        """Case ids whose latest pseudo-label fills at least one voxel."""
        latest: dict[str, dict] = {}
        for r in self._refresh():
            if r["tag"] == PSEUDO_TAG:
                latest[r["case_id"]] = r
        return [c for c, r in latest.items() if int(r.get("annotated_voxels") or 0) > 0]

    # -- writing ----------------------------------------------------------------------------------
    def lock(self) -> contextlib.AbstractContextManager[None]:
        """An exclusive lock across processes (``fcntl.flock`` on ``root/.lock``)."""
        return file_lock(self.root / ".lock")

    def check_id(self, case_id: str) -> None:
        if not isinstance(case_id, str) or not _SAFE_ID.match(case_id):
            raise LabelStoreError(f"invalid case id {case_id!r} (letters, digits, '.', '_', '-' only)")
        if self.known_ids is not None and case_id not in self.known_ids:
            raise LabelStoreError(f"unknown case {case_id!r}: not in the pool store")

    @staticmethod
    def _check_label(case_id: str, label: np.ndarray) -> np.ndarray:
        arr = np.asarray(label)
        if arr.ndim != 3:
            raise LabelStoreError(f"case {case_id!r}: a label must be [D, H, W], got shape {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise LabelStoreError(f"case {case_id!r}: label values must lie in 0..255")
        return np.ascontiguousarray(arr, dtype=np.uint8)

    @staticmethod
    def _check_tag(tag: str) -> None:
        if not re.match(r"^[A-Za-z0-9._-]{1,64}$", tag or ""):
            raise LabelStoreError(f"invalid label tag {tag!r}")

    def _commit(self, case_id: str, tag: str, source: str, annotator: str, arr: np.ndarray,
                mask: np.ndarray | None, units: Sequence[str], info: dict[str, Any] | None) -> LabelRecord:
        """Write a new version (label, and mask for a partial one) durably, then append its record. Holds the lock."""
        version = 1 + max((r.version for r in self.history(case_id)), default=0)
        folder = self.root / "cases" / case_id
        folder.mkdir(parents=True, exist_ok=True)
        rel = f"cases/{case_id}/v{version:04d}.npy"
        _write_npy(folder, f"v{version:04d}.npy", arr)
        extra: dict[str, Any] = {}
        if mask is not None:
            m8 = np.ascontiguousarray(mask, dtype=bool).astype(np.uint8)
            _write_npy(folder, f"v{version:04d}.mask.npy", m8)
            extra = {"mask_path": f"cases/{case_id}/v{version:04d}.mask.npy", "mask_sha256": label_digest(m8),
                     "annotated_voxels": int(m8.sum()), "units": list(units)}
        fsync_dir(folder)
        rec = Ledger(self.root / LEDGER).append(
            "label", case_id=case_id, version=version, tag=tag, source=source, annotator=str(annotator),
            time=time.time(), sha256=label_digest(arr), shape=list(arr.shape),
            foreground_voxels=int(np.count_nonzero(arr)), path=rel, info=dict(info or {}), **extra)
        fsync_dir(self.root)
        self._size = -1
        return LabelRecord.from_record(rec)

    def put(self, case_id: str, label: np.ndarray, source: str, annotator: str, tag: str = "final",
            info: dict[str, Any] | None = None) -> LabelRecord:
        """Store a label durably (see the module docstring); returns its record.

        Args:
            case_id: a pool case.
            label: integer ``[D, H, W]`` on the pool store's grid (values 0..255).
            source: ``"simulated"`` or ``"human"``.
            annotator: who made it (a user name, or ``"simulated"``).
            tag: MONAI Label's label tag (``final`` is what training reads).
            info: extra JSON-able details kept in the record.

        Returns:
            The new record, or the latest one (``created=False``) when it holds the same array already.
        """
        self.check_id(case_id)
        if source not in SOURCES:
            raise LabelStoreError(f"label source must be one of {SOURCES}, got {source!r}")
        self._check_tag(tag)
        arr = self._check_label(case_id, label)
        digest = label_digest(arr)
        with self.lock():
            self._size = -1
            hist = self.history(case_id, tag)
            if hist and hist[-1].sha256 == digest and not hist[-1].partial:
                return dataclasses.replace(hist[-1], created=False)
            rec = self._commit(case_id, tag, source, annotator, arr, None, (), info)
        log.info("label store: %s v%d (%s, %s, %s)", case_id, rec.version, tag, source, annotator)
        return rec

    def put_partial(self, case_id: str, label: np.ndarray, annotated: np.ndarray, source: str, annotator: str,
                    units: Sequence[str] = (), tag: str = "final", info: dict[str, Any] | None = None) -> LabelRecord:
        """Add annotated voxels (e.g. one slice) to a case's label: a new version whose mask is the union.

        The new voxels' labels replace the previous version's there (a correction); elsewhere the previous version
        is kept. Re-adding voxels already annotated with the same labels (and no new unit) is idempotent: the
        latest record is returned with ``created=False``.

        Args:
            case_id: a pool case.
            label: integer ``[D, H, W]`` (values 0..255); only the voxels in ``annotated`` are read.
            annotated: bool ``[D, H, W]``, the voxels this annotation covers.
            source: ``"simulated"`` or ``"human"``.
            annotator: who made it.
            units: slice or patch unit ids this annotation covers (:mod:`raylearn.units`), kept in the record.
            tag: the label tag (``final`` is what training reads).
            info: extra JSON-able details kept in the record.

        Returns:
            The new record (``partial`` True, ``units`` every unit annotated so far).
        """
        self.check_id(case_id)
        if source not in SOURCES:
            raise LabelStoreError(f"label source must be one of {SOURCES}, got {source!r}")
        self._check_tag(tag)
        arr = self._check_label(case_id, label)
        mask = np.asarray(annotated)
        if mask.shape != arr.shape:
            raise LabelStoreError(f"case {case_id!r}: annotated mask {mask.shape} does not match label {arr.shape}")
        mask = mask.astype(bool)
        with self.lock():
            self._size = -1
            hist = self.history(case_id, tag)
            if hist:
                old, old_mask = self.read_masked(case_id, tag=tag)
                if old.shape != arr.shape:
                    raise LabelStoreError(f"case {case_id!r}: label {arr.shape} does not match the stored "
                                          f"{old.shape}")
                old_units = list(hist[-1].units)
            else:
                old, old_mask, old_units = np.zeros_like(arr), np.zeros(arr.shape, dtype=bool), []
            new = np.where(mask, arr, old).astype(np.uint8)
            new_mask = old_mask | mask
            all_units = list(dict.fromkeys([*old_units, *map(str, units)]))
            if hist and np.array_equal(new, old) and np.array_equal(new_mask, old_mask) and all_units == old_units:
                return dataclasses.replace(hist[-1], created=False)
            if hist and not hist[-1].partial:  # a whole-volume label stays whole (every voxel already annotated)
                new_mask = None
            rec = self._commit(case_id, tag, source, annotator, new, new_mask, all_units, info)
        log.info("label store: %s v%d (%s, %s, %s, %d annotated voxels)", case_id, rec.version, tag, source,
                 annotator, rec.annotated_voxels if rec.partial else arr.size)
        return rec

    def put_pseudo(self, case_id: str, label: np.ndarray, filled: np.ndarray, round_index: int,
                   annotator: str = "propagation", info: dict[str, Any] | None = None) -> LabelRecord:
        """Replace a case's pseudo-labels (tag ``pseudo``, source ``pseudo``; never annotation cost).

        Args:
            case_id: a pool case.
            label: integer ``[D, H, W]`` pseudo-labels; only the voxels in ``filled`` are kept (0 elsewhere).
            filled: bool ``[D, H, W]``, the voxels pseudo-labelled; an all-False mask clears the case's pseudo-labels.
            round_index: the round whose propagation stage produced them (kept in ``info["round"]``).
            annotator: the stage's name.
            info: extra JSON-able details.

        Raises:
            LabelStoreError: ``filled`` overlaps voxels somebody annotated (``final`` label), or bad shapes.
        """
        self.check_id(case_id)
        arr = self._check_label(case_id, label)
        mask = np.asarray(filled)
        if mask.shape != arr.shape:
            raise LabelStoreError(f"case {case_id!r}: pseudo-label mask {mask.shape} does not match label "
                                  f"{arr.shape}")
        mask = mask.astype(bool)
        arr = np.where(mask, arr, 0).astype(np.uint8)
        with self.lock():
            self._size = -1
            if self.history(case_id, "final"):
                _, annotated = self.read_masked(case_id)
                if annotated.shape != arr.shape:
                    raise LabelStoreError(f"case {case_id!r}: pseudo-label {arr.shape} does not match the annotated "
                                          f"label {annotated.shape}")
                overlap = int((annotated & mask).sum())
                if overlap:
                    raise LabelStoreError(f"case {case_id!r}: pseudo-labels overlap {overlap} annotated voxel(s); a "
                                          "propagation stage may only fill voxels nobody annotated")
            hist = self.history(case_id, PSEUDO_TAG)
            if hist:
                old, old_mask = self.read_masked(case_id, tag=PSEUDO_TAG)
                if np.array_equal(old, arr) and np.array_equal(old_mask, mask):
                    return dataclasses.replace(hist[-1], created=False)
            elif not mask.any():
                return LabelRecord(case_id, 0, PSEUDO_TAG, PSEUDO_TAG, annotator, time.time(), label_digest(arr),
                                   tuple(arr.shape), 0, "", created=False, annotated_voxels=0)
            rec = self._commit(case_id, PSEUDO_TAG, PSEUDO_TAG, annotator, arr, mask, (),
                               {**(info or {}), "round": int(round_index)})
        log.info("label store: %s v%d pseudo-labels of round %d (%d voxels)", case_id, rec.version, round_index,
                 rec.annotated_voxels)
        return rec
