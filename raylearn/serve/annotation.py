"""State of the annotation API in one ingress replica: the run it serves, users, the label upload path, inference.

Everything durable lives in the run's folders (:class:`~raylearn.annotation.workspace.Workspace`,
:class:`~raylearn.annotation.labels.LabelStore`), so any number of replicas, a restarted server and the driver
share it; this object only caches handles (the pool store, the current segmenter).
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException

from raylearn.annotation.labels import LabelStore, LabelStoreError, label_digest
from raylearn.annotation.validate import LabelInvalid, check_label
from raylearn.annotation.workspace import LeaseError, Workspace
from raylearn.serve.config import AnnotationConfig
from raylearn.serve.guard import User, token_digest

__all__ = ["AnnotationService", "users_from_config"]

log = logging.getLogger(__name__)


def users_from_config(cfg: AnnotationConfig | None) -> dict[str, User]:
    """``{sha256(token): User}`` of the configured users (a missing ``token_env`` is an error naming it)."""
    out: dict[str, User] = {}
    for u in (cfg.users if cfg else []):
        if u.token_sha256:
            digest = u.token_sha256
        else:
            token = u.token if u.token is not None else os.environ.get(u.token_env or "")
            if not token or len(token) < 8:
                raise ValueError(f"annotation.users[{u.name}]: env var {u.token_env} is unset or shorter than 8 "
                                 "characters in the replica's environment")
            digest = token_digest(token)
        if digest in out:
            raise ValueError(f"annotation.users[{u.name}]: the same token as user {out[digest].name!r}")
        out[digest] = User(u.name, u.role)
    return out


class AnnotationService:
    """The annotation side of the ingress (see :mod:`raylearn.serve.annotation_api` for the routes)."""

    def __init__(self, cfg: AnnotationConfig) -> None:
        self.cfg = cfg
        self.ws = Workspace(Path(cfg.run_dir).expanduser() / "annotation")
        self._store: tuple[str, Any] | None = None
        self._labels: tuple[str, LabelStore] | None = None
        self._segmenter: tuple[str, float, Any] | None = None
        self._lock = threading.Lock()

    # -- the run ----------------------------------------------------------------------------------
    def run(self) -> dict:
        run = self.ws.run()
        if run is None:
            raise HTTPException(503, f"no run is attached: {self.ws.root / 'run.json'} does not exist yet (start "
                                     "`raylearn run` with this output_dir)", headers={"Retry-After": "10"})
        return run

    def store(self):
        from raylearn.data.store import PoolStore

        path = self.run()["store"]
        with self._lock:
            if self._store is None or self._store[0] != path:
                self._store = (path, PoolStore.open(path))
            return self._store[1]

    def labels(self) -> LabelStore:
        run = self.run()
        with self._lock:
            if self._labels is None or self._labels[0] != run["labels"]:
                self._labels = (run["labels"], LabelStore(run["labels"], known_ids=set(run["pool_ids"])))
            return self._labels[1]

    def classes(self) -> dict[int, str]:
        return {int(k): v for k, v in self.run()["classes"].items()}

    def lease_s(self) -> float:
        return float(self.cfg.lease_s or self.run().get("lease_s") or 900.0)

    def pool_case(self, case_id: str) -> str:
        """404 unless ``case_id`` is a pool case (test cases are never handed out or labelled)."""
        run = self.run()
        if case_id not in set(run["pool_ids"]):
            store = self.store()
            where = "is in the test split" if case_id in store else "is not in the pool store"
            raise HTTPException(404, f"unknown case {case_id!r}: it {where}")
        return case_id

    def image_path(self, case_id: str) -> Path:
        self.pool_case(case_id)
        paths = self.store().manifest.set_index("case_id").loc[case_id, "image_paths"]
        path = Path(list(paths)[0])
        if not path.is_file():
            raise HTTPException(404, f"the source image of case {case_id!r} is not readable on the server")
        return path

    # -- labels -----------------------------------------------------------------------------------
    def save_label(self, case_id: str, data: bytes, tag: str, user: User, params: dict, limits) -> dict:
        """Validate an uploaded label against the case's image and store it; 4xx (nothing stored) on any problem."""
        from raylearn.serve.volumes import VolumeError, read_volume

        self.pool_case(case_id)
        store, labels = self.store(), self.labels()
        try:
            image = read_volume(data, "label", limits)
        except VolumeError as err:
            raise HTTPException(err.status, str(err)) from None
        try:
            checked = check_label(image, store.meta(case_id), self.classes(), self.cfg.allow_empty_labels)
        except LabelInvalid as err:
            raise HTTPException(err.status, f"case {case_id!r}: {err}") from None
        latest = labels.latest(case_id, tag)
        if latest is not None and latest.sha256 == label_digest(checked.array):  # a retry: idempotent
            return self._label_response(latest, created=False)
        lease = None
        if self.cfg.require_lease and not user.has("admin"):
            try:
                lease = self.ws.check_upload(case_id, user.name)
            except LeaseError as err:
                raise HTTPException(err.status, str(err)) from None
        try:
            rec = labels.put(case_id, checked.array, "human", user.name, tag,
                             info={"values": checked.values, "dropped_foreground_voxels":
                                   checked.dropped_foreground_voxels, "params": params,
                                   "lease_acquired": lease.acquired if lease else None})
        except LabelStoreError as err:
            raise HTTPException(422, str(err)) from None
        if tag == "final":
            self.ws.release(case_id)
        return self._label_response(rec, created=rec.created)

    @staticmethod
    def _label_response(rec, created: bool) -> dict:
        return {"image": rec.case_id, "label": rec.case_id, "tag": rec.tag, "version": rec.version,
                "created": created, "sha256": rec.sha256, "annotator": rec.annotator, "source": rec.source,
                "foreground_voxels": rec.foreground_voxels, "time": rec.time}

    def label_nifti(self, case_id: str, tag: str, version: int | None = None) -> bytes:
        """A stored label on the source image's grid, as ``.nii.gz`` bytes."""
        from raylearn.serve.volumes import nifti_bytes

        self.pool_case(case_id)
        try:
            arr = self.labels().read(case_id, version, tag)
        except KeyError as err:
            raise HTTPException(404, str(err).strip("'\"")) from None
        img = self.store().restore(case_id, arr)
        return nifti_bytes(_array(img), img)

    # -- datastore listing ------------------------------------------------------------------------
    def datastore(self) -> dict:
        """MONAI Label's ``LocalDatastoreModel`` JSON: every pool case with its label tags."""
        run, labels = self.run(), self.labels()
        latest: dict[str, dict[str, Any]] = {}
        for r in labels.records():
            latest.setdefault(r.case_id, {})[r.tag] = r
        objects = {}
        for cid in run["pool_ids"]:
            tags = latest.get(cid, {})
            objects[cid] = {"image": {"ext": ".nii.gz", "info": {"name": cid}},
                            "labels": {t: {"ext": ".nii.gz", "info": {"version": r.version, "annotator": r.annotator,
                                                                     "source": r.source, "ts": int(r.time),
                                                                     "sha256": r.sha256}}
                                       for t, r in tags.items()}}
        return {"name": run.get("name", "raylearn"), "description": "raylearn pool (label store)",
                "images_dir": ".", "labels_dir": "labels", "objects": objects}

    def datastore_stats(self) -> dict:
        run, recs = self.run(), self.labels().records()
        tags: dict[str, set[str]] = {}
        for r in recs:
            tags.setdefault(r.tag, set()).add(r.case_id)
        return {"total": len(run["pool_ids"]), "completed": len(tags.get("final", set())),
                "label_tags": {t: len(c) for t, c in tags.items()}}

    # -- status -----------------------------------------------------------------------------------
    def status(self) -> dict:
        """Round, labelled count, model version, learning curve, queue and leases, plus what the status page shows
        (:func:`raylearn.serve.status_page.status_details`)."""
        from raylearn.ledger import Ledger
        from raylearn.serve.status_page import status_details

        run, q = self.run(), self.ws.queue()
        records = Ledger(run["ledger"], readonly=True).records if Path(run["ledger"]).exists() else []
        rounds = [r for r in records if r.get("kind") == "round"]
        curve = [{"round": r["round"], "n_labeled": r["n_labeled"], "fraction_labelled": r["fraction_labelled"],
                  "dice_mean": r["metrics"].get("dice_mean")} for r in rounds]
        stats = self.datastore_stats()
        leases = self.ws.leases()
        return {"run": run.get("name"), "mode": run.get("mode"), "oracle": run.get("oracle"),
                "strategy": run.get("strategy"), "round": rounds[-1]["round"] if rounds else None,
                "labelled": stats["completed"], "pool": stats["total"], "model_version": q.get("model_version"),
                "checkpoint": Path(q["checkpoint"]).name if q.get("checkpoint") else None,
                "queue": [c for c in q.get("candidates", []) if c not in self.labels()],
                "leases": {c: v.as_json() for c, v in leases.items()}, "learning_curve": curve,
                "paused": bool((self.ws.read("control") or {}).get("paused", False)),
                **status_details(run, q, leases, self.labels().records(), records)}

    # -- inference --------------------------------------------------------------------------------
    def checkpoint(self) -> tuple[str, int | None]:
        """The current model's checkpoint and version (one read of the queue, so they belong together)."""
        q = self.ws.queue()
        ckpt = q.get("checkpoint")
        if not ckpt or not Path(ckpt).is_file():
            raise HTTPException(503, "no model yet: the first round has not finished training",
                                headers={"Retry-After": "30"})
        return ckpt, q.get("model_version")

    def segmenter(self):
        """``(segmenter, checkpoint path, model version)``; reloaded when the driver publishes a new round."""
        from raylearn.models.loading import load_segmenter

        path, version = self.checkpoint()
        mtime = Path(path).stat().st_mtime
        with self._lock:
            if self._segmenter is None or self._segmenter[:2] != (path, mtime):
                self._segmenter = (path, mtime, load_segmenter(path, device=self.cfg.infer_device))
            return self._segmenter[2], path, version

    def infer(self, case_id: str) -> tuple[bytes, dict]:
        """The current model's prediction of a pool case as ``.nii.gz`` on the source grid, and its details."""
        from raylearn.serve.volumes import nifti_bytes

        self.pool_case(case_id)
        seg, path, version = self.segmenter()
        t0 = time.perf_counter()
        pred = np.asarray(seg.predict_label(self.store().get(case_id).image), dtype=np.uint8)
        img = self.store().restore(case_id, pred)
        counts = np.bincount(pred.ravel(), minlength=len(self.classes()))
        params = {"model": "segmenter", "checkpoint": Path(path).name, "model_version": version,
                  "latency_ms": round(1e3 * (time.perf_counter() - t0), 1),
            "label_names": {v: k for k, v in self.classes().items()},
            "voxels": {self.classes().get(k, str(k)): int(n) for k, n in enumerate(counts) if k}}
        return nifti_bytes(_array(img), img), params

    # -- admin ------------------------------------------------------------------------------------
    def export(self) -> bytes:
        """A zip of every case's latest ``final`` label on the source grid (``labels/<case>.nii.gz``) and the
        label record (``labels.jsonl``)."""
        labels = self.labels()
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for cid in labels.labelled_ids():
                zf.writestr(f"labels/{cid}.nii.gz", self.label_nifti(cid, "final"))
            zf.writestr("labels.jsonl", "".join(json.dumps(r.as_json()) + "\n" for r in labels.records()))
        return buf.getvalue()


def _array(img):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(img)
