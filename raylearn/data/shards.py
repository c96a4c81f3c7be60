"""Pieces of the pool store: layout constants, shard schema and writer, byte offsets, split, fingerprints,
the ingest report and the check of an existing store.

Used by :mod:`raylearn.data.store`; see there for the store layout.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from raylearn.data.imageio import file_sha256
from raylearn.data.preprocess import PreprocessConfig
from raylearn.data.readers import DatasetInfo

__all__ = [
    "MANIFEST",
    "SHARD_DIR",
    "SHARD_SCHEMA",
    "SPLITS",
    "STORE_JSON",
    "STORE_VERSION",
    "IngestReport",
    "ShardWriter",
    "StoreError",
    "byte_offsets",
    "diff_settings",
    "input_fingerprint",
    "split_cases",
    "check_existing",
    "report_from",
    "settings_of",
]


STORE_VERSION = 1
STORE_JSON = "store.json"
MANIFEST = "manifest.parquet"
SHARD_DIR = "shards"
SPLITS = ("pool", "test")


class StoreError(ValueError):
    """A store cannot be written or opened (settings clash, incomplete store, unknown split, ...)."""


SHARD_SCHEMA = pa.schema(
    [
        ("case_id", pa.string()),
        ("image", pa.large_list(pa.float32())),
        ("image_shape", pa.list_(pa.int64())),
        ("label", pa.large_list(pa.uint8())),
        ("label_shape", pa.list_(pa.int64())),
    ]
)


def split_cases(
    case_ids: list[str], seed: int = 0, n_test: int | None = None, test_fraction: float = 0.2
) -> dict[str, str]:
    """Deterministic pool/test split.

    Args:
        case_ids: the cases (order does not matter; they are sorted first).
        seed: seed of ``np.random.default_rng``.
        n_test: absolute number of test cases; overrides ``test_fraction`` when given.
        test_fraction: share of test cases (rounded) when ``n_test`` is None.

    Returns:
        case id -> ``"pool"`` or ``"test"``.
    """
    ids = sorted(case_ids)
    if n_test is None:
        if not 0.0 <= test_fraction < 1.0:
            raise StoreError(f"test_fraction must be in [0, 1), got {test_fraction}")
        n_test = int(round(test_fraction * len(ids)))
    if n_test < 0 or (ids and n_test >= len(ids)):
        raise StoreError(
            f"n_test={n_test} must be in [0, {len(ids) - 1}] for {len(ids)} cases (the pool may not be empty)"
        )
    order = np.random.default_rng(seed).permutation(len(ids))
    test = {ids[i] for i in order[:n_test]}
    return {c: ("test" if c in test else "pool") for c in ids}


def input_fingerprint(info: DatasetInfo) -> str:
    """sha256 over the dataset description and the bytes of every case file (missing files included)."""
    h = hashlib.sha256()
    h.update(json.dumps([info.layout, info.labels, info.channel_names], sort_keys=True).encode())
    for rec in info.cases:
        paths = [*rec.image_paths, *([rec.label_path] if rec.label_path else [])]
        h.update(rec.case_id.encode())
        for p in paths:
            h.update(p.name.encode())
            h.update(file_sha256(p).encode() if p.is_file() else b"<missing>")
    return h.hexdigest()


def diff_settings(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for k in sorted(set(a) | set(b)):
            out += diff_settings(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: stored {a!r}, requested {b!r}"]


class ShardWriter:
    """Writes one-row record batches into size-capped shard files."""

    def __init__(self, folder: Path, shard_bytes: int):
        self.folder, self.shard_bytes = folder, shard_bytes
        self.index, self.rows, self.bytes, self.writer = -1, 0, 0, None

    def _roll(self) -> None:
        self.close()
        self.index += 1
        self.rows, self.bytes = 0, 0
        self.name = f"shard-{self.index:05d}.arrow"
        self.writer = ipc.new_file(str(self.folder / self.name), SHARD_SCHEMA)

    def write(self, case_id: str, image: np.ndarray, label: np.ndarray | None) -> tuple[str, int]:
        size = image.nbytes + (label.nbytes if label is not None else 0)
        if self.writer is None or (self.rows and self.bytes + size > self.shard_bytes):
            self._roll()
        img = pa.LargeListArray.from_arrays(pa.array([0, image.size], pa.int64()), pa.array(image.ravel()))
        if label is not None:
            lbl = pa.LargeListArray.from_arrays(pa.array([0, label.size], pa.int64()), pa.array(label.ravel()))
        else:
            lbl = pa.nulls(1, pa.large_list(pa.uint8()))
        batch = pa.record_batch(
            [
                pa.array([case_id]),
                img,
                pa.array([list(image.shape)], pa.list_(pa.int64())),
                lbl,
                pa.array([list(label.shape) if label is not None else None], pa.list_(pa.int64())),
            ],
            schema=SHARD_SCHEMA,
        )
        self.writer.write_batch(batch)
        self.rows += 1
        self.bytes += size
        return self.name, self.rows - 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def byte_offsets(shard: Path) -> list[tuple[int, int, int, int]]:
    """``(image_offset, image_nbytes, label_offset, label_nbytes)`` in the file for each record batch."""
    mm = pa.memory_map(str(shard), "r")
    base = mm.read_buffer(1).address
    mm.seek(0)
    reader = ipc.open_file(mm)
    out = []
    for i in range(reader.num_record_batches):
        b = reader.get_batch(i)
        vals = []
        for col, width in (("image", 4), ("label", 1)):
            arr = b.column(col)
            if arr.null_count:
                vals += [-1, 0]
                continue
            child = arr.values
            vals += [child.buffers()[1].address - base + child.offset * width, len(child) * width]
        out.append(tuple(vals))
    return out


@dataclass
class IngestReport:
    """Outcome of :func:`ingest`.

    Attributes:
        out_dir: the store folder.
        n_cases, n_pool, n_test: cases stored, in the pool split, in the test split.
        labels: class index -> name.
        num_channels: image channels.
        nbytes: bytes of image + label data stored.
        wall_s: seconds spent (0 when ``reused``).
        skipped: ``(case_id, reason)`` for each case left out by ``skip_bad``.
        reused: the store already held this input with these settings; nothing was written.
    """

    out_dir: Path
    n_cases: int
    n_pool: int
    n_test: int
    labels: dict[int, str]
    num_channels: int
    nbytes: int
    wall_s: float
    skipped: list[tuple[str, str]] = field(default_factory=list)
    reused: bool = False

    @property
    def cases_per_s(self) -> float:
        """Ingest throughput (cases per second of wall time)."""
        return self.n_cases / self.wall_s if self.wall_s > 0 else float("nan")

    def summary(self) -> str:
        """Human-readable multi-line summary."""
        lines = [
            f"store:    {self.out_dir}" + ("  (already up to date, nothing written)" if self.reused else ""),
            f"cases:    {self.n_cases} ({self.n_pool} pool, {self.n_test} test), {self.num_channels} channel(s)",
            "classes:  " + ", ".join(f"{k}={v}" for k, v in self.labels.items()),
            f"bytes:    {self.nbytes / 1e6:.1f} MB",
        ]
        if not self.reused:
            lines.append(f"time:     {self.wall_s:.1f} s ({self.cases_per_s:.1f} cases/s)")
        if self.skipped:
            lines.append(f"skipped:  {len(self.skipped)} bad case(s):")
            lines += [f"  {cid}: {why}" for cid, why in self.skipped]
        return "\n".join(lines)


def settings_of(cfg: PreprocessConfig, seed: int, n_test: int | None, test_fraction: float) -> dict[str, Any]:
    return {
        "preprocess": cfg.model_dump(mode="json"),
        "split": {"seed": seed, "n_test": n_test, "test_fraction": None if n_test is not None else test_fraction},
        "version": STORE_VERSION,
    }


def check_existing(out: Path, settings: dict, inputs: str) -> dict | None:
    """Return the stored ``store.json`` when ``out`` already holds exactly this store; raise on a clash."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise StoreError(f"{out}: exists and is not a folder")
    sj = out / STORE_JSON
    if not sj.is_file():
        if any(out.iterdir()):
            raise StoreError(f"{out}: folder is not empty and holds no {STORE_JSON}; refusing to write a store there")
        return None
    stored = json.loads(sj.read_text())
    diffs = diff_settings(stored.get("settings", {}), settings)
    if diffs:
        raise StoreError(
            f"{out}: already holds a store ingested with different settings ("
            + "; ".join(diffs)
            + "). Use another OUT folder or delete this one."
        )
    if stored.get("input_fingerprint") != inputs:
        raise StoreError(
            f"{out}: already holds a store of different input data (dataset {stored.get('dataset')}); "
            "use another OUT folder or delete this one."
        )
    return stored


def report_from(out: Path, stored: dict, reused: bool) -> IngestReport:
    s = stored["summary"]
    return IngestReport(
        out_dir=out,
        n_cases=s["n_cases"],
        n_pool=s["n_pool"],
        n_test=s["n_test"],
        labels={int(k): v for k, v in stored["labels"].items()},
        num_channels=stored["num_channels"],
        nbytes=s["nbytes"],
        wall_s=0.0 if reused else s["wall_s"],
        skipped=[tuple(x) for x in s["skipped"]],
        reused=reused,
    )
