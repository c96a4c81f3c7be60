"""Simulated annotators: stand-ins for people, for async runs with ``oracle: simulated`` and the benchmark.

Each annotator is a thread: ask for the next case, "label" it for a delay drawn uniformly from
``delay_s = (lo, hi)`` seconds, hand in the ground truth, repeat. The time spent with no case to take is its
idle time. Two ways in:

- :class:`DirectClient`: the workspace and the label store directly (in-process, no HTTP);
- :class:`HttpClient`: the MONAI Label-compatible HTTP API with a bearer token, uploading the ground truth as a
  NIfTI on the source image's grid, exactly as a viewer plugin would.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from raylearn.annotation.labels import LabelStore
from raylearn.annotation.workspace import Workspace

__all__ = ["DirectClient", "HttpClient", "SimulatedAnnotators"]

log = logging.getLogger(__name__)


class DirectClient:
    """Takes cases from the workspace queue (with a lease) and writes labels straight into the label store."""

    def __init__(self, store, labels: LabelStore, workspace: Workspace, user: str, lease_s: float = 900.0) -> None:
        self.store, self.labels, self.ws, self.user, self.lease_s = store, labels, workspace, user, lease_s

    def next(self) -> str | None:
        lease = self.ws.next_case(self.user, set(self.labels.labelled_ids()), self.lease_s)
        return lease.case_id if lease else None

    def submit(self, case_id: str) -> None:
        self.labels.put(case_id, self.store.get(case_id).label, "simulated", self.user)
        self.ws.release(case_id, self.user)


class HttpClient:
    """The annotation API over HTTP: ``POST /activelearning/{strategy}``, ``PUT /datastore/label``."""

    def __init__(self, base_url: str, token: str | None, store, strategy: str = "raylearn",
                 timeout_s: float = 60.0) -> None:
        import httpx

        self.store, self.strategy = store, strategy
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s)
        self.user = token or "anonymous"

    def next(self) -> str | None:
        r = self.http.post(f"/activelearning/{self.strategy}", json={})
        if r.status_code == 503:  # no run attached yet, or paused upstream
            return None
        r.raise_for_status()
        return r.json().get("id") or None

    def submit(self, case_id: str) -> None:
        from raylearn.serve.volumes import nifti_bytes

        image = self.store.restore(case_id, self.store.get(case_id).label)
        data = nifti_bytes(np.asarray(_array(image)), image)
        r = self.http.put("/datastore/label", params={"image": case_id, "tag": "final"},
                          files={"label": (f"{case_id}.nii.gz", data, "application/gzip")}, data={"params": "{}"})
        r.raise_for_status()


def _array(image):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(image)


class SimulatedAnnotators:
    """Annotator threads over ``clients`` (one per annotator), each labelling for ``delay_s`` seconds per case.

    Args:
        clients: one :class:`DirectClient` or :class:`HttpClient` per annotator.
        store: the pool store (ground truth).
        delay_s: ``(lo, hi)``: seconds per case, uniform.
        seed: seeds the delays (one generator per annotator).
        poll_s: how long an idle annotator waits before asking again.
    """

    def __init__(self, clients, store, delay_s: tuple[float, float] = (0.0, 0.0), seed: int = 0,
                 poll_s: float = 0.2) -> None:
        self.clients, self.store, self.delay_s, self.seed, self.poll_s = list(clients), store, delay_s, seed, poll_s
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.idle = [0.0] * len(self.clients)
        self.labelled: list[tuple[float, str, str]] = []  # (time, user, case)
        self.first_case_at: float | None = None  # unix time the first case was handed out
        self.errors: list[str] = []

    def start(self) -> SimulatedAnnotators:
        for i, client in enumerate(self.clients):
            t = threading.Thread(target=self._work, args=(i, client), name=f"annotator-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _work(self, i: int, client) -> None:
        rng = np.random.default_rng([self.seed, i])
        lo, hi = self.delay_s
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                case = client.next()
            except Exception as err:  # noqa: BLE001 - a server restarting: count as idle, retry
                self.errors.append(f"next: {err}")
                case = None
            if case is not None and self.first_case_at is None:
                self.first_case_at = time.time()
            if case is None:
                self._stop.wait(self.poll_s)
                self.idle[i] += time.monotonic() - t0
                continue
            if self._stop.wait(float(rng.uniform(lo, hi)) if hi > 0 else 0.0):
                return
            try:
                client.submit(case)
                self.labelled.append((time.time(), getattr(client, "user", str(i)), case))
            except Exception as err:  # noqa: BLE001 - recorded; the case stays leased until it expires
                self.errors.append(f"submit {case}: {err}")
                log.warning("annotator %d: %s", i, err)

    def idle_s(self) -> float:
        """Total idle seconds over all annotators."""
        return float(sum(self.idle))

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)
