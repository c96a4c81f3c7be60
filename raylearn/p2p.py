"""From Prediction to Prompt on whole volumes: per class, SAM-Med3D refined by simulated error-region clicks.

For every class of the reference (the segmenter's prediction, or the ground truth as in the authors' script):
the reference is put on SAM-Med3D's 1.5 mm grid, an ``S^3`` window is centred on the class's bounding box
(:func:`raylearn.prompts.class_window_start`), the window is encoded once, and clicks are simulated one at a time
from the error region between SAM-Med3D's current mask and the reference, with the previous low-resolution
mask fed back (:func:`raylearn.prompts.simulate_clicks`). The per-class probabilities are mapped back to the
original grid and combined (per voxel the most probable class above 0.5). :func:`score_case` gives the paper's
normalised symmetric difference per class and overall. No Ray here: the Serve model deployment and the offline
driver (:mod:`raylearn.p2p_table`) both call :func:`preannotate_volume`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from raylearn.metrics import dice, symdiff_pct
from raylearn.models.sam_med3d import (
    Click,
    SamMed3D,
    Volume,
    combine_class_probabilities,
    crop_window,
    upsample_logits,
    window_probability_to_original,
)
from raylearn.prompts import PredictFn, class_window_start, overall_symdiff_pct, simulate_clicks

log = logging.getLogger(__name__)

__all__ = ["P2PResult", "crop_labels", "preannotate_volume", "reference_on_grid", "sam_predict_fn", "score_case"]


@dataclass
class P2PResult:
    """Pre-annotation of one volume.

    Attributes:
        label_maps: ``{n: uint8 [D,H,W]}`` SAM-Med3D's label map after ``n`` clicks per class, original grid.
        clicks: per class the simulated clicks in order (``voxel`` = original-grid index ``(d, h, w)``); the first
            ``n`` of them produced ``label_maps[n]``.
        starts: per class the window start on the 1.5 mm grid.
        low_res: per class SAM-Med3D's last low-res logits (a session may continue from them).
    """

    label_maps: dict[int, np.ndarray]
    clicks: dict[int, list[Click]] = field(default_factory=dict)
    starts: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    low_res: dict[int, np.ndarray] = field(default_factory=dict)


def reference_on_grid(volume: Volume, reference: np.ndarray) -> np.ndarray:
    """A label map ``[D,H,W]`` on the volume's original grid, resampled (nearest) onto its 1.5 mm grid.

    Raises:
        ValueError: the reference's shape is not the volume's.
    """
    ref = np.asarray(reference)
    if ref.shape != volume.shape:
        raise ValueError(f"reference shape {ref.shape} != image shape {volume.shape}")
    img = sitk.GetImageFromArray(ref.astype(np.uint8))
    img.CopyInformation(volume.original)
    out = sitk.Resample(img, volume.resampled, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(out)


def crop_labels(array: np.ndarray, start: Sequence[int], size: int) -> np.ndarray:
    """``size^3`` crop of a label/mask array at ``start``, zero where the window leaves the array."""
    out = np.zeros((size,) * 3, dtype=array.dtype)
    src = tuple(slice(max(s, 0), min(s + size, n)) for s, n in zip(start, array.shape, strict=True))
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start, strict=True))
    if all(sl.stop > sl.start for sl in src):
        out[dst] = array[src]
    return out


def sam_predict_fn(sam: SamMed3D, window: np.ndarray) -> PredictFn:
    """A :data:`raylearn.prompts.PredictFn` over one window: the encoder runs once here, each call decodes."""
    emb = sam.encode(np.asarray(window, np.float32)[None])

    def predict(_image, points, labels, prev):
        low = sam.decode(emb, [np.asarray(points, np.float32)], [np.asarray(labels, np.float32)], [prev])[0]
        return upsample_logits(low, sam.image_size) > 0.5, low

    return predict


def _to_original_voxel(volume: Volume, start: Sequence[int], point: Sequence[int]) -> tuple[float, float, float]:
    idx = np.asarray(start, float) + np.asarray(point, float)  # (d, h, w) on the 1.5 mm grid
    world = volume.resampled.TransformContinuousIndexToPhysicalPoint([float(v) for v in idx[::-1]])
    ijk = volume.original.TransformPhysicalPointToContinuousIndex(world)
    return tuple(round(float(v), 3) for v in ijk[::-1])


def preannotate_volume(sam: SamMed3D, volume: Volume, reference: np.ndarray, n_clicks: int | Sequence[int],
                       rng: np.random.Generator, classes: Iterable[int] | None = None,
                       method: str = "random") -> P2PResult:
    """SAM-Med3D masks from clicks simulated against ``reference``, per class, for each click count.

    Args:
        sam: the promptable model (its ``image_size`` is the window edge ``S``).
        volume: from :func:`raylearn.models.sam_med3d.prepare_volume`.
        reference: ``[D,H,W]`` label map on the original grid (segmenter prediction or ground truth).
        n_clicks: click count(s) per class, e.g. ``(1, 5, 10)``: one run per class records each.
        rng: seeded generator (the same seed gives the same clicks).
        classes: classes to prompt (default: every non-zero label of the reference). A class absent from the
            reference gets no clicks and no mask.
        method: click placement, see :func:`raylearn.prompts.next_click`.

    Raises:
        ValueError: a reference of another shape, a click count < 1, an unknown method.
    """
    counts = sorted({int(n) for n in ([n_clicks] if isinstance(n_clicks, int | np.integer) else n_clicks)})
    if not counts or counts[0] < 1:
        raise ValueError(f"click counts must be >= 1, got {n_clicks!r}")
    ref_grid = reference_on_grid(volume, reference)
    present = set(np.unique(ref_grid).tolist()) - {0}
    wanted = sorted(int(k) for k in (classes if classes is not None else present) if int(k) != 0)
    size = sam.image_size
    probs: dict[int, dict[int, np.ndarray]] = {n: {} for n in counts}
    out = P2PResult(label_maps={})
    for k in wanted:
        mask = ref_grid == k
        if not mask.any():
            log.info("class %d absent from the reference: no clicks, no mask", k)
            continue
        start = class_window_start(mask, size)
        window = crop_window(volume.array, start, size)
        sim = simulate_clicks(sam_predict_fn(sam, window), window, crop_labels(mask, start, size), counts, rng,
                              method=method)
        for n in counts:
            probs[n][k] = window_probability_to_original(volume, start, upsample_logits(sim.low_res_at[n], size))
        out.clicks[k] = [Click(label=k, positive=bool(lab), voxel=_to_original_voxel(volume, start, p))
                         for p, lab in zip(sim.points, sim.labels, strict=True)]
        out.starts[k], out.low_res[k] = start, sim.low_res
    for n in counts:
        out.label_maps[n] = combine_class_probabilities(probs[n]) if probs[n] else np.zeros(volume.shape, np.uint8)
    return out


def score_case(pred: np.ndarray, gt: np.ndarray, classes: Iterable[int]) -> dict[str, float]:
    """The paper's NSD (``(FP + FN) / |P U G|``, %) per class and overall, and Dice per class.

    Returns:
        ``{"nsd_<k>": %, "dice_<k>": ..., "nsd_overall": %}``; ``nsd_overall`` is the "Average" column of
        P2P's Table 2 (:func:`raylearn.prompts.overall_symdiff_pct`).
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
    row: dict[str, float] = {}
    for k in classes:
        row[f"nsd_{k}"] = float(symdiff_pct(pred == k, gt == k))
        row[f"dice_{k}"] = float(dice(pred == k, gt == k))
    row["nsd_overall"] = overall_symdiff_pct(pred, gt)
    return row
