"""The feature-extractor stage before round 0: label-free features on the sharded pool, cached in the store.

A strategy declares extractor features (``csal3d_*``, ``sugfw_*``; see
:data:`raylearn.scoring.coldstart.EXTRACTOR_FEATURES`) among its requirements and their settings through
:meth:`~raylearn.strategies.base.QueryStrategy.extractor_settings`. :func:`extractor_records` computes exactly
those: per extractor it prepares the model once on the driver (CSAL-3D: the pretext model trained with Ray Train
on the store's whole unlabelled pool split; SUGFW: SAM's weights from the local checkpoint), then the pool shards
extract every missing case in parallel.

Cache: ``<store>/extractors/<extractor>-<settings hash[:16]>/`` holds ``settings.json``, ``features.npz`` (case
ids + one array per feature) and, for CSAL-3D, ``pretext.pt``. The key is the extractor's name and the hash of
its validated settings, so every run on the same store (``compare``'s strategies, Tune's trials, a resumed run,
the benchmark's seeds) reuses it; a lock file serialises concurrent writers. Features depend on the case id only
(each case's random stream is seeded by its id), so a cache filled in several calls equals one filled at once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from raylearn.models.extractors import extractors_for, parse_params, settings_hash
from raylearn.scoring.coldstart import EXTRACTOR_FEATURES

__all__ = ["FeatureCache", "extractor_records", "split_features"]

log = logging.getLogger(__name__)


def split_features(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """``(other names, extractor feature names)``, each sorted: the loop hands the first to the segmenter's
    scoring (and the store's ground truth), the second to :func:`extractor_records`."""
    names = set(names)
    ext = sorted(n for n in names if n in EXTRACTOR_FEATURES)
    return sorted(names - set(ext)), ext


class FeatureCache:
    """One extractor's cache folder in the store (see the module docstring)."""

    def __init__(self, store_path: str | Path, extractor: str, params: Any) -> None:
        self.extractor, self.params = extractor, params
        self.key = settings_hash(extractor, params)
        self.dir = Path(store_path) / "extractors" / f"{extractor}-{self.key[:16]}"

    @contextmanager
    def lock(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def load(self) -> dict[str, dict[str, np.ndarray]]:
        """Cached features ``{case id: {name: value}}`` (empty when nothing is cached)."""
        path = self.dir / "features.npz"
        if not path.is_file():
            return {}
        with np.load(path, allow_pickle=False) as z:
            ids = [str(c) for c in z["case_ids"]]
            cols = {k: z[k] for k in z.files if k != "case_ids"}
        return {cid: {k: v[i] for k, v in cols.items()} for i, cid in enumerate(ids)}

    def save(self, records: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        ids = sorted(records)
        names = sorted(next(iter(records.values())))
        tmp = self.dir / f".features-{os.getpid()}.npz"
        np.savez(tmp, case_ids=np.array(ids, dtype=str), **{n: np.stack([records[c][n] for c in ids]) for n in names})
        os.replace(tmp, self.dir / "features.npz")
        (self.dir / "settings.json").write_text(json.dumps(
            {"extractor": self.extractor, "settings_hash": self.key, "settings": self.params.model_dump(mode="json"),
             "n_cases": len(ids), "written": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))

    def read_blob(self, name: str) -> bytes | None:
        path = self.dir / name
        return path.read_bytes() if path.is_file() else None

    def write_blob(self, name: str, blob: bytes) -> None:
        tmp = self.dir / f".{name}-{os.getpid()}"
        tmp.write_bytes(blob)
        os.replace(tmp, self.dir / name)


def _model_blob(extractor: str, params: Any, cache: FeatureCache, store: Any, storage: str) -> bytes:
    """The extractor's weights: CSAL-3D's pretext model (trained once, cached), or SAM's."""
    if extractor == "sugfw":
        from raylearn.models.sam2d import sam_blob

        return sam_blob(params)
    from raylearn.train.pretext import PRETEXT_FILE, train_pretext

    blob = cache.read_blob(PRETEXT_FILE)
    if blob is None:
        pool_ids = sorted(store.case_ids("pool"))  # the whole unlabelled split; no label is read
        blob, metrics = train_pretext(store, pool_ids, params, storage, name=f"csal3d-pretext-{cache.key[:12]}",
                                      in_channels=int(store.num_channels))
        cache.write_blob(PRETEXT_FILE, blob)
        log.info("csal3d pretext model trained on %d pool cases (loss %.4f), cached in %s", len(pool_ids),
                 metrics.get("loss", float("nan")), cache.dir)
    return blob


def extractor_records(pool: Any, store: Any, names: Iterable[str], settings: Mapping[str, Mapping[str, Any]],
                      ids: Sequence[str], storage: str) -> dict[str, dict[str, np.ndarray]]:
    """Extractor features of ``ids``: ``{case id: {name: value}}``, from the cache or computed on the pool.

    Args:
        pool: a :class:`raylearn.pool.ShardedPool` (anything with ``extract(extractor, params, blob, ids)``).
        store: the pool store (``path``, ``case_ids``, ``num_channels``).
        names: requested feature names; only extractor features are handled.
        settings: ``{extractor: settings mapping}`` (missing = defaults); validated here (``ValueError`` naming
            the key).
        ids: the cases needed.
        storage: Ray Train ``storage_path`` for the pretext training.
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    for ext, feats in extractors_for(names).items():
        params = parse_params(ext, settings.get(ext))
        cache = FeatureCache(store.path, ext, params)
        with cache.lock():
            have = cache.load()
            missing = [c for c in ids if c not in have]
            if missing:
                t0 = time.perf_counter()
                blob = _model_blob(ext, params, cache, store, storage)
                have.update(pool.extract(ext, params, blob, missing))
                cache.save(have)
                log.info("%s features of %d case(s) in %.1f s (cache %s)", ext, len(missing),
                         time.perf_counter() - t0, cache.dir)
        for cid in ids:
            out.setdefault(cid, {}).update({n: have[cid][n] for n in feats})
    return out
