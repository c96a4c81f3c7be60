"""Ray tasks used by the loop: test-split evaluation and features of labelled cases.

Each task opens the pool store itself (it pickles by path) and loads the checkpoint once per call,
so only case ids and compact results cross the object store. ``scheduling_strategy="DEFAULT"``
keeps them out of an enclosing placement group (a Ray Tune trial's), which holds no CPUs for them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import ray


def _load(checkpoint: str | bytes):
    """A segmenter from a checkpoint path, or from its bytes (passed through the object store, so a task on
    another node never reads a driver-local path)."""
    import tempfile
    from pathlib import Path

    from raylearn.models.loading import load_segmenter

    if isinstance(checkpoint, bytes | bytearray):
        with tempfile.TemporaryDirectory(prefix="raylearn-eval-") as tmp:
            path = Path(tmp) / "checkpoint.pt"
            path.write_bytes(checkpoint)
            return load_segmenter(path)
    return load_segmenter(checkpoint)


@ray.remote(num_cpus=1, max_retries=2, scheduling_strategy="DEFAULT")
def evaluate_chunk(store, checkpoint: str, ids: Sequence[str], hd95: bool = True,
                   surface_tolerance_mm: float | None = 1.0) -> list[dict]:
    """Predict and score ``ids`` against their ground truth: one metrics row per case
    (:func:`raylearn.metrics.evaluate_case`; ``surface_tolerance_mm`` is the surface Dice tolerance, None = off)."""
    import torch

    from raylearn.metrics import evaluate_case

    torch.set_num_threads(1)
    seg = _load(checkpoint)
    rows = []
    for cid in ids:
        case = store.get(cid)
        pred = seg.predict_label(np.asarray(case.image))
        row = evaluate_case(pred, np.asarray(case.label), case.spacing, store.num_classes, hd95=hd95,
                            surface_tolerance_mm=surface_tolerance_mm)
        rows.append({"case_id": cid, **row})
    return rows


@ray.remote(num_cpus=1, max_retries=2, scheduling_strategy="DEFAULT")
def features_for(store, checkpoint: str, ids: Sequence[str], names: Sequence[str], params) -> dict[str, dict]:
    """``compute_features`` for a few cases outside the sharded pool (the labelled ones)."""
    import torch

    from raylearn.scoring.features import compute_features

    torch.set_num_threads(1)
    seg = _load(checkpoint)
    return {cid: compute_features(seg, np.asarray(store.get(cid).image), list(names), params) for cid in ids}
