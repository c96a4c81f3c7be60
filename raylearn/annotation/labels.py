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

Records: ``{"kind": "label", "case_id", "version", "tag", "source" ("simulated" | "human"), "annotator",
"time" (unix s), "sha256" (of the array bytes and shape), "shape", "foreground_voxels", "path", "info"}``.
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raylearn.ledger import Ledger

__all__ = ["LabelRecord", "LabelStore", "LabelStoreError", "LabelledStore", "label_digest", "fsync_dir", "file_lock"]

log = logging.getLogger(__name__)

LEDGER = "labels.jsonl"
SOURCES = ("simulated", "human")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


class LabelStoreError(ValueError):
    """A label cannot be stored or read (bad case id, array, or a file that does not match its record)."""


def label_digest(label: np.ndarray) -> str:
    """sha256 of a label array's shape and bytes (uint8, C order)."""
    arr = np.ascontiguousarray(label, dtype=np.uint8)
    h = hashlib.sha256(repr(tuple(arr.shape)).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


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

    @classmethod
    def from_record(cls, rec: dict, created: bool = True) -> LabelRecord:
        return cls(case_id=rec["case_id"], version=int(rec["version"]), tag=rec["tag"], source=rec["source"],
                   annotator=rec["annotator"], time=float(rec["time"]), sha256=rec["sha256"],
                   shape=tuple(rec["shape"]), foreground_voxels=int(rec["foreground_voxels"]), path=rec["path"],
                   info=dict(rec.get("info") or {}), created=created)

    def as_json(self) -> dict[str, Any]:
        return {"case_id": self.case_id, "version": self.version, "tag": self.tag, "source": self.source,
                "annotator": self.annotator, "time": self.time, "sha256": self.sha256, "shape": list(self.shape),
                "foreground_voxels": self.foreground_voxels, "info": self.info}


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
        hist = self.history(case_id, tag)
        if version is not None:
            hist = [r for r in hist if r.version == int(version)]
        if not hist:
            raise KeyError(f"case {case_id!r} has no {tag!r} label"
                           + (f" version {version}" if version is not None else "") + f" in {self.root}")
        rec = hist[-1]
        try:
            arr = np.load(self.root / rec.path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise LabelStoreError(f"{self.root / rec.path}: unreadable label file: {err}") from None
        if label_digest(arr) != rec.sha256:
            raise LabelStoreError(f"{self.root / rec.path}: content does not match its record (sha256)")
        return arr

    # -- writing ----------------------------------------------------------------------------------
    def lock(self) -> contextlib.AbstractContextManager[None]:
        """An exclusive lock across processes (``fcntl.flock`` on ``root/.lock``)."""
        return file_lock(self.root / ".lock")

    def check_id(self, case_id: str) -> None:
        if not isinstance(case_id, str) or not _SAFE_ID.match(case_id):
            raise LabelStoreError(f"invalid case id {case_id!r} (letters, digits, '.', '_', '-' only)")
        if self.known_ids is not None and case_id not in self.known_ids:
            raise LabelStoreError(f"unknown case {case_id!r}: not in the pool store")

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
        if not re.match(r"^[A-Za-z0-9._-]{1,64}$", tag or ""):
            raise LabelStoreError(f"invalid label tag {tag!r}")
        arr = np.asarray(label)
        if arr.ndim != 3:
            raise LabelStoreError(f"case {case_id!r}: a label must be [D, H, W], got shape {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise LabelStoreError(f"case {case_id!r}: label values must lie in 0..255")
        arr = np.ascontiguousarray(arr, dtype=np.uint8)
        digest = label_digest(arr)
        with self.lock():
            self._size = -1
            hist = self.history(case_id, tag)
            if hist and hist[-1].sha256 == digest:
                return dataclasses.replace(hist[-1], created=False)
            version = 1 + max((r.version for r in self.history(case_id)), default=0)
            folder = self.root / "cases" / case_id
            folder.mkdir(parents=True, exist_ok=True)
            rel = f"cases/{case_id}/v{version:04d}.npy"
            tmp = folder / f".v{version:04d}.npy.tmp"
            with open(tmp, "wb") as fh:
                np.save(fh, arr, allow_pickle=False)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.root / rel)
            fsync_dir(folder)
            rec = Ledger(self.root / LEDGER).append(
                "label", case_id=case_id, version=version, tag=tag, source=source, annotator=str(annotator),
                time=time.time(), sha256=digest, shape=list(arr.shape),
                foreground_voxels=int(np.count_nonzero(arr)), path=rel, info=dict(info or {}))
            fsync_dir(self.root)
            self._size = -1
        log.info("label store: %s v%d (%s, %s, %s)", case_id, version, tag, source, annotator)
        return LabelRecord.from_record(rec)


class LabelledStore:
    """A pool store whose labels come from a :class:`LabelStore`: what training processes are handed.

    ``get(case_id)`` returns the pool store's image with the latest ``final`` label of the label store (None
    when the case has none), so every reader of training data (the persistent service's workers, nnU-Net's
    export) sees only labels the oracle delivered. Everything else is the pool store's. Pickles as both paths.
    """

    def __init__(self, store, labels: LabelStore) -> None:
        self.store, self.labels = store, labels

    def __reduce__(self):
        return (LabelledStore, (self.store, self.labels))

    def __getattr__(self, name: str):
        if name in ("store", "labels") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.store, name)

    def __contains__(self, case_id: object) -> bool:
        return case_id in self.store

    def __len__(self) -> int:
        return len(self.store)

    def get(self, case_id: str):
        from raylearn.data.store import StoredCase

        case = self.store.get(case_id)
        try:
            label = self.labels.read(case_id)
        except KeyError:
            label = None
        if label is not None and label.shape != tuple(case.image.shape[1:]):
            raise LabelStoreError(f"case {case_id!r}: stored label {label.shape} does not match the image grid "
                                  f"{case.image.shape[1:]}")
        return StoredCase(case.case_id, case.image, label, case.spacing, case.split)

    def label_version(self, case_id: str) -> int | None:
        """The latest ``final`` version of a case (a changed version makes training re-read the case)."""
        rec = self.labels.latest(case_id)
        return rec.version if rec is not None else None
