"""One shard of the unlabelled pool: a Ray actor that holds its cases in memory and scores, extracts and evaluates
them with a checkpoint it loads once (cached by hash). :class:`raylearn.pool.ShardedPool` is the driver side that
spreads cases over shards, gathers their results and survives a dead shard; see :mod:`raylearn.pool`.
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray

from raylearn.pool_support import PoolError, compact_feature, load_class, open_store, ragged

__all__ = ["CaseHook", "PoolShard"]

log = logging.getLogger("raylearn.pool")


#: ``hook(shard_index, position, case_id)``: called in the shard process after each case is scored
CaseHook = Callable[[int, int, str], None]


@ray.remote
class PoolShard:
    """One shard of the unlabeled pool: holds its cases resident and scores them.

    Args:
        store: the pool store (or its path); pickled cheaply, re-opened here.
        case_ids: the cases this shard holds at start (a restarted actor re-loads these).
        index: shard number (for logs and state).
        torch_threads: intra-op threads of torch in this actor.
        prefault: read every case once at load so its pages are resident.
        preload: modules to import at start-up (the segmenter's, ``raylearn.scoring.features``).
        case_hook: called as ``case_hook(index, position, case_id)`` after each case is scored, before its
            result is kept (``position`` counts from 0 within the call). Shipped to the actor by pickling
            (closures are fine) and kept across restarts. An exception it raises fails the call.
    """

    def __init__(self, store: Any, case_ids: Sequence[str], index: int = 0, torch_threads: int = 1,
                 prefault: bool = True, preload: Sequence[str] = (), case_hook: CaseHook | None = None) -> None:
        import torch

        torch.set_num_threads(max(1, int(torch_threads)))
        for module in preload:  # pay the import cost at start-up, not in the first scoring round
            try:
                importlib.import_module(module)
            except ImportError as err:
                log.warning("shard %d: could not preload %s: %s", index, module, err)
        self.index = index
        self._store = open_store(store)
        self._prefault = prefault
        self._case_hook = case_hook
        self._cases: dict[str, Any] = {}
        self._segmenter: tuple[str, Any] | None = None
        self._extractor: tuple[str, Any] | None = None  # (weights hash, model) of a cold-start extractor
        self._started = time.time()
        self._load(case_ids)

    # -- residency --------------------------------------------------------------------------------
    def _load(self, ids: Iterable[str]) -> None:
        for cid in ids:
            if cid in self._cases:
                continue
            image = self._store.get(cid).image  # read-only view on the memory map; labels are not held
            if self._prefault:  # fault the mapped pages in now, not during the first scoring
                float(image.sum(dtype=np.float64))
            self._cases[cid] = image

    def hold(self, ids: Sequence[str], release_others: bool = True) -> int:
        """Make the resident set ``ids`` (loading missing cases; releasing the rest unless told not to)."""
        if release_others:
            keep = set(ids)
            for cid in [c for c in self._cases if c not in keep]:
                del self._cases[cid]
        self._load(ids)
        return len(self._cases)

    def remove(self, ids: Sequence[str]) -> int:
        """Release cases that left the pool (labelled). Unknown ids are ignored. Returns cases left."""
        for cid in ids:
            self._cases.pop(cid, None)
        return len(self._cases)

    def state(self) -> dict[str, Any]:
        """``{shard, pid, node_id, ids, n_cases, bytes_resident, rss_bytes, nice, uptime_s, segmenter_hash}``."""
        import psutil

        return {
            "shard": self.index,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "ids": sorted(self._cases),
            "n_cases": len(self._cases),
            "bytes_resident": int(sum(im.nbytes for im in self._cases.values())),
            "rss_bytes": int(psutil.Process().memory_info().rss),
            "nice": os.nice(0),
            "uptime_s": time.time() - self._started,
            "segmenter_hash": self._segmenter[0] if self._segmenter else None,
        }

    # -- scoring ----------------------------------------------------------------------------------
    def _get_segmenter(self, ckpt: list, ckpt_hash: str, segmenter_cls: str) -> tuple[Any, float]:
        if self._segmenter is not None and self._segmenter[0] == ckpt_hash:
            return self._segmenter[1], 0.0
        t0 = time.perf_counter()
        self._segmenter = None  # drop the old model before loading the next
        blob = ckpt[0] if isinstance(ckpt[0], bytes | bytearray) else ray.get(ckpt[0])
        cls = load_class(segmenter_cls)
        with tempfile.TemporaryDirectory(prefix="raylearn-shard-") as tmp:
            path = Path(tmp) / "checkpoint.pt"
            path.write_bytes(blob)
            seg = cls.load(path)
        self._segmenter = (ckpt_hash, seg)
        return seg, time.perf_counter() - t0

    def score(self, ckpt: list, ckpt_hash: str, segmenter_cls: str, feature_names: Sequence[str],
              params: Any, ids: Sequence[str] | None = None, release_others: bool = True,
              unit_grid: Any = None) -> dict[str, Any]:
        """Score cases with the checkpoint; see :meth:`ShardedPool.score`.

        Args:
            ckpt: ``[ObjectRef]`` (or ``[bytes]``) of the checkpoint file's bytes; nested in a list so Ray
                does not fetch it when the shard already has this checkpoint loaded.
            ckpt_hash: sha256 of the checkpoint bytes (the cache key).
            segmenter_cls: ``"module:QualName"`` of the :class:`~raylearn.models.base.Segmenter` to load.
            feature_names: names from ``raylearn.scoring.features.FEATURES``.
            params: a ``FeatureParams``.
            ids: the cases to score (default: all held). They are loaded from the store if not resident.
            release_others: release held cases not in ``ids`` (the driver's assignment is authoritative).
            unit_grid: units below a volume (:class:`raylearn.units.UnitGrid`, slices or patches): each feature
                per unit (``float32 [S]`` per case, S varying; ``class_entropy`` ``[S, K]``).

        Returns:
            ``{"shard", "ids": list[str] (N), "features": {name: array [N, ...]}, "load_s", "score_s", "cpu_s",
            "pid"}`` (seconds: model load, wall and process CPU time of the scoring loop). With ``unit_grid`` each
            feature is an object array ``[N]`` of per-case ``float32 [S]`` (or ``[S, K]``) arrays.
        """
        from raylearn.scoring.features import compute_features

        ids = sorted(self._cases) if ids is None else list(ids)
        self.hold(ids, release_others=release_others)
        seg, load_s = self._get_segmenter(ckpt, ckpt_hash, segmenter_cls)
        t0, c0 = time.perf_counter(), time.process_time()
        rows: dict[str, list[np.ndarray]] = {}
        for k, cid in enumerate(ids):
            try:
                feats = compute_features(seg, self._cases[cid], list(feature_names), params, unit_grid=unit_grid)
            except Exception as err:  # name the case: the traceback alone does not say which one failed
                msg = f"shard {self.index}: scoring case {cid!r} failed: {type(err).__name__}: {err}"
                raise PoolError(msg) from err
            if self._case_hook is not None:
                self._case_hook(self.index, k, cid)
            if k == 0:
                rows = {name: [] for name in feats}
            elif set(feats) != set(rows):
                raise PoolError(f"compute_features returned keys {sorted(feats)} for {cid!r}, "
                                f"expected {sorted(rows)}")
            n_units = None if unit_grid is None else unit_grid.count(np.shape(self._cases[cid]))
            for name, value in feats.items():
                rows[name].append(compact_feature(name, value, cid, n_units))
        features = {name: (ragged(vals) if unit_grid is not None else np.stack(vals)) for name, vals in rows.items()}
        return {"shard": self.index, "ids": ids, "features": features, "load_s": load_s,
                "score_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id()}

    # -- labelled cases and the test split (read from the store, not part of the pool) -------------
    def score_extra(self, ckpt: list, ckpt_hash: str, segmenter_cls: str, feature_names: Sequence[str],
                    params: Any, ids: Sequence[str]) -> dict[str, Any]:
        """Features of cases outside the pool (the labelled ones, for strategies that measure distances to
        them), with the checkpoint already loaded here: ``{"ids", "features": {name: [N, ...]}}``."""
        from raylearn.scoring.features import compute_features

        seg, _ = self._get_segmenter(ckpt, ckpt_hash, segmenter_cls)
        rows: dict[str, list[np.ndarray]] = {name: [] for name in feature_names}
        for cid in ids:
            feats = compute_features(seg, self._store.get(cid).image, list(feature_names), params)
            for name in feature_names:
                rows[name].append(compact_feature(name, feats[name], cid))
        return {"ids": list(ids), "features": {k: np.stack(v) for k, v in rows.items() if v}}

    def extract(self, model: list, model_hash: str, extractor: str, params: Any,
                ids: Sequence[str]) -> dict[str, Any]:
        """Label-free cold-start features of ``ids`` (:mod:`raylearn.models.extractors`), the extractor's model
        loaded once per weights hash: ``{"ids", "features": {name: [N, ...]}}``. Each case's random stream (masks,
        augmentations) is seeded by its id, so results do not depend on the sharding."""
        import hashlib

        from raylearn.models.extractors import extract_case, load_model

        if self._extractor is None or self._extractor[0] != model_hash:
            self._extractor = None
            blob = model[0] if isinstance(model[0], bytes | bytearray) else ray.get(model[0])
            self._extractor = (model_hash, load_model(extractor, blob, params))
        rows: dict[str, list[np.ndarray]] = {}
        for cid in ids:
            image = self._cases[cid] if cid in self._cases else self._store.get(cid).image
            seed = int.from_bytes(hashlib.sha256(cid.encode()).digest()[:4], "little")
            try:
                feats = extract_case(extractor, self._extractor[1], np.asarray(image), params, seed)
            except Exception as err:  # name the case
                raise PoolError(f"shard {self.index}: {extractor} features of {cid!r} failed: "
                                f"{type(err).__name__}: {err}") from err
            for name, value in feats.items():
                rows.setdefault(name, []).append(compact_feature(name, value, cid))
        return {"ids": list(ids), "features": {k: np.stack(v) for k, v in rows.items()}}

    def evaluate(self, ckpt: list, ckpt_hash: str, segmenter_cls: str, ids: Sequence[str],
                 metric_kw: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Predict test cases and score them against their ground truth: one metrics row per case
        (:func:`raylearn.metrics.evaluate_case` with ``metric_kw``, e.g. ``hd95``, ``surface_tolerance_mm``).
        The checkpoint is the one scoring uses (loaded once)."""
        from raylearn.metrics import evaluate_case

        seg, _ = self._get_segmenter(ckpt, ckpt_hash, segmenter_cls)
        rows = []
        for cid in ids:
            case = self._store.get(cid)
            pred = seg.predict_label(np.asarray(case.image))
            row = evaluate_case(pred, np.asarray(case.label), case.spacing, self._store.num_classes,
                                **dict(metric_kw or {}))
            rows.append({"case_id": cid, **row})
        return rows

    def ping(self) -> int:
        return os.getpid()

    def where(self) -> tuple[int, str]:
        """``(pid, node_id)`` of this shard process."""
        return os.getpid(), ray.get_runtime_context().get_node_id()
