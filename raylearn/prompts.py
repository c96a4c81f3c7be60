"""From prediction to prompt: simulated clicks from a segmenter's label map, and the symmetric-difference comparison.

"From Prediction to Prompt" turns the segmenter's prediction into 1, 5 or 10 clicks per class for SAM-Med3D
and measures the share of voxels an expert must still fix with the normalised symmetric difference
``symdiff_pct = (FP + FN) / |pred U gt| x 100`` per class (the paper's "NSD"; shown as "NSD (P2P)", not to be
confused with normalised surface Dice), for the SAM-Med3D mask beside the segmenter's own mask.

Arrays are ``uint8 [D, H, W]`` label maps (0 = background); clicks are voxel indices ``(d, h, w)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage

from raylearn.metrics import symdiff_pct
from raylearn.models.sam_med3d import Click

log = logging.getLogger(__name__)

__all__ = ["clicks_from_prediction", "compare_symdiff_pct", "symdiff_pct_per_class"]


def _sample(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct flat indices drawn with probability proportional to ``weights`` (all when fewer)."""
    nz = np.flatnonzero(weights > 0)
    if len(nz) <= n:
        return nz
    p = weights.ravel()[nz].astype(np.float64)
    return rng.choice(nz, size=n, replace=False, p=p / p.sum())


def clicks_from_prediction(
    label_map: np.ndarray,
    n_clicks: int = 1,
    *,
    classes: Iterable[int] | None = None,
    n_negative: int = 0,
    spacing: Sequence[float] | None = None,
    interior_power: float = 1.0,
    margin_mm: float = 5.0,
    seed: int | np.random.Generator = 0,
) -> list[Click]:
    """Simulated clicks for SAM-Med3D from a predicted label map.

    Positive clicks of class ``k`` are drawn inside the predicted region with probability proportional to
    ``edt^interior_power`` (Euclidean distance to the region's boundary, in mm when ``spacing`` is given),
    so they favour the interior where the prediction is most trustworthy. Negative clicks are drawn
    uniformly from a shell of ``margin_mm`` around the region (outside it).

    Args:
        label_map: ``uint8 [D, H, W]`` predicted labels (0 background).
        n_clicks: positive clicks per class (the paper uses 1, 5, 10); fewer when the region is smaller.
        classes: classes to prompt; default every non-zero label present.
        n_negative: negative clicks per class from the surroundings.
        spacing: voxel spacing ``(D, H, W)`` in mm (isotropic 1 mm when None).
        interior_power: exponent of the distance weighting (0 = uniform inside the region).
        margin_mm: thickness of the shell negative clicks come from.
        seed: seed or ``np.random.Generator``; the same seed gives the same clicks.

    Returns:
        Clicks with ``voxel=(d, h, w)`` indices, grouped by class (positives first). Classes that are absent
        from the prediction get no clicks.

    Raises:
        ValueError: a label map that is not 3D, or a negative click count.
    """
    lab = np.asarray(label_map)
    if lab.ndim != 3:
        raise ValueError(f"label_map must be 3D [D,H,W], got shape {lab.shape}")
    if n_clicks < 0 or n_negative < 0:
        raise ValueError("n_clicks and n_negative must be >= 0")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    sp = tuple(float(s) for s in spacing) if spacing is not None else (1.0, 1.0, 1.0)
    wanted = sorted(int(k) for k in (classes if classes is not None else np.unique(lab)) if int(k) != 0)
    out: list[Click] = []
    for k in wanted:
        mask = lab == k
        if not mask.any():
            log.info("class %d absent from the prediction: no clicks", k)
            continue
        dist = ndimage.distance_transform_edt(mask, sampling=sp)
        for flat in _sample(dist**interior_power if interior_power else mask.astype(float), n_clicks, rng):
            out.append(Click(label=k, positive=True, voxel=tuple(float(v) for v in np.unravel_index(flat, lab.shape))))
        if n_negative:
            outside = ndimage.distance_transform_edt(~mask, sampling=sp)
            shell = (outside > 0) & (outside <= margin_mm)
            for flat in _sample(shell.astype(float), n_negative, rng):
                out.append(Click(label=k, positive=False,
                                 voxel=tuple(float(v) for v in np.unravel_index(flat, lab.shape))))
    return out


def symdiff_pct_per_class(pred: np.ndarray, gt: np.ndarray, classes: Iterable[int]) -> dict[int, float]:
    """``(FP + FN) / |pred U gt| x 100`` per class (0 when both are empty) for label maps ``[D,H,W]``,
    via :func:`raylearn.metrics.symdiff_pct`."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
    return {int(k): float(symdiff_pct(pred == k, gt == k)) for k in classes}


def compare_symdiff_pct(sam_label: np.ndarray, segmenter_label: np.ndarray, gt: np.ndarray,
                        classes: Iterable[int]) -> dict[int, dict[str, float]]:
    """Per class: symmetric difference (%) of the SAM-Med3D mask and of the segmenter's mask vs ground truth.

    Returns:
        ``{k: {"symdiff_pct_sam": %, "symdiff_pct_segmenter": %, "gain": symdiff_pct_segmenter - symdiff_pct_sam}}``;
        a positive gain means the pre-annotation leaves fewer voxels to fix than the segmenter's prediction.
    """
    classes = list(classes)
    sam = symdiff_pct_per_class(sam_label, gt, classes)
    seg = symdiff_pct_per_class(segmenter_label, gt, classes)
    return {k: {"symdiff_pct_sam": sam[k], "symdiff_pct_segmenter": seg[k], "gain": seg[k] - sam[k]} for k in sam}
