"""The full-pool reference: the Dice a model reaches with every pool case labelled, at the run's step budget.

A run's curve is only comparable with a reference trained as long as the whole run trained its model, so
the reference gets ``first_round_steps + rounds * steps`` optimiser steps (MONAI) or
``(1 + rounds) * model.nnunet.epochs`` epochs (nnU-Net) on all pool labels, from scratch. It is cached in
``<cache_dir>/reference.json`` keyed by everything that shapes it (data, model, training recipe, budget,
test split, metrics; not the run's seed), so ``compare`` trains it once, with the first run's seed, and
every strategy and seed reuses it; an interrupted run does not retrain it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from raylearn.ledger import config_hash

__all__ = ["reference_key", "full_pool_reference", "mean_metrics"]

log = logging.getLogger(__name__)


def mean_metrics(rows: list[dict]) -> dict[str, float]:
    """Mean of every metric over cases (NaN-aware; a metric undefined for every case stays NaN)."""
    keys = sorted({k for r in rows for k in r if k != "case_id"})
    out = {}
    for k in keys:
        vals = np.array([r.get(k, np.nan) for r in rows], dtype=float)
        finite = vals[np.isfinite(vals)]
        out[k] = float(finite.mean()) if finite.size else float("nan")
    return out


def reference_key(cfg, model_cfg, test_ids: list[str]) -> tuple[str, int]:
    """``(key, budget)``: the cache key of the reference for this experiment and its step (or epoch) budget."""
    if model_cfg.backend == "nnunet":
        budget = (1 + cfg.schedule.rounds) * model_cfg.nnunet.epochs
    else:
        budget = cfg.train.run_steps(cfg.schedule.rounds)
    train = cfg.train.model_dump(mode="json")
    train.pop("storage_path", None)
    # the run's seed is left out: one reference serves every seed and strategy of a comparison
    key = config_hash({"data": cfg.data.model_dump(mode="json"), "model": model_cfg.model_dump(mode="json"),
                       "train": train, "budget": budget, "test_ids": test_ids, "hd95": cfg.evaluate.hd95,
                       "surface_tol": cfg.evaluate.surface_dice_tolerance_mm})
    return key, budget


def _cached(cache_dir: Path, key: str) -> dict | None:
    """The reference recorded in ``cache_dir`` for ``key``, else None."""
    path = Path(cache_dir) / "reference.json"
    rec = json.loads(path.read_text()) if path.is_file() else None
    return rec if rec is not None and rec.get("key") == key else None


def reference_cached(cfg, model_cfg, test_ids: list[str], cache_dir: Path) -> bool:
    """Whether :func:`full_pool_reference` will read the reference back instead of training it."""
    return _cached(cache_dir, reference_key(cfg, model_cfg, test_ids)[0]) is not None


def full_pool_reference(cfg, model_cfg, store, pool_ids: list[str], test_ids: list[str], cache_dir: Path,
                        evaluate) -> dict:
    """Train (or read back) the full-pool reference; returns ``{"key", "budget", "metrics", "checkpoint"}``.

    Args:
        cfg: the experiment config; model_cfg: its resolved model config.
        evaluate: ``evaluate(checkpoint_path) -> metrics`` on the test split.
    """
    from raylearn.train.backends import MonaiRounds, NnunetRounds

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key, budget = reference_key(cfg, model_cfg, test_ids)
    path = cache_dir / "reference.json"
    rec = _cached(cache_dir, key)
    if rec is not None:
        return rec
    unit = "epochs" if model_cfg.backend == "nnunet" else "steps"
    log.info("training the full-pool reference on %d cases (%d %s)", len(pool_ids), budget, unit)
    train_cfg = cfg.train.model_copy(update={"seed": cfg.seed})
    from raylearn.annotation import LabelledStore, LabelStore
    from raylearn.oracle import SimulatedOracle

    labels = LabelStore(cache_dir / "labels", known_ids=set(pool_ids))  # training reads labels only from here
    SimulatedOracle(store, labels).label(pool_ids)
    store = LabelledStore(store, labels)
    if model_cfg.backend == "nnunet":
        trainer = NnunetRounds(store, model_cfg, train_cfg, cache_dir, resume=True, epochs=budget)
    else:  # resume=True: an interrupted reference continues from its last checkpoint
        trainer = MonaiRounds(store, model_cfg, train_cfg, budget, cache_dir, resume=True, name=f"reference_{key}")
    trainer.start()
    try:
        ckpt, info = trainer.fit(0, pool_ids, seed=cfg.seed, steps=budget if unit == "steps" else None,
                                 name="reference")
    finally:
        trainer.stop()
    rec = {"key": key, "budget": budget, "unit": unit, "n_cases": len(pool_ids), "metrics": evaluate(ckpt),
           "checkpoint": ckpt, "train_wall_s": info.get("wall_s")}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, path)
    return rec
