"""Durable, append-only record of an AL run (JSON lines, one checksummed record per line).

Each round writes two records: ``selected`` (the chosen ids and their scores, written before any
labelling or training) and ``round`` (metrics, timings, checkpoint path, written once the round is
complete). A run killed at any point resumes from the last complete record: a kill during training
re-uses the recorded selection instead of recomputing it.

Every line is ``{"crc": <crc32 of payload>, "payload": {...}}``, written with one ``write`` call
followed by ``flush`` + ``fsync``. On open, a truncated or corrupt LAST line (the signature of a kill
mid-write) is detected, logged and cut off; corruption anywhere else raises :class:`LedgerError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["Ledger", "LedgerError", "config_hash", "json_default"]


class LedgerError(RuntimeError):
    """The ledger cannot be used as it is (corrupt in the middle, or written by another config)."""


def config_hash(cfg: Any) -> str:
    """A stable sha256 of a JSON-serialisable config mapping (key order does not matter)."""
    blob = json.dumps(cfg, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _encode(payload: dict) -> str:
    body = json.dumps(payload, sort_keys=True, default=json_default, separators=(",", ":"))
    crc = zlib.crc32(body.encode())
    return json.dumps({"crc": crc, "payload": json.loads(body)}, sort_keys=True, separators=(",", ":")) + "\n"


def json_default(o: Any) -> Any:
    """``json.dump``'s ``default=``: numpy scalars and arrays as Python values, paths as strings."""
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _decode(line: str) -> dict:
    obj = json.loads(line)
    payload = obj["payload"]
    body = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    if zlib.crc32(body.encode()) != obj["crc"]:
        raise ValueError("checksum mismatch")
    return payload


class Ledger:
    """Append-only JSONL ledger at ``path``.

    Args:
        path: file to create or continue.
        repair: cut off a truncated/corrupt final line (default True). When False it raises instead.
        readonly: never modify the file (a reader beside a live writer): a partial last line is
            skipped, not cut off, and :meth:`append` is refused.
    """

    def __init__(self, path: str | Path, repair: bool = True, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._records: list[dict] = []
        if self.path.exists():
            self._load(repair)

    def _load(self, repair: bool) -> None:
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        good_bytes = 0
        for i, line in enumerate(lines):
            if not line.strip():
                good_bytes += len(line) + (1 if i < len(lines) - 1 else 0)
                continue
            is_last = all(not rest.strip() for rest in lines[i + 1 :])
            complete = i < len(lines) - 1  # a line followed by a newline was fully written
            try:
                rec = _decode(line.decode())
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
                if is_last and self.readonly:
                    return
                if is_last and repair:
                    log.warning("ledger %s: dropping %s last record (%s); it was being written when the run "
                                "stopped", self.path, "truncated" if not complete else "corrupt", err)
                    with open(self.path, "r+b") as fh:
                        fh.truncate(good_bytes)
                        fh.flush()
                        os.fsync(fh.fileno())
                    return
                raise LedgerError(f"{self.path}: record {i + 1} is corrupt ({err}); refusing to continue") from None
            if not complete and not repair:
                raise LedgerError(f"{self.path}: last record has no newline")
            if not complete and not self.readonly:
                # valid JSON but no newline: finish the line so later appends start cleanly
                with open(self.path, "ab") as fh:
                    fh.write(b"\n")
            self._records.append(rec)
            good_bytes += len(line) + 1

    def append(self, kind: str, **payload: Any) -> dict:
        """Durably append one record of ``kind`` (``header``, ``selected``, ``propagated``, ``round``, ``done``)."""
        if self.readonly:
            raise LedgerError(f"{self.path}: opened read-only")
        rec = {"kind": kind, **payload}
        line = _encode(rec)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        self._records.append(json.loads(line)["payload"])
        return rec

    @property
    def records(self) -> list[dict]:
        return list(self._records)

    def of_kind(self, kind: str) -> Iterator[dict]:
        return (r for r in self._records if r.get("kind") == kind)

    def header(self) -> dict | None:
        return next(self.of_kind("header"), None)

    def rounds(self) -> list[dict]:
        """Complete rounds in order."""
        return list(self.of_kind("round"))

    def selection(self, round_index: int) -> dict | None:
        """The ``selected`` record of a round, if it was written."""
        for r in self.of_kind("selected"):
            if r["round"] == round_index:
                return r
        return None

    def propagation(self, round_index: int) -> dict | None:
        """The ``propagated`` record of a round (its pseudo-labelling stage ran and was written), if any."""
        found = None
        for r in self.of_kind("propagated"):
            if r["round"] == round_index:
                found = r
        return found

    def last_propagation(self, before: int) -> dict | None:
        """The newest ``propagated`` record of a round before ``before`` (its scores feed round ``before``)."""
        found = None
        for r in self.of_kind("propagated"):
            if r["round"] < before and (found is None or r["round"] >= found["round"]):
                found = r
        return found

    def __len__(self) -> int:
        return len(self._records)
