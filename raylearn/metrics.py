"""Segmentation metrics per class and averaged: Dice, HD95 (mm), surface Dice, P2P's symmetric difference (%).

Inputs are label maps ``[D, H, W]`` (0 = background; numpy or torch) and a voxel spacing ``(D, H, W)`` in mm,
in array axis order. The single-structure functions take boolean masks. This module is the one Dice of the
project: training's validation Dice (``raylearn.models.training``) and test evaluation both use
:func:`dice_per_class`.

Definitions and conventions for empty masks (``P`` = predicted mask, ``G`` = ground truth, ``τ`` = tolerance):

==================  =========================================  ==========  ======  ======
metric              definition                                 both empty  P only  G only
==================  =========================================  ==========  ======  ======
``dice``            ``2|P∩G| / (|P|+|G|)``                     1.0         0.0     0.0
``hd95`` (mm)       95th percentile of the pooled symmetric    0.0         inf     inf
                    surface distances (both directions)
``surface_dice``    share of boundary voxels of ``P`` and      1.0         0.0     0.0
                    ``G`` within ``τ`` mm of the other
``symdiff_pct``     ``(FP + FN) / |P∪G| * 100``                0.0         100.0   100.0
``correction``      ``FP + FN`` voxels                         0           ``|P|`` ``|G|``
==================  =========================================  ==========  ======  ======

Dice is MONAI ``compute_dice(ignore_empty=False)``, whose rule for an empty ground truth is the one above.

HD95 is the *true* 95th percentile (linear interpolation, ``numpy.percentile``) of the union of the
distances from every boundary voxel of ``P`` to the boundary of ``G`` and from every boundary voxel of ``G``
to the boundary of ``P``, in mm (the MedPy ``hd95`` definition). MONAI's ``compute_hausdorff_distance(
percentile=95)`` instead takes the maximum of the two directed 95th percentiles, and the "From Prediction to
Prompt" code took the maximum distance (HD100). Boundaries and distances come from MONAI
(``get_edge_surface_distance``: boundary = mask minus its erosion, Euclidean distance transform with spacing).
One empty mask gives ``inf`` (no surface to match); the class mean is then ``inf`` too, which is deliberate:
a missed structure must not be averaged away.

Surface Dice is the *normalised surface Dice* of the segmentation literature (Nikolov et al. 2021, "NSD" in
the Medical Segmentation Decathlon and Metrics Reloaded), MONAI ``compute_surface_dice`` with boundary voxels
counted (``use_subvoxels=False``). The tolerance ``τ`` defaults to :data:`SURFACE_DICE_TOLERANCE_MM` = 1 mm,
about one voxel of the MSD hippocampus and of typical CT/MR at 1 mm spacing: "the boundary is right to within
a voxel". MONAI gives NaN when the class is absent from both masks; we report 1.0 there, as for Dice.

``symdiff_pct`` is the *normalised symmetric difference* that "From Prediction to Prompt" calls NSD: the share
of the structure's voxels an expert must fix. It is not normalised surface Dice; tables show it as "NSD (P2P)".
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "METRIC_LABELS",
    "SURFACE_DICE_TOLERANCE_MM",
    "correction_voxels",
    "dice",
    "dice_per_class",
    "evaluate_case",
    "hd95",
    "surface_dice_per_class",
    "surface_distances",
    "symdiff_pct",
]

#: default tolerance of the normalised surface Dice, in mm
SURFACE_DICE_TOLERANCE_MM = 1.0

#: how tables, logs and plots name the metric key prefixes of :func:`evaluate_case`
METRIC_LABELS = {
    "dice": "Dice",
    "hd95": "HD95 (mm)",
    "surface_dice": "surface Dice",
    "symdiff_pct": "NSD (P2P) %",
    "correction": "voxels to fix",
}


def _masks(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred).astype(bool, copy=False)
    gt = np.asarray(gt).astype(bool, copy=False)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    return pred, gt


def _spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim or any(not np.isfinite(s) or s <= 0 for s in sp):
        raise ValueError(f"spacing must be {ndim} positive numbers in mm (array axis order), got {tuple(spacing)}")
    return sp


def _label_tensors(pred: Any, gt: Any, num_classes: int):
    """``pred``/``gt`` label maps (numpy or torch, same shape) -> int64 torch tensors ``[1, 1, D, H, W]``."""
    import torch

    p = torch.as_tensor(np.asarray(pred) if not isinstance(pred, torch.Tensor) else pred)
    g = torch.as_tensor(np.asarray(gt) if not isinstance(gt, torch.Tensor) else gt).to(p.device)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {tuple(p.shape)} != ground-truth shape {tuple(g.shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + at least one class), got {num_classes}")
    p, g = p.long(), g.long()
    if p.numel() and (min(int(p.min()), int(g.min())) < 0 or max(int(p.max()), int(g.max())) >= num_classes):
        raise ValueError(f"label values outside [0, {num_classes})")
    return p[None, None], g[None, None]


def dice_per_class(pred: Any, gt: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Dice of every foreground class of one case (MONAI ``compute_dice``).

    Args:
        pred: predicted label map ``[D, H, W]`` (numpy or torch, any integer dtype, values in ``[0, K)``;
            a CUDA tensor stays on its device).
        gt: ground-truth label map, same shape.
        num_classes: ``K`` including background.

    Returns:
        ``(values, present)``: ``float64 [K-1]`` Dice of classes ``1..K-1`` (1.0 when the class is absent from
        both maps, 0.0 when absent from exactly one), and ``bool [K-1]``, True where the class occurs in the
        prediction or the ground truth. To average only classes that occur (as training's validation does),
        use ``values[present]``; :func:`evaluate_case` averages all classes.
    """
    import torch
    from monai.metrics import compute_dice

    p, g = _label_tensors(pred, gt, num_classes)
    values = compute_dice(p, g, include_background=False, ignore_empty=False, num_classes=num_classes)[0]
    counts = torch.bincount(p.flatten(), minlength=num_classes) + torch.bincount(g.flatten(), minlength=num_classes)
    present = (counts[1:num_classes] > 0).cpu().numpy()
    return values.double().cpu().numpy(), present


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient of two boolean masks ``[D, H, W]`` (1.0 when both are empty), via :func:`dice_per_class`."""
    pred, gt = _masks(pred, gt)
    return float(dice_per_class(pred.astype(np.uint8), gt.astype(np.uint8), 2)[0][0])


def correction_voxels(pred: np.ndarray, gt: np.ndarray) -> int:
    """Voxels an expert must flip to turn ``pred`` into ``gt``: ``FP + FN`` (``|P xor G|``)."""
    pred, gt = _masks(pred, gt)
    return int(np.logical_xor(pred, gt).sum())


def symdiff_pct(pred: np.ndarray, gt: np.ndarray) -> float:
    """Normalised symmetric difference ``(FP + FN) / |P ∪ G| * 100`` in % (0.0 when both are empty).

    The metric "From Prediction to Prompt" calls NSD (shown as "NSD (P2P)" in tables); lower is better.
    """
    pred, gt = _masks(pred, gt)
    union = int(np.logical_or(pred, gt).sum())
    if union == 0:
        return 0.0
    return 100.0 * int(np.logical_xor(pred, gt).sum()) / union


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Directed boundary distances in mm, via MONAI.

    Args:
        pred: predicted mask ``[D, H, W]``, non-empty.
        gt: ground-truth mask, same shape, non-empty.
        spacing: ``(D, H, W)`` mm; unit spacing when ``None``.

    Returns:
        ``(pred_to_gt [n_pred_boundary], gt_to_pred [n_gt_boundary])`` as float64 arrays.
    """
    import torch
    from monai.metrics.utils import get_edge_surface_distance

    pred, gt = _masks(pred, gt)
    if not pred.any() or not gt.any():
        raise ValueError("surface_distances needs two non-empty masks")
    sp = _spacing(spacing, pred.ndim)
    with warnings.catch_warnings():
        # MONAI 1.6 warns about its own deprecated internal argument (always_return_as_numpy)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai\.")
        _, dists, _ = get_edge_surface_distance(
            torch.from_numpy(np.ascontiguousarray(pred)),
            torch.from_numpy(np.ascontiguousarray(gt)),
            distance_metric="euclidean",
            spacing=sp,
            symmetric=True,
            warn_empty=False,
        )
    d_pg, d_gp = (np.asarray(d.cpu().numpy(), dtype=np.float64).ravel() for d in dists)
    return d_pg, d_gp


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None, percentile: float = 95.0) -> float:
    """95th percentile Hausdorff distance in mm (pooled symmetric surface distances; see module docstring).

    Args:
        pred: predicted mask ``[D, H, W]``.
        gt: ground-truth mask, same shape.
        spacing: ``(D, H, W)`` mm; unit spacing when ``None``.
        percentile: 95 for HD95, 100 for the Hausdorff distance.

    Returns:
        Distance in mm; 0.0 when both masks are empty, ``inf`` when exactly one is.
    """
    pred, gt = _masks(pred, gt)
    _spacing(spacing, pred.ndim)
    has_p, has_g = bool(pred.any()), bool(gt.any())
    if not has_p and not has_g:
        return 0.0
    if not has_p or not has_g:
        return float("inf")
    d_pg, d_gp = surface_distances(pred, gt, spacing)
    return float(np.percentile(np.concatenate([d_pg, d_gp]), percentile))


hd95_distance = hd95  # alias: evaluate_case's ``hd95`` flag shadows the function name


def surface_dice_per_class(
    pred: Any, gt: Any, num_classes: int, spacing: Sequence[float] | None = None,
    tolerance_mm: float = SURFACE_DICE_TOLERANCE_MM,
) -> np.ndarray:  # fmt: skip
    """Normalised surface Dice of every foreground class of one case (MONAI ``compute_surface_dice``).

    Args:
        pred: predicted label map ``[D, H, W]`` (numpy or torch), values in ``[0, K)``.
        gt: ground-truth label map, same shape.
        num_classes: ``K`` including background.
        spacing: ``(D, H, W)`` voxel spacing in mm (unit spacing when ``None``).
        tolerance_mm: boundary tolerance ``τ`` in mm, the same for every class.

    Returns:
        ``float64 [K-1]`` in ``[0, 1]`` for classes ``1..K-1``: 1.0 when the class is absent from both maps, 0.0
        when it is absent from exactly one.
    """
    from monai.metrics import compute_surface_dice
    from monai.networks.utils import one_hot

    if not (np.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ValueError(f"surface Dice tolerance must be a finite number of mm >= 0, got {tolerance_mm}")
    p, g = _label_tensors(pred, gt, num_classes)
    sp = _spacing(spacing, p.ndim - 2)
    with warnings.catch_warnings():
        # MONAI warns about empty classes (handled below) and about its own deprecated internal argument
        warnings.filterwarnings("ignore", category=UserWarning, module=r"monai\.")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai\.")
        values = compute_surface_dice(
            one_hot(p, num_classes, dim=1), one_hot(g, num_classes, dim=1), [float(tolerance_mm)] * (num_classes - 1),
            include_background=False, distance_metric="euclidean", spacing=sp,
        )[0]  # fmt: skip
    return np.nan_to_num(values.double().cpu().numpy(), nan=1.0)


def evaluate_case(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] | None,
    num_classes: int,
    class_names: Sequence[str] | dict[int, str] | None = None,
    hd95: bool = True,
    surface_tolerance_mm: float | None = SURFACE_DICE_TOLERANCE_MM,
) -> dict[str, Any]:
    """All metrics of one case, per foreground class and averaged, as a flat CSV-friendly dict.

    Args:
        pred: predicted label map ``[D, H, W]`` with values in ``[0, num_classes)``.
        gt: ground-truth label map, same shape.
        spacing: ``(D, H, W)`` voxel spacing in mm (``None`` = 1 mm).
        num_classes: ``K`` including background (classes ``1..K-1`` are evaluated).
        class_names: optional names of the classes (a list indexed by class, or ``{class: name}``); when given
            the per-class keys use the name (``dice_anterior``) instead of the index (``dice_1``).
        hd95: compute HD95; when False the ``hd95_*`` keys are absent.
        surface_tolerance_mm: tolerance of the normalised surface Dice in mm; ``None`` leaves the
            ``surface_dice_*`` keys out. HD95 and surface Dice are the metrics that need distance transforms.

    Returns:
        For each foreground class ``c``: ``dice_c``, ``hd95_c`` (mm), ``surface_dice_c``, ``symdiff_pct_c`` (%)
        and ``correction_c`` (voxels); the plain means over the foreground classes ``dice_mean``, ``hd95_mean``,
        ``surface_dice_mean``, ``symdiff_pct_mean``; and ``correction_total`` (voxels).
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    if pred.ndim != 3:
        raise ValueError(f"label maps must be 3-d [D, H, W], got shape {pred.shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + at least one class), got {num_classes}")
    for what, arr in (("prediction", pred), ("ground truth", gt)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(f"{what} has label values outside [0, {num_classes}): {np.unique(arr).tolist()}")
    sp = _spacing(spacing, 3)
    names: dict[int, str] = {}
    if class_names is not None:
        names = dict(class_names) if isinstance(class_names, dict) else dict(enumerate(class_names))
    columns: dict[str, np.ndarray] = {"dice": dice_per_class(pred, gt, num_classes)[0]}
    if hd95:
        columns["hd95"] = np.array([hd95_distance(pred == c, gt == c, sp) for c in range(1, num_classes)])
    if surface_tolerance_mm is not None:
        columns["surface_dice"] = surface_dice_per_class(pred, gt, num_classes, sp, surface_tolerance_mm)
    columns["symdiff_pct"] = np.array([symdiff_pct(pred == c, gt == c) for c in range(1, num_classes)])
    corrections = [correction_voxels(pred == c, gt == c) for c in range(1, num_classes)]
    out: dict[str, Any] = {}
    for i, c in enumerate(range(1, num_classes)):
        key = names.get(c, str(c))
        for m, values in columns.items():
            out[f"{m}_{key}"] = float(values[i])
        out[f"correction_{key}"] = corrections[i]
    for m, values in columns.items():
        out[f"{m}_mean"] = float(np.mean(values))
    out["correction_total"] = int(sum(corrections))
    return out
