"""Click sessions held by the ingress replica: volume, cached embedding, accumulated clicks, low-res masks."""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from raylearn.models.sam_med3d import Click, Volume


@dataclass
class Session:
    """One uploaded volume in the ``size^3`` model window at ``start``; ``embedding [C,g,g,g]`` computed once."""

    volume: Volume
    start: tuple[int, int, int]
    size: int
    embedding: np.ndarray
    encoder_digest: str | None = None  # the model's image encoder the embedding came from
    clicks: list[Click] = field(default_factory=list)
    low_res: dict[int, np.ndarray] = field(default_factory=dict)
    encoder_calls: int = 0
    decoder_calls: int = 0
    session_id: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)  # serialises clicks and DELETE
    closed: bool = False  # set under ``lock`` by DELETE: a click queued behind it answers 404, not 200


def short_id(session_id: str, keep: int = 24) -> str:
    """A session id fit for an error message: at most ``keep`` characters, quoted."""
    return repr(session_id if len(session_id) <= keep else session_id[:keep] + "...")


class SessionNotFound(KeyError):
    """No live session with this id (never created, deleted, or expired)."""


class SessionStore:
    """Sessions by id with an idle TTL (expired ones are purged on every access) and an LRU size cap."""

    def __init__(self, ttl_s: float = 1800.0, max_sessions: int = 32) -> None:
        self.ttl_s = float(ttl_s)
        self.max_sessions = int(max_sessions)
        self._data: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()
        self.expired = 0

    def _purge(self, now: float) -> None:
        for sid in [s for s, v in self._data.items() if now - v.last_used > self.ttl_s]:
            del self._data[sid]
            self.expired += 1

    def add(self, session: Session) -> Session:
        with self._lock:
            self._purge(time.monotonic())
            self._data[session.session_id] = session
            while len(self._data) > self.max_sessions:
                self._data.popitem(last=False)
        return session

    def get(self, session_id: str) -> Session:
        """The live session (its idle clock restarts). Raises :class:`SessionNotFound`."""
        with self._lock:
            now = time.monotonic()
            self._purge(now)
            if session_id not in self._data:
                raise SessionNotFound(session_id)
            s = self._data[session_id]
            s.last_used = now
            self._data.move_to_end(session_id)
            return s

    def delete(self, session_id: str) -> None:
        """Forget a session. Raises :class:`SessionNotFound`."""
        with self._lock:
            self._purge(time.monotonic())
            if self._data.pop(session_id, None) is None:
                raise SessionNotFound(session_id)

    def expires_in(self, session: Session) -> float:
        return max(0.0, self.ttl_s - (time.monotonic() - session.last_used))

    def __len__(self) -> int:
        with self._lock:
            self._purge(time.monotonic())
            return len(self._data)
