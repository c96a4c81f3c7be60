"""From prediction to prompt: simulated clicks from a reference label map, and the symmetric-difference comparison.

The faithful protocol (SAM-Med3D's own iterative inference, which "From Prediction to Prompt" used) works per
class in a ``S^3`` window centred on that class: clicks are added one at a time from the error region between
the current mask and the reference (:func:`next_click`: a missed voxel gives a positive click, an extra voxel a
negative one), and the model's previous low-resolution mask is fed back (:func:`simulate_clicks`). The reference
is the segmenter's prediction (pre-annotation) or the ground truth (the authors' public script, an expert's clicks).
:func:`clicks_from_prediction` is the older one-shot sampler (all clicks at once from the interior, positive only).

"From Prediction to Prompt" turns the segmenter's prediction into 1, 5 or 10 clicks per class for SAM-Med3D
and measures the share of voxels an expert must still fix with the normalised symmetric difference
``symdiff_pct = (FP + FN) / |pred U gt| x 100`` per class (the paper's "NSD"; shown as "NSD (P2P)", not to be
confused with normalised surface Dice), for the SAM-Med3D mask beside the segmenter's own mask.

Arrays are ``uint8 [D, H, W]`` label maps (0 = background); clicks are voxel indices ``(d, h, w)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from raylearn.metrics import symdiff_pct
from raylearn.models.sam_med3d import Click

log = logging.getLogger(__name__)

__all__ = ["ClickSimulation", "PredictFn", "class_window_start", "clicks_from_prediction", "compare_symdiff_pct",
           "next_click", "overall_symdiff_pct", "simulate_clicks", "symdiff_pct_per_class"]

#: ``predict(image_crop [S,S,S], points [N,3] (d,h,w) crop voxels, labels [N] (1 pos / 0 neg), prev_low_res or None)
#: -> (mask [S,S,S] bool, low_res [L,L,L] logits)``: one prompt-encoder + mask-decoder pass of a promptable model
PredictFn = Callable[[np.ndarray, np.ndarray, np.ndarray, "np.ndarray | None"], tuple[np.ndarray, np.ndarray]]
CLICK_METHODS = ("random", "center")


def next_click(pred_mask: np.ndarray, ref_mask: np.ndarray, rng: np.random.Generator,
               method: str = "random") -> tuple[tuple[int, int, int], bool]:
    """The next simulated click from the error region between the current mask and the reference.

    As SAM-Med3D's ``random_sample_next_click``: the error region is ``FN | FP`` (``FN = ref & ~pred``, a missed
    voxel, gives a positive click; ``FP = pred & ~ref``, an extra voxel, a negative one). ``"random"`` draws a
    voxel uniformly from it (SAM-Med3D's default); ``"center"`` (RITM style) takes the larger of the two error
    regions by distance to its border and draws from its core (distance > half the maximum). With no error left
    the click is a positive one drawn uniformly from the reference.

    Args:
        pred_mask: ``bool [D,H,W]`` current mask (all False before the first click).
        ref_mask: ``bool [D,H,W]`` reference (segmenter prediction or ground truth), non-empty.
        rng: ``np.random.Generator``; the same state gives the same click.
        method: ``"random"`` or ``"center"``.

    Returns:
        ``((d, h, w), is_positive)`` voxel index in the arrays' grid.

    Raises:
        ValueError: shapes differ or are not 3D, an empty reference, or an unknown method.
    """
    pred, ref = np.asarray(pred_mask, bool), np.asarray(ref_mask, bool)
    if pred.ndim != 3 or pred.shape != ref.shape:
        raise ValueError(f"pred_mask and ref_mask must be 3D [D,H,W] of one shape, got {pred.shape} and {ref.shape}")
    if method not in CLICK_METHODS:
        raise ValueError(f"unknown click method {method!r} (known: {', '.join(CLICK_METHODS)})")
    if not ref.any():
        raise ValueError("the reference mask is empty: no click can be simulated for this class")
    fn, fp = ref & ~pred, pred & ~ref
    if method == "center" and (fn.any() or fp.any()):
        dist_fn = ndimage.distance_transform_edt(np.pad(fn, 1))[1:-1, 1:-1, 1:-1]
        dist_fp = ndimage.distance_transform_edt(np.pad(fp, 1))[1:-1, 1:-1, 1:-1]
        dist = dist_fn if dist_fn.max() > dist_fp.max() else dist_fp
        region = dist > dist.max() / 2.0
    else:
        region = fn | fp
    no_error = not region.any()
    if no_error:
        region = ref
    flat = np.flatnonzero(region)
    zyx = tuple(int(v) for v in np.unravel_index(int(flat[rng.integers(len(flat))]), ref.shape))
    return zyx, no_error or bool(fn[zyx])


@dataclass
class ClickSimulation:
    """Result of :func:`simulate_clicks` in the crop's grid.

    Attributes:
        points: ``int [N,3]`` clicks ``(d, h, w)`` in order; ``labels``: ``int [N]`` (1 positive, 0 negative).
        masks: ``{n: bool [S,S,S]}`` the model's mask after ``n`` clicks, for each recorded ``n``.
        low_res_at: ``{n: [L,L,L]}`` the model's low-resolution logits after ``n`` clicks (same keys as ``masks``).
        low_res: the last low-resolution logits ``[L,L,L]`` (feed them to a later refinement).
    """

    points: np.ndarray
    labels: np.ndarray
    masks: dict[int, np.ndarray] = field(default_factory=dict)
    low_res_at: dict[int, np.ndarray] = field(default_factory=dict)
    low_res: np.ndarray | None = None


def simulate_clicks(predict: PredictFn, image_crop: np.ndarray, ref_mask: np.ndarray, n_clicks: int | Sequence[int],
                    rng: np.random.Generator, method: str = "random") -> ClickSimulation:
    """Iterative click simulation (SAM-Med3D's inference loop): click, predict, feed the low-res mask back.

    Each step draws :func:`next_click` from the error region between the model's current mask (empty before
    the first click) and ``ref_mask``, appends it to all clicks so far, and calls ``predict`` with every click
    and the previous low-res logits (None at the first click). One run records the masks after each count in
    ``n_clicks`` (so 1, 5 and 10 clicks cost 10 decoder passes, and the 5-click mask continues the 1-click run).

    Args:
        predict: see :data:`PredictFn` (a closure over a cached image embedding).
        image_crop: ``[S,S,S]`` window passed through to ``predict``.
        ref_mask: ``bool [S,S,S]`` reference in the same window, non-empty.
        n_clicks: a click count or several (recorded masks); all >= 1.
        rng: ``np.random.Generator`` (seeded by the caller).
        method: see :func:`next_click`.

    Raises:
        ValueError: a click count < 1, shapes that differ, an empty reference, or a ``predict`` whose mask does
            not have the crop's shape.
    """
    counts = sorted({int(n) for n in ([n_clicks] if isinstance(n_clicks, int | np.integer) else n_clicks)})
    if not counts or counts[0] < 1:
        raise ValueError(f"click counts must be >= 1, got {n_clicks!r}")
    ref = np.asarray(ref_mask, bool)
    if np.shape(image_crop) != ref.shape:
        raise ValueError(f"image_crop shape {np.shape(image_crop)} != ref_mask shape {ref.shape}")
    mask = np.zeros(ref.shape, bool)
    points: list[tuple[int, int, int]] = []
    labels: list[int] = []
    low = None
    out = ClickSimulation(points=np.zeros((0, 3), int), labels=np.zeros(0, int))
    for i in range(1, counts[-1] + 1):
        zyx, positive = next_click(mask, ref, rng, method)
        points.append(zyx)
        labels.append(int(positive))
        mask, low = predict(image_crop, np.asarray(points, np.int64), np.asarray(labels, np.int64), low)
        mask = np.asarray(mask, bool)
        if mask.shape != ref.shape:
            raise ValueError(f"predict returned a mask of shape {mask.shape}, expected {ref.shape}")
        if i in counts:
            out.masks[i], out.low_res_at[i] = mask.copy(), low
    out.points, out.labels, out.low_res = np.asarray(points, np.int64), np.asarray(labels, np.int64), low
    return out


def class_window_start(ref_mask: np.ndarray, size: int) -> tuple[int, int, int]:
    """Start index of the ``size^3`` window centred on the bounding box of ``ref_mask`` (as torchio's
    ``CropOrPad(mask_name=...)`` in SAM-Med3D's inference); the window may extend past the array (zero padding).

    Raises:
        ValueError: a mask that is not 3D or is empty.
    """
    ref = np.asarray(ref_mask, bool)
    if ref.ndim != 3:
        raise ValueError(f"ref_mask must be 3D [D,H,W], got shape {ref.shape}")
    nz = np.argwhere(ref)
    if not len(nz):
        raise ValueError("the reference mask is empty: no window can be centred on it")
    centre = (nz.min(axis=0) + nz.max(axis=0) + 1) / 2.0
    return tuple(int(v) for v in np.floor(centre - size / 2.0 + 0.5).astype(int))


def overall_symdiff_pct(pred: np.ndarray, gt: np.ndarray) -> float:
    """Overall foreground NSD (the "Average" column of P2P's Table 2): voxels whose label is wrong
    (``pred != gt``) over the foreground union ``|pred > 0  U  gt > 0|``, in % (0 when both are empty).

    Equals the binary foreground symmetric difference when no voxel is given a wrong foreground class.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
    union = int(np.count_nonzero((pred > 0) | (gt > 0)))
    return 0.0 if union == 0 else 100.0 * int(np.count_nonzero(pred != gt)) / union


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
