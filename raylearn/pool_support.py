"""Ray-free helpers of the sharded pool (:mod:`raylearn.pool`), importable and testable without Ray.

- balancing: :func:`balance` (largest-first onto the least-loaded shard), :func:`voxel_counts` (case sizes);
- checkpoints: :func:`checkpoint_bytes` (a Segmenter, a path or bytes -> bytes + loader class),
  :func:`checkpoint_digest` (content hash, the shards' model-cache key), :func:`detect_segmenter_cls`,
  :func:`load_class`;
- results: :func:`compact_feature` (refuses voxel maps) and :func:`merge_results` (one row per pool case).

The ``pool:`` configuration (:class:`raylearn.experiment.PoolConfig`) lives with the experiment schema.
"""

from __future__ import annotations

import hashlib
import heapq
import importlib
import io
import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MAX_ELEMENTS_PER_CASE", "MAX_ELEMENTS_PER_UNIT", "PoolError", "balance", "checkpoint_bytes", "checkpoint_digest",
    "compact_feature", "detect_segmenter_cls", "SEGMENTER_FORMATS", "load_class", "merge_results",
    "open_store", "ragged", "voxel_counts",
]


#: a per-case feature with more elements than this is a voxel map, not a compact result
MAX_ELEMENTS_PER_CASE = 4096
#: with units below a volume (slices, patches), the allowance per unit (a score, or a small vector such as
#: ``class_entropy [K]``): a case may return ``max(MAX_ELEMENTS_PER_CASE, n_units * MAX_ELEMENTS_PER_UNIT)``
MAX_ELEMENTS_PER_UNIT = 64


class PoolError(RuntimeError):
    """The pool cannot do what was asked (unknown case ids, lost shards, incomplete coverage)."""


def balance(sizes: Sequence[float], n: int, loads: Sequence[float] | None = None) -> list[list[int]]:
    """Assign items to ``n`` bins, largest first into the least-loaded bin (LPT greedy).

    Args:
        sizes: item sizes (e.g. voxel counts), length N, non-negative.
        n: number of bins (shards), ``>= 1``.
        loads: optional starting load of each bin (length n), e.g. what surviving shards already hold.

    Returns:
        ``n`` lists of item indices into ``sizes`` (each sorted ascending); every index appears exactly
        once. Ties go to the lowest bin index, so the result is deterministic.
    """
    if n < 1:
        raise ValueError(f"balance: n must be >= 1, got {n}")
    start = [0.0] * n if loads is None else [float(x) for x in loads]
    if len(start) != n:
        raise ValueError(f"balance: loads has length {len(start)}, expected {n}")
    heap = [(load, b) for b, load in enumerate(start)]
    heapq.heapify(heap)
    bins: list[list[int]] = [[] for _ in range(n)]
    for i in sorted(range(len(sizes)), key=lambda k: (-float(sizes[k]), k)):
        if sizes[i] < 0:
            raise ValueError(f"balance: size of item {i} is negative ({sizes[i]})")
        load, b = heapq.heappop(heap)
        bins[b].append(i)
        heapq.heappush(heap, (load + float(sizes[i]), b))
    return [sorted(b) for b in bins]


def compact_feature(name: str, value: Any, case_id: str, n_units: int | None = None) -> np.ndarray:
    """One case's feature as a compact array (float64 -> float32); a voxel-sized array raises :class:`PoolError`.

    ``n_units``: the case's units below a volume (slices, patches) when the feature is per unit; the allowance is
    then ``MAX_ELEMENTS_PER_UNIT`` per unit (a CT case tiled into thousands of patches still returns one score
    each)."""
    arr = np.asarray(value)
    limit = MAX_ELEMENTS_PER_CASE if n_units is None else max(MAX_ELEMENTS_PER_CASE, n_units * MAX_ELEMENTS_PER_UNIT)
    if arr.size > limit:
        raise PoolError(
            f"feature {name!r} of case {case_id!r} has shape {arr.shape} ({arr.size} elements > "
            f"{limit}); shards return compact per-case results, not voxel maps"
        )
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    return arr


def ragged(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Per-case arrays of varying length (per-slice scores, slice units) as an object array ``[N]`` (concatenates and
    reorders like any feature column in :func:`merge_results`)."""
    out = np.empty(len(rows), dtype=object)
    for i, row in enumerate(rows):
        out[i] = np.asarray(row)
    return out


def voxel_counts(store: Any, ids: Sequence[str]) -> list[float]:
    """Voxel count per case from the manifest (``shape`` column or D/H/W columns), else bytes stored."""
    man = getattr(store, "manifest", None)
    try:
        table = man.set_index("case_id")
        if "shape" in table.columns:
            return [float(np.prod(table.at[c, "shape"])) for c in ids]
        cols = [c for c in ("D", "H", "W") if c in table.columns]
        if len(cols) == 3:
            return [float(np.prod([table.at[c, k] for k in cols])) for c in ids]
    except (AttributeError, KeyError, TypeError, ValueError):
        pass
    return [float(store.nbytes(c)) for c in ids]


def merge_results(results: list[dict[str, Any]], expected: list[str]) -> dict[str, Any]:
    """Concatenate shard results ``{"ids", "features"}`` sorted by id; check each expected id comes exactly once."""
    ids = np.array([c for r in results for c in r["ids"]], dtype=object)
    if len(ids) != len(set(ids)) or sorted(ids) != expected:
        dup = sorted({c for c in ids if list(ids).count(c) > 1})[:5]
        miss = sorted(set(expected) - set(ids))[:5]
        raise PoolError(f"scoring did not cover the pool exactly once (duplicates {dup}, missing {miss})")
    names = set(results[0]["features"]) if results else set()
    for r in results:
        if set(r["features"]) != names:
            raise PoolError(f"shards returned different features: {sorted(names)} vs {sorted(r['features'])}")
    order = np.argsort(ids, kind="stable")
    feats = {n: np.concatenate([r["features"][n] for r in results])[order] for n in sorted(names)}
    return {"ids": ids[order].astype(str), "features": feats}


#: checkpoint format tags (written by the backends' ``save``) -> the class that loads them
SEGMENTER_FORMATS = {
    b"raylearn.monai_segmenter/": "raylearn.models.unet:MonaiSegmenter",
    b"raylearn.nnunet_segmenter/": "raylearn.models.nnunet_segmenter:NnUNetSegmenter",
}


def detect_segmenter_cls(blob: bytes, default_cls: str) -> str:
    """``"module:QualName"`` of the backend that wrote a torch checkpoint, from the format tag in its pickle
    (no tensors are loaded); ``default_cls`` when no known tag is found."""
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            pkl = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
            head = zf.read(pkl) if pkl else b""
    except zipfile.BadZipFile:
        head = blob[:65536]
    return next((cls for tag, cls in SEGMENTER_FORMATS.items() if tag in head), default_cls)


def checkpoint_bytes(segmenter: Any, segmenter_cls: str | type | None, default_cls: str) -> tuple[bytes, str]:
    """The checkpoint bytes and ``"module:QualName"`` loader of a Segmenter instance, a checkpoint path or bytes."""
    if isinstance(segmenter_cls, type):
        segmenter_cls = f"{segmenter_cls.__module__}:{segmenter_cls.__qualname__}"
    if isinstance(segmenter, bytes | bytearray):
        blob = bytes(segmenter)
        return blob, segmenter_cls or detect_segmenter_cls(blob, default_cls)
    if isinstance(segmenter, str | os.PathLike):
        path = Path(segmenter)
        if not path.is_file():
            raise PoolError(f"checkpoint not found: {path}")
        blob = path.read_bytes()
        return blob, segmenter_cls or detect_segmenter_cls(blob, default_cls)
    if not hasattr(segmenter, "save"):
        raise PoolError(f"score() needs a Segmenter, a checkpoint path or bytes, got {type(segmenter).__name__}")
    with tempfile.TemporaryDirectory(prefix="raylearn-ckpt-") as tmp:
        written = segmenter.save(Path(tmp) / "checkpoint.pt")
        blob = Path(written or Path(tmp) / "checkpoint.pt").read_bytes()
    cls = type(segmenter)
    return blob, segmenter_cls or f"{cls.__module__}:{cls.__qualname__}"


def checkpoint_digest(blob: bytes) -> str:
    """sha256 of a checkpoint's content. For torch's zip format the member contents are hashed without the
    archive's top folder (which torch names after the file), so one model saved under two names hashes equal."""
    h = hashlib.sha256()
    if blob[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(blob)) as zf:
                for name in sorted(zf.namelist(), key=lambda n: n.partition("/")[2]):
                    h.update(name.partition("/")[2].encode() + b"\0" + zf.read(name))
            return h.hexdigest()
        except zipfile.BadZipFile:
            h = hashlib.sha256()
    h.update(blob)
    return h.hexdigest()


def load_class(qualified: str) -> type:
    """Import ``"package.module:QualName"``."""
    module, _, name = qualified.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def open_store(store: Any) -> Any:
    """A ``PoolStore`` from a path; an already opened store (anything with ``get``/``case_ids``) as is."""
    if isinstance(store, str | os.PathLike):
        from raylearn.data.store import PoolStore

        return PoolStore.open(store)
    return store
