"""The annotation workspace of a run: what the driver and the annotation API share, on disk.

``<output_dir>/annotation/`` holds small JSON files, each replaced atomically (temporary file, fsync,
``os.replace``) under one ``fcntl.flock``, so the driver, every Serve replica and a restarted server see the
same state without a shared process (and a ``kill -9`` of any of them loses nothing written):

- ``run.json``: written once by the driver: pool store path, label store path, pool ids, classes, schedule
  mode, the ledger's path (for the learning curve);
- ``queue.json``: the driver's current suggestions (ranked case ids from the query strategy, the round, the
  model version and its checkpoint);
- ``leases.json``: who holds which case, until when (expired leases are kept, to answer "your lease expired");
- ``control.json``: admin settings (``paused``, a strategy override for the next rounds).

Hand-written (about 150 lines) rather than a database: the state is a few kilobytes, must survive ``kill -9``,
be readable by any process on a shared filesystem, and needs no server of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raylearn.annotation.labels import file_lock, fsync_dir

__all__ = ["Lease", "LeaseError", "Workspace"]

#: an expired lease record is forgotten after this long (seconds)
FORGET_EXPIRED_S = 24 * 3600.0


class LeaseError(ValueError):
    """A lease does not allow the action; ``status`` is the HTTP status (409 held by another, 410 expired)."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Lease:
    case_id: str
    user: str
    acquired: float
    expires: float

    def active(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) < self.expires

    def as_json(self) -> dict[str, Any]:
        return {"case_id": self.case_id, "user": self.user, "acquired": self.acquired, "expires": self.expires,
                "expires_in_s": max(0.0, round(self.expires - time.time(), 1))}


class Workspace:
    """Shared annotation state of one run under ``root`` (``<output_dir>/annotation``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    # -- files ------------------------------------------------------------------------------------
    def lock(self) -> contextlib.AbstractContextManager[None]:
        """An exclusive lock across processes (``fcntl.flock`` on ``root/.lock``)."""
        return file_lock(self.root / ".lock")

    def read(self, name: str, default: Any = None) -> Any:
        path = self.root / f"{name}.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return default

    def write(self, name: str, data: Any) -> None:
        """Replace ``<name>.json`` atomically and durably (call under :meth:`lock` when read-modify-write)."""
        path = self.root / f"{name}.json"
        tmp = path.with_name(f".{name}.json.tmp")
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=1, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(self.root)

    def update(self, name: str, **fields: Any) -> dict:
        with self.lock():
            data = {**(self.read(name) or {}), **fields}
            self.write(name, data)
        return data

    # -- run and queue ----------------------------------------------------------------------------
    def run(self) -> dict | None:
        """``run.json`` (None before a driver attached a run)."""
        return self.read("run")

    def queue(self) -> dict:
        return self.read("queue") or {"round": None, "candidates": [], "model_version": None, "checkpoint": None}

    def publish(self, round_index: int, candidates: list[str], checkpoint: str | None, model_version: int | None,
                scores: dict[str, float] | None = None) -> None:
        """The driver's new suggestions (ranked), the model they were scored with, and its checkpoint."""
        with self.lock():
            self.write("queue", {"round": int(round_index), "candidates": [str(c) for c in candidates],
                                 "scores": scores or {}, "checkpoint": checkpoint, "model_version": model_version,
                                 "updated": time.time()})

    # -- leases -----------------------------------------------------------------------------------
    def _leases(self, now: float) -> dict[str, Lease]:
        raw = self.read("leases", {}) or {}
        out = {c: Lease(**v) for c, v in raw.items()}
        return {c: lease for c, lease in out.items() if now - lease.expires < FORGET_EXPIRED_S}

    def _save_leases(self, leases: dict[str, Lease]) -> None:
        self.write("leases", {c: {"case_id": v.case_id, "user": v.user, "acquired": v.acquired,
                                  "expires": v.expires} for c, v in leases.items()})

    def leases(self) -> dict[str, Lease]:
        """Active leases by case id."""
        now = time.time()
        return {c: v for c, v in self._leases(now).items() if v.active(now)}

    def leased_ids(self, exclude_user: str | None = None) -> set[str]:
        return {c for c, v in self.leases().items() if v.user != exclude_user}

    def acquire(self, case_id: str, user: str, ttl_s: float) -> Lease:
        """Lease ``case_id`` to ``user`` for ``ttl_s`` (renews the user's own lease); 409 when another holds it."""
        with self.lock():
            now = time.time()
            leases = self._leases(now)
            cur = leases.get(case_id)
            if cur is not None and cur.active(now) and cur.user != user:
                raise LeaseError(f"case {case_id!r} is leased by {cur.user!r} for another "
                                 f"{cur.expires - now:.0f} s", 409)
            lease = Lease(case_id, user, cur.acquired if cur and cur.user == user and cur.active(now) else now,
                          now + ttl_s)
            leases[case_id] = lease
            self._save_leases(leases)
            return lease

    def renew(self, case_id: str, user: str, ttl_s: float) -> Lease:
        """Extend the user's active lease; 410 when it expired, 409 when another user holds the case."""
        self.check_upload(case_id, user)
        return self.acquire(case_id, user, ttl_s)

    def release(self, case_id: str, user: str | None = None) -> None:
        with self.lock():
            leases = self._leases(time.time())
            if case_id in leases and (user is None or leases[case_id].user == user):
                del leases[case_id]
                self._save_leases(leases)

    def check_upload(self, case_id: str, user: str) -> Lease:
        """The user's active lease on ``case_id``, else :class:`LeaseError` naming why (no lease, expired, other)."""
        now = time.time()
        cur = self._leases(now).get(case_id)
        if cur is None:
            raise LeaseError(f"user {user!r} holds no lease on case {case_id!r}: fetch it first "
                             "(POST /activelearning/<strategy>, or POST /v1/annotation/leases/<case>)", 409)
        if cur.user != user:
            if cur.active(now):
                raise LeaseError(f"case {case_id!r} is leased by {cur.user!r}, not {user!r}", 409)
            raise LeaseError(f"user {user!r} holds no lease on case {case_id!r} (the last one, {cur.user!r}'s, "
                             "expired)", 409)
        if not cur.active(now):
            raise LeaseError(f"the lease of {user!r} on case {case_id!r} expired {now - cur.expires:.0f} s ago; "
                             "fetch or renew it (POST /v1/annotation/leases/<case>) before uploading", 410)
        return cur

    # -- suggestions ------------------------------------------------------------------------------
    def next_case(self, user: str, labelled: set[str], ttl_s: float, strategy: str = "queue",
                  pool_ids: list[str] | None = None, rng: np.random.Generator | None = None) -> Lease | None:
        """The next case for ``user`` and its lease: the user's own open case first, then the first queued case
        nobody labelled or holds (``strategy="queue"``), or a random free pool case (``"random"``)."""
        with self.lock():
            now = time.time()
            leases = self._leases(now)
            mine = [v for v in leases.values() if v.user == user and v.active(now) and v.case_id not in labelled]
            if mine:
                pick = min(mine, key=lambda v: v.acquired).case_id
            else:
                held = {c for c, v in leases.items() if v.active(now)}
                if strategy == "random":
                    free = sorted(set(pool_ids or []) - labelled - held)
                    pick = str((rng or np.random.default_rng()).choice(free)) if free else None
                else:
                    pick = next((c for c in self.queue()["candidates"] if c not in labelled and c not in held), None)
            if pick is None:
                return None
            cur = leases.get(pick)
            lease = Lease(pick, user, cur.acquired if cur and cur.user == user and cur.active(now) else now,
                          now + ttl_s)
            leases[pick] = lease
            self._save_leases(leases)
            return lease
