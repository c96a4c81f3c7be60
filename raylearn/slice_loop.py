"""The round loop's annotation-unit glue (``unit: volume | slice | patch``), kept out of :mod:`raylearn.loop`.

With ``unit: volume`` every helper here is the identity of what the loop did before slice units (units are case
ids). With ``unit: slice`` or ``unit: patch``:

- :func:`unit_space`: the pool's slice or patch units from the store's grid shapes
  (:class:`raylearn.units.UnitSpace`);
- :func:`slice_view`: the strategy's :class:`~raylearn.strategies.PoolView` over the units: the shards compute
  each model feature per unit (the voxel map reduced over the slice or patch,
  :func:`raylearn.scoring.reduce.reduce_slices` / :func:`~raylearn.scoring.reduce.reduce_regions`), ground-truth
  features (nnActive's foreground-aware random) are counted per unit from the store, and the last pseudo-labelling
  stage's scores come as the feature ``propagation_score`` (NaN where absent);
- :func:`training_ids`: the cases training reads (any annotated unit, or pseudo-labels);
- :func:`propagate_round`: a strategy's pseudo-labelling stage (:mod:`raylearn.propagation`), recorded in the
  ledger (kind ``propagated``) and re-used on resume.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from raylearn.units import UnitSpace

__all__ = ["propagate_round", "slice_view", "training_ids", "unit_space"]

log = logging.getLogger(__name__)

PROPAGATION_FEATURE = "propagation_score"


def unit_space(cfg, store, pool_ids: list[str]) -> UnitSpace:
    """The run's annotation units: the pool's cases, every slice of them along ``unit.axis``, or every patch of
    at most ``unit.size``."""
    if cfg.unit.kind == "volume":
        return UnitSpace(pool_ids)
    table = store.manifest.set_index("case_id")
    shapes = {c: tuple(int(x) for x in table.at[c, "shape"]) for c in pool_ids}
    return UnitSpace(pool_ids, cfg.unit.kind, cfg.unit.axis, shapes, patch_size=cfg.unit.size)


def training_ids(units: UnitSpace, labeled: list[str], labels) -> list[str]:
    """What training reads: the labelled cases (volume units), or the cases with an annotated slice or
    pseudo-labels (slice units), in pool order."""
    if not units.partial:
        return list(labeled)
    have = set(units.labelled_cases(labeled)) | set(labels.pseudo_ids())
    return [c for c in units.case_ids if c in have]


def slice_view(pool, checkpoint: str | None, strategy, cfg, units: UnitSpace, labeled: list[str],
               round_index: int | None, scores: dict[str, float] | None, store=None):
    """The strategy's PoolView over slice or patch units (see the module docstring).

    Args:
        pool: the :class:`~raylearn.pool.ShardedPool` holding the cases with unlabelled units.
        checkpoint: the segmenter's checkpoint (None before round 0 trained: no model features then).
        strategy: the round's strategy (its ``requires`` are per-unit features, checked at config load).
        cfg: the experiment config.
        units: the run's slice or patch units.
        labeled: unit ids labelled so far.
        round_index: the round the selection is for.
        scores: the last pseudo-labelling stage's unit scores, or None.
        store: the pool store (ground-truth features per unit, :func:`~raylearn.scoring.features.label_unit_records`).
    """
    from raylearn.scoring.features import LABEL_FEATURES, UNIT_FEATURES, label_unit_records, model_features
    from raylearn.strategies import PoolView

    ids = np.asarray(units.ids, dtype=str)
    mask = np.isin(ids, np.asarray(labeled, dtype=str)) if labeled else np.zeros(len(ids), dtype=bool)
    features: dict[str, np.ndarray] = {}
    needs = model_features(set(strategy.requires) - set(UNIT_FEATURES))
    if needs:
        res = pool.score(checkpoint, needs, cfg.features, unit_grid=units.grid)
        for name, col in res["features"].items():
            per_unit: dict[str, float | np.ndarray] = {}
            for k, cid in enumerate(res["ids"]):
                per_unit.update(units.spread(str(cid), col[k]))
            features[name] = units.align(per_unit).astype(np.float32)
    gt_needs = sorted(set(strategy.requires) & set(LABEL_FEATURES))
    if gt_needs:
        if store is None:
            raise ValueError(f"features {gt_needs} per unit need the pool store's ground truth")
        recs = label_unit_records(store, units, units.open_cases(labeled), gt_needs)
        for name in gt_needs:
            features[name] = units.align({u: r[name] for u, r in recs.items()}).astype(np.float32)
    if scores is not None or PROPAGATION_FEATURE in strategy.requires:
        features[PROPAGATION_FEATURE] = units.align(scores or {})
    ctx = {"round_index": round_index, "n_rounds": cfg.schedule.rounds}
    return PoolView(ids=ids, labeled_mask=mask, features=features, **ctx)


def propagate_round(ledger, strategy, cfg, store, labels, units: UnitSpace, labeled: list[str], r: int, out: Path,
                    use_gpu: bool, num_classes: int) -> tuple[dict[str, Any] | None, dict[str, float] | None]:
    """Run (or, on resume, re-use) round ``r``'s pseudo-labelling stage; ``(ledger record, unit scores)``, or
    ``(None, None)`` when the strategy has no stage.

    The stage's result is written (pseudo-labels into the label store, unit scores to the run directory) before the
    ledger's ``propagated`` record, so a recorded stage is complete; a run killed before the record runs it again
    (its pseudo-labels replace whatever the killed one wrote).
    """
    from raylearn.propagation import apply_result, has_stage, load_scores, run_stage
    from raylearn.runtime import round_seed

    if not units.slices or not has_stage(strategy):
        return None, None
    done = ledger.propagation(r)
    if done is not None:
        log.info("round %d: pseudo-labelling stage re-used from the ledger (%d cases)", r, len(done["pseudo_cases"]))
        return done, load_scores(done["scores_path"])
    result, seconds = run_stage(strategy, store=store, labels=labels, round_index=r, seed=round_seed(cfg.seed, r),
                                axis=units.axis, case_ids=units.case_ids, labelled_units=list(labeled),
                                num_classes=num_classes, out=out, use_gpu=use_gpu, params=dict(cfg.strategy.params))
    payload = apply_result(result, labels, units, r, out)
    rec = ledger.append("propagated", **payload, seconds=seconds)
    log.info("round %d: pseudo-labels for %d case(s) (%d voxels), %d unit scores, %.1f s", r,
             len(payload["pseudo_cases"]), payload["pseudo_voxels"], payload["n_scores"], seconds)
    return rec, {str(u): float(v) for u, v in result.unit_scores.items()}
