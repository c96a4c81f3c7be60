"""The pool store: preprocessed cases in Arrow IPC shards + a Parquet manifest, read zero-copy.

Layout of a store folder::

    OUT/
      store.json          format version, fingerprint (inputs + settings), labels, channels, summary
      manifest.parquet    one row per case (see ``MANIFEST_COLUMNS``)
      shards/shard-00000.arrow ...   Arrow IPC files, one record batch (one row) per case

A shard row holds ``case_id``, the flat ``image`` (``large_list<float32>``, C*D*H*W values), the flat
``label`` (``large_list<uint8>``, null when unlabeled) and their shapes, so cases of different shapes
live side by side. :meth:`PoolStore.get` memory-maps the shard (``pa.memory_map`` + ``ipc.open_file``)
and returns numpy views on the mapped pages: no copy, read-only.

:func:`ingest` writes everything into a hidden temporary folder beside ``OUT`` and renames it at the
end, with ``store.json`` written last, so a store that is visible and has ``store.json`` is complete.
Re-ingesting the same input with the same settings is a no-op; different settings or changed input
into an existing store raise :class:`StoreError`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.ipc as ipc
import SimpleITK as sitk

from raylearn.data.preprocess import PreprocessConfig, preprocess_case, restore_to_source
from raylearn.data.readers import DatasetError, DatasetInfo, discover_dataset, read_case
from raylearn.data.shards import (
    MANIFEST,
    SHARD_DIR,
    SPLITS,
    STORE_JSON,
    STORE_VERSION,
    IngestReport,
    ShardWriter,
    StoreError,
    byte_offsets,
    check_existing,
    input_fingerprint,
    report_from,
    settings_of,
    split_cases,
)

__all__ = [
    "STORE_VERSION",
    "IngestReport",
    "PoolStore",
    "StoreError",
    "StoredCase",
    "ingest",
    "split_cases",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredCase:
    """One case read from the store.

    Attributes:
        case_id: case identifier.
        image: float32 ``[C, D, H, W]``, read-only view on the memory-mapped shard.
        label: uint8 ``[D, H, W]`` read-only view, or ``None`` for unlabeled cases.
        spacing: voxel spacing ``(D, H, W)`` in mm.
        split: ``"pool"`` or ``"test"``.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float]
    split: str

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(D, H, W)``."""
        return tuple(self.image.shape[1:])


def ingest(
    dataset_dir: str | Path,
    out_dir: str | Path,
    cfg: PreprocessConfig | None = None,
    n_test: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    skip_bad: bool = False,
    progress: bool = True,
    shard_bytes: int = 256 * 1024**2,
) -> IngestReport:
    """Preprocess a dataset into a pool store.

    Args:
        dataset_dir: dataset folder (MSD, nnU-Net raw or plain folder layout).
        out_dir: store folder to create.
        cfg: preprocessing settings (default ``PreprocessConfig()``).
        n_test: absolute number of held-out test cases (overrides ``test_fraction``).
        test_fraction: share of test cases when ``n_test`` is None.
        seed: split seed.
        skip_bad: leave out bad cases (listed in ``IngestReport.skipped``) instead of raising.
        progress: show a tqdm progress bar.
        shard_bytes: start a new shard file once one holds about this many bytes.

    Returns:
        :class:`IngestReport` (``reused=True`` when the store was already up to date).

    Raises:
        DatasetError: a bad case (naming file and problem) when ``skip_bad`` is False, or a bad dataset folder.
        StoreError: ``out_dir`` holds a different store or something else; no case could be ingested.
    """
    cfg = cfg or PreprocessConfig()
    t0 = time.perf_counter()
    info = discover_dataset(dataset_dir)
    if not info.cases:
        raise DatasetError(f"{info.root}: dataset lists no cases")
    out = Path(out_dir).expanduser().resolve()
    settings = settings_of(cfg, seed, n_test, test_fraction)
    inputs = input_fingerprint(info)
    split_cases([str(i) for i in range(len(info.cases))], seed, n_test, test_fraction)  # validate early
    stored = check_existing(out, settings, inputs)
    if stored is not None:
        logger.info("%s: store already up to date; nothing to do", out)
        return report_from(out, stored, reused=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    (tmp / SHARD_DIR).mkdir(parents=True)
    try:
        rows, skipped = _write_cases(info, cfg, tmp / SHARD_DIR, shard_bytes, skip_bad, progress)
        if not rows:
            raise StoreError(f"{info.root}: no case could be ingested ({len(skipped)} bad)")
        split = split_cases([r["case_id"] for r in rows], seed, n_test, test_fraction)
        offsets = {}
        for shard in sorted({r["shard"] for r in rows}):
            offsets[shard] = byte_offsets(tmp / SHARD_DIR / shard)
        for r in rows:
            r["split"] = split[r["case_id"]]
            r["image_offset"], r["image_nbytes"], r["label_offset"], r["label_nbytes"] = offsets[r["shard"]][r["batch"]]
            r["nbytes"] = r["image_nbytes"] + r["label_nbytes"]
        manifest = pd.DataFrame(rows).sort_values("case_id", kind="stable").reset_index(drop=True)
        manifest.to_parquet(tmp / MANIFEST, index=False)
        wall = time.perf_counter() - t0
        meta = {
            "format": "raylearn-pool-store",
            "version": STORE_VERSION,
            "complete": True,
            "dataset": str(info.root),
            "dataset_name": info.name,
            "layout": info.layout,
            "labels": {str(k): v for k, v in info.labels.items()},
            "channel_names": {str(k): v for k, v in info.channel_names.items()},
            "num_channels": len(info.channel_names),
            "settings": settings,
            "input_fingerprint": inputs,
            "shards": sorted(offsets),
            "summary": {
                "n_cases": len(rows),
                "n_pool": int((manifest["split"] == "pool").sum()),
                "n_test": int((manifest["split"] == "test").sum()),
                "nbytes": int(manifest["nbytes"].sum()),
                "wall_s": wall,
                "skipped": skipped,
            },
        }
        (tmp / STORE_JSON).write_text(json.dumps(meta, indent=1))  # written last: marks completeness
        _fsync_tree(tmp)  # data on disk before the rename makes the store visible
        try:
            if out.exists():
                out.rmdir()  # empty (checked above)
            os.rename(tmp, out)
        except OSError:
            # another ingest finished into OUT meanwhile: fine if it is this very store, else refuse
            stored = check_existing(out, settings, inputs)
            if stored is None:
                raise StoreError(f"{out}: could not move the finished store into place") from None
            shutil.rmtree(tmp, ignore_errors=True)
            return report_from(out, stored, reused=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("ingested %d cases into %s in %.1f s", len(rows), out, wall)
    return report_from(out, meta, reused=False)


def _fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _write_cases(
    info: DatasetInfo, cfg: PreprocessConfig, folder: Path, shard_bytes: int, skip_bad: bool, progress: bool
) -> tuple[list[dict], list[tuple[str, str]]]:
    from tqdm.auto import tqdm

    writer = ShardWriter(folder, shard_bytes)
    rows: list[dict] = []
    skipped: list[tuple[str, str]] = []
    try:
        for rec in tqdm(info.cases, desc="ingest", unit="case", disable=not progress):
            try:
                images, label = read_case(rec, info.labels, num_channels=len(info.channel_names))
                pre = preprocess_case(images, label, cfg)
            except (DatasetError, RuntimeError, ValueError) as err:
                msg = str(err)
                if not isinstance(err, DatasetError):
                    msg = f"{rec.image_paths[0]}: preprocessing failed: {err}"
                if not skip_bad:
                    raise DatasetError(msg) from None
                logger.warning("skipping case %s: %s", rec.case_id, msg)
                skipped.append((rec.case_id, msg))
                continue
            shard, batch = writer.write(rec.case_id, pre.image, pre.label)
            counts = np.bincount(pre.label.ravel(), minlength=len(info.labels)) if pre.label is not None else None
            rows.append(
                {
                    "case_id": rec.case_id,
                    "shard": shard,
                    "batch": batch,
                    "channels": int(pre.image.shape[0]),
                    "shape": list(pre.image.shape[1:]),
                    "spacing": list(pre.spacing),
                    "source_size": list(reversed(pre.meta["source"]["size"])),
                    "source_spacing": list(reversed(pre.meta["source"]["spacing"])),
                    "image_paths": [str(p) for p in rec.image_paths],
                    "label_path": str(rec.label_path) if rec.label_path else None,
                    "class_voxels": counts.tolist() if counts is not None else None,
                    "meta": json.dumps(pre.meta),
                }
            )
    finally:
        writer.close()
    return rows, skipped


class PoolStore:
    """Read access to a store written by :func:`ingest`.

    Pickles as its path only (``PoolStore.open(path)`` on unpickling); shard memory maps open lazily
    in each process, so a store can be handed to Ray actors which then read cases themselves.
    """

    def __init__(self, path: Path, info: dict, manifest: pd.DataFrame):
        self.path = path
        self.info = info
        self.manifest = manifest
        self.labels: dict[int, str] = {int(k): v for k, v in info["labels"].items()}
        self.channel_names: dict[int, str] = {int(k): v for k, v in info["channel_names"].items()}
        self.config = PreprocessConfig(**info["settings"]["preprocess"])
        self._rows = {cid: i for i, cid in enumerate(manifest["case_id"])}
        # plain-python lookup for the hot path (pandas row access costs ~100 us per call)
        self._where = {
            cid: (shard, int(batch), tuple(float(x) for x in sp), str(split))
            for cid, shard, batch, sp, split in zip(
                manifest["case_id"], manifest["shard"], manifest["batch"], manifest["spacing"], manifest["split"],
                strict=True,
            )
        }  # fmt: skip
        self._readers: dict[str, ipc.RecordBatchFileReader] = {}

    @classmethod
    def open(cls, path: str | Path) -> PoolStore:
        """Open a complete store; :class:`StoreError` when missing, incomplete or of another version."""
        p = Path(path).expanduser().resolve()
        sj = p / STORE_JSON
        if not sj.is_file():
            raise StoreError(f"{p}: not a complete pool store (no {STORE_JSON}); run `raylearn ingest` first")
        try:
            info = json.loads(sj.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise StoreError(f"{sj}: unreadable store description: {err}") from None
        if info.get("format") != "raylearn-pool-store" or not info.get("complete"):
            raise StoreError(f"{sj}: not a complete raylearn pool store")
        if info.get("version") != STORE_VERSION:
            raise StoreError(f"{sj}: store format version {info.get('version')}, this raylearn reads {STORE_VERSION}")
        missing = [s for s in info["shards"] if not (p / SHARD_DIR / s).is_file()]
        if missing or not (p / MANIFEST).is_file():
            raise StoreError(f"{p}: incomplete store, missing {(missing or [MANIFEST])[0]}")
        return cls(p, info, pd.read_parquet(p / MANIFEST))

    def __reduce__(self):
        return (PoolStore.open, (str(self.path),))

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, case_id: object) -> bool:
        return case_id in self._rows

    def __repr__(self) -> str:
        return f"PoolStore({str(self.path)!r}, cases={len(self)}, classes={self.num_classes})"

    @property
    def num_classes(self) -> int:
        """Classes including background."""
        return len(self.labels)

    @property
    def num_channels(self) -> int:
        """Image channels C."""
        return int(self.info["num_channels"])

    def case_ids(self, split: str | None = None) -> list[str]:
        """Case ids (sorted), all or those of ``split`` (``"pool"`` or ``"test"``)."""
        if split is None:
            return list(self.manifest["case_id"])
        if split not in SPLITS:
            raise StoreError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
        return list(self.manifest.loc[self.manifest["split"] == split, "case_id"])

    def _row(self, case_id: str) -> pd.Series:
        try:
            return self.manifest.iloc[self._rows[case_id]]
        except KeyError:
            raise KeyError(f"case {case_id!r} is not in store {self.path}") from None

    def _reader(self, shard: str) -> ipc.RecordBatchFileReader:
        reader = self._readers.get(shard)
        if reader is None:
            reader = ipc.open_file(pa.memory_map(str(self.path / SHARD_DIR / shard), "r"))
            self._readers[shard] = reader
        return reader

    def get(self, case_id: str) -> StoredCase:
        """Read one case: zero-copy, read-only numpy views on the memory-mapped shard.

        Returns:
            :class:`StoredCase` with image float32 ``[C, D, H, W]`` and label uint8 ``[D, H, W]`` or None.
        """
        try:
            shard, index, spacing, split = self._where[case_id]
        except KeyError:
            raise KeyError(f"case {case_id!r} is not in store {self.path}") from None
        batch = self._reader(shard).get_batch(index)
        image = batch.column(1).values.to_numpy(zero_copy_only=True).reshape(batch.column(2)[0].as_py())
        lab_col = batch.column(3)
        label = None
        if not lab_col.null_count:
            label = lab_col.values.to_numpy(zero_copy_only=True).reshape(batch.column(4)[0].as_py())
        return StoredCase(case_id, image, label, spacing, split)

    def nbytes(self, case_id: str) -> int:
        """Bytes of image + label data of one case."""
        return int(self._row(case_id)["nbytes"])

    def meta(self, case_id: str) -> dict[str, Any]:
        """Preprocessing record of one case (see :func:`raylearn.data.preprocess.preprocess_case`)."""
        return json.loads(self._row(case_id)["meta"])

    def restore(self, case_id: str, pred_labelmap: np.ndarray, path: str | Path | None = None) -> sitk.Image:
        """Map a label map ``[D, H, W]`` on the stored grid back to the source image's grid.

        Args:
            case_id: the case the prediction belongs to.
            pred_labelmap: integer labels with the stored shape.
            path: when given, also write the result there (e.g. ``pred.nii.gz``).

        Returns:
            uint8 ``sitk.Image`` with the source's size, spacing, origin and direction.
        """
        img = restore_to_source(pred_labelmap, self.meta(case_id))
        if path is not None:
            sitk.WriteImage(img, str(path), useCompression=True)
        return img

    def close(self) -> None:
        """Drop the open memory maps (arrays already handed out keep theirs alive)."""
        self._readers.clear()
