"""Segmentation metrics per class and averaged: Dice, HD95 (mm), NSD (%), voxels to correct.

Inputs are label maps ``uint8 [D, H, W]`` (0 = background) and a voxel spacing ``(D, H, W)`` in mm, in
array axis order. The single-structure functions take boolean masks.

Definitions and conventions for empty masks (``P`` = predicted mask, ``G`` = ground truth):

=================  =========================================  ===========  ==========  ==========
metric             definition                                 both empty   P empty     G empty
=================  =========================================  ===========  ==========  ==========
``dice``           ``2|P∩G| / (|P|+|G|)``                     1.0          0.0         0.0
``hd95`` (mm)      95th percentile of the pooled symmetric    0.0          ``inf``     ``inf``
                   surface distances (both directions)
``nsd`` (%)        ``(FP + FN) / |P∪G| * 100``                0.0          100.0       100.0
``correction``     ``FP + FN`` voxels                         0            ``|G|``     ``|P|``
=================  =========================================  ===========  ==========  ==========

HD95 is the *true* 95th percentile (linear interpolation, ``numpy.percentile``) of the union of the
distances from every boundary voxel of ``P`` to the boundary of ``G`` and from every boundary voxel of ``G``
to the boundary of ``P``, in mm (the MedPy ``hd95`` definition). MONAI's ``compute_hausdorff_distance(
percentile=95)`` instead takes the maximum of the two directed 95th percentiles, and the "From Prediction to
Prompt" code took the maximum distance (HD100). Boundaries and distances come from MONAI
(``get_edge_surface_distance``: boundary = mask minus its erosion, Euclidean distance transform with spacing).
One empty mask gives ``inf`` (no surface to match); the class mean is then ``inf`` too, which is deliberate:
a missed structure must not be averaged away. NSD is the normalised symmetric difference of "From Prediction
to Prompt", the share of the structure's voxels an expert must fix.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["correction_voxels", "dice", "evaluate_case", "hd95", "nsd", "surface_distances"]


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


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (1.0 when both are empty).

    Args:
        pred: predicted mask ``[D, H, W]`` (anything castable to bool).
        gt: ground-truth mask, same shape.
    """
    pred, gt = _masks(pred, gt)
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, gt).sum()) / total


def correction_voxels(pred: np.ndarray, gt: np.ndarray) -> int:
    """Voxels an expert must flip to turn ``pred`` into ``gt``: ``FP + FN`` (``|P xor G|``)."""
    pred, gt = _masks(pred, gt)
    return int(np.logical_xor(pred, gt).sum())


def nsd(pred: np.ndarray, gt: np.ndarray) -> float:
    """Normalised symmetric difference ``(FP + FN) / |P ∪ G| * 100`` in % (0.0 when both are empty)."""
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


def evaluate_case(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] | None,
    num_classes: int,
    class_names: Sequence[str] | dict[int, str] | None = None,
    hd95: bool = True,
) -> dict[str, Any]:
    """All metrics of one case, per foreground class and averaged, as a flat CSV-friendly dict.

    Args:
        pred: predicted label map ``[D, H, W]`` with values in ``[0, num_classes)``.
        gt: ground-truth label map, same shape.
        spacing: ``(D, H, W)`` voxel spacing in mm (``None`` = 1 mm).
        num_classes: ``K`` including background (classes ``1..K-1`` are evaluated).
        class_names: optional names of the classes (a list indexed by class, or ``{class: name}``); when given
            the per-class keys use the name (``dice_anterior``) instead of the index (``dice_1``).
        hd95: compute HD95 (the only metric that needs distance transforms); when False the ``hd95_*`` keys
            are absent.

    Returns:
        ``{dice_c, hd95_c, nsd_c, correction_c}`` for each foreground class ``c``, ``dice_mean``, ``hd95_mean``,
        ``nsd_mean`` (plain means over the foreground classes) and ``correction_total`` (voxels).
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
    out: dict[str, Any] = {}
    per: dict[str, list[float]] = {"dice": [], "hd95": [], "nsd": []} if hd95 else {"dice": [], "nsd": []}
    total = 0
    for c in range(1, num_classes):
        key = names.get(c, str(c))
        p, g = pred == c, gt == c
        values = {"dice": dice(p, g), "nsd": nsd(p, g)}
        if hd95:
            values["hd95"] = hd95_distance(p, g, sp)
        for m, v in values.items():
            out[f"{m}_{key}"] = v
            per[m].append(v)
        corr = correction_voxels(p, g)
        out[f"correction_{key}"] = corr
        total += corr
    for m, vals in per.items():
        out[f"{m}_mean"] = float(np.mean(vals))
    out["correction_total"] = total
    return out
