"""The pseudo-labelling stage of ``unit: slice`` runs: a strategy's ``propagate(ctx)`` run in a Ray task.

A strategy with a ``propagate(ctx: PropagationContext) -> PropagationResult`` method (STAR) gets, after each
round's labels arrived and before training, the annotated slices of every pool case
(:class:`raylearn.units.PropagationContext`); it returns pseudo-labels for voxels nobody annotated and a score per
slice unit. :func:`run_stage` runs it inside a Ray task (Ray stays at the edge: the strategy is plain Python); the
task holds no GPU in Ray's accounting (the pool's shards and the training workers hold the cluster's GPUs for the
whole run, and both are idle while the stage runs) but uses CUDA when the run's plan has GPUs and the node shows
one. :func:`apply_result` then writes the pseudo-labels into the label store (``tag="pseudo"``, replacing the
previous round's; an overlap with an annotated voxel is refused) and the unit scores durably to
``<output_dir>/propagation/round_<rr>.scores.json``; the loop records the stage in the ledger (kind
``propagated``), so a resumed run re-uses it instead of running it again, and hands the scores to the next
selection as the feature ``propagation_score``.

Layout under ``<output_dir>/propagation``::

    round_00/                 the stage's work_dir of round 0 (its checkpoints; it survives a killed run)
    round_00.scores.json      {"round": 0, "unit_scores": {unit id: score}, "info": {...}}
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from raylearn.ledger import json_default
from raylearn.units import PropagationContext, PropagationResult, UnitSpace

__all__ = ["apply_result", "has_stage", "load_scores", "run_stage", "scores_path", "work_dir"]

log = logging.getLogger(__name__)


def has_stage(strategy: Any) -> bool:
    """True when ``strategy`` has a pseudo-labelling stage (a callable ``propagate``)."""
    return callable(getattr(strategy, "propagate", None))


def work_dir(out: Path, round_index: int) -> Path:
    """The stage's own folder for round ``round_index``: ``<out>/propagation/round_<rr>``."""
    return Path(out).resolve() / "propagation" / f"round_{round_index:02d}"


def scores_path(out: Path, round_index: int) -> Path:
    """Where round ``round_index``'s unit scores are kept: ``<out>/propagation/round_<rr>.scores.json``."""
    return Path(out).resolve() / "propagation" / f"round_{round_index:02d}.scores.json"


def _stage(strategy: Any, store: Any, labels: Any, round_index: int, seed: int, axis: int, case_ids: list[str],
           labelled_units: list[str], num_classes: int, work: str, use_gpu: bool, params: dict) -> PropagationResult:
    """Build the context on the worker (the image/label readers open the stores there) and call ``propagate``."""
    import torch

    from raylearn.data.store import PoolStore

    store = PoolStore.open(store) if isinstance(store, str | os.PathLike) else store

    def image(cid: str) -> np.ndarray:
        return np.asarray(store.get(cid).image, dtype=np.float32)

    def label(cid: str) -> tuple[np.ndarray, np.ndarray]:
        if labels.latest(cid) is None:
            grid = tuple(store.get(cid).image.shape[1:])
            return np.zeros(grid, np.uint8), np.zeros(grid, bool)
        return labels.read_masked(cid)

    Path(work).mkdir(parents=True, exist_ok=True)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    ctx = PropagationContext(round_index=round_index, seed=seed, axis=axis, case_ids=list(case_ids),
                             labelled_units=list(labelled_units), image=image, label=label,
                             num_classes=num_classes, work_dir=Path(work), device=device, params=dict(params))
    result = strategy.propagate(ctx)
    if not isinstance(result, PropagationResult):
        raise TypeError(f"{type(strategy).__name__}.propagate must return a PropagationResult, got "
                        f"{type(result).__name__}")
    return result


def run_stage(strategy: Any, *, store: Any, labels: Any, round_index: int, seed: int, axis: int,
              case_ids: list[str], labelled_units: list[str], num_classes: int, out: Path, use_gpu: bool,
              params: dict) -> tuple[PropagationResult, float]:
    """Run ``strategy.propagate`` in a Ray task; returns ``(result, seconds)``.

    Args:
        strategy: the run's strategy instance (pickled to the task).
        store: the pool store (or its path); re-opened in the task.
        labels: the run's :class:`~raylearn.annotation.labels.LabelStore`.
        round_index: the round whose labels just arrived.
        seed: the round's seed.
        axis: the run's slice axis.
        case_ids: every pool case id, in pool order.
        labelled_units: slice unit ids annotated so far.
        num_classes: classes including background.
        out: the run's output dir (the stage's ``work_dir`` is :func:`work_dir`).
        use_gpu: the run's plan has GPUs (the task then uses CUDA when its node shows one).
        params: the strategy's parameters from the config.
    """
    import ray

    task = ray.remote(num_cpus=0, num_gpus=0, max_retries=0)(_stage)  # phases take turns: shards, trainer idle
    t0 = time.perf_counter()
    ref = task.remote(strategy, store, labels, round_index, seed, axis, list(case_ids), list(labelled_units),
                      num_classes, str(work_dir(out, round_index)), use_gpu, dict(params))
    result = ray.get(ref)
    return result, time.perf_counter() - t0


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, default=json_default)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def apply_result(result: PropagationResult, labels: Any, units: UnitSpace, round_index: int, out: Path
                 ) -> dict[str, Any]:
    """Write a stage's result: pseudo-labels into the label store, unit scores to :func:`scores_path`.

    Every case's previous pseudo-labels are replaced: a case absent from ``result.pseudo`` has them cleared.

    Args:
        result: what ``propagate`` returned.
        labels: the run's label store.
        units: the run's slice units (unit scores must name them).
        round_index: the round.
        out: the run's output dir.

    Returns:
        The ledger payload: ``{"round", "scores_path", "pseudo_cases", "pseudo_voxels", "n_scores", "info"}``.

    Raises:
        ValueError: a pseudo-label for a case outside the pool, of the wrong shape, a unit score for an unknown
            unit, or pseudo-labels over annotated voxels (:class:`~raylearn.annotation.labels.LabelStoreError`).
    """
    pool = set(units.case_ids)
    unknown = sorted(set(result.pseudo) - pool)
    if unknown:
        raise ValueError(f"propagation round {round_index}: pseudo-labels for case(s) outside the pool: {unknown[:5]}")
    scores = {str(u): float(v) for u, v in result.unit_scores.items()}
    units.align(scores)  # ValueError naming unknown unit ids
    voxels = 0
    for cid, (label, filled) in sorted(result.pseudo.items()):
        rec = labels.put_pseudo(cid, np.asarray(label), np.asarray(filled, dtype=bool), round_index)
        voxels += int(rec.annotated_voxels or 0)
    for cid in labels.pseudo_ids():  # last round's pseudo-labels of cases this round left out
        if cid not in result.pseudo:
            shape = labels.latest(cid, "pseudo").shape
            labels.put_pseudo(cid, np.zeros(shape, np.uint8), np.zeros(shape, bool), round_index)
    info = {k: v for k, v in dict(result.info).items()
            if isinstance(v, str | bool | int) or (isinstance(v, float) and math.isfinite(v))}
    path = scores_path(out, round_index)
    _write_json(path, {"round": round_index, "unit_scores": scores, "info": dict(result.info)})
    return {"round": round_index, "scores_path": str(path), "pseudo_cases": sorted(result.pseudo),
            "pseudo_voxels": voxels, "n_scores": len(scores), "info": info}


def load_scores(path: str | Path) -> dict[str, float]:
    """The unit scores a stage recorded (:func:`apply_result`)."""
    data = json.loads(Path(path).read_text())
    return {str(u): float(v) for u, v in data["unit_scores"].items()}
