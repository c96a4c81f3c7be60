"""Volume reductions (voxel map -> case score), predicted foreground volume and weighted feature pooling.

Shapes: a voxel map is ``[D, H, W]``; a predicted label map is ``uint8 [D, H, W]``; a feature map is
``[F, d, h, w]`` (any spatial size, e.g. a network bottleneck).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["REDUCTIONS", "area_resize", "foreground_volume", "reduce_map", "reduce_regions", "reduce_slices",
           "topk_count", "weighted_pool"]

#: names accepted by :func:`reduce_map`
REDUCTIONS = ("mean", "sum", "topk_mean", "foreground", "class_mean")


def topk_count(n_voxels: int, topk: float) -> int:
    """Number of voxels kept by ``topk_mean``.

    Args:
        n_voxels: voxels in the map.
        topk: a fraction in ``(0, 1)`` of the voxels, or an integral count ``>= 1`` (``1.0`` = the single largest).

    Returns:
        ``k`` in ``[1, n_voxels]``.
    """
    if not topk > 0:
        raise ValueError(f"topk must be > 0 (a fraction in (0, 1) or a voxel count >= 1), got {topk}")
    if topk < 1:
        k = int(np.ceil(topk * n_voxels))
    else:
        if float(topk) != int(topk):
            raise ValueError(f"topk >= 1 is a voxel count and must be an integer, got {topk}")
        k = int(topk)
    return max(1, min(k, n_voxels))


def reduce_map(
    values: np.ndarray,
    reduction: str = "mean",
    *,
    topk: float = 0.05,
    labels: np.ndarray | None = None,
) -> float:
    """Reduce a voxel map to one case score.

    Args:
        values: ``[D, H, W]`` voxel map (e.g. entropy).
        reduction: ``mean``; ``sum``; ``topk_mean`` (mean of the ``topk`` largest voxels, see :func:`topk_count`);
            ``foreground`` (mean over voxels whose predicted label is not 0; the whole-volume mean when nothing is
            predicted as foreground); ``class_mean`` (mean over voxels of each predicted class, then the mean over
            the classes present: every class weighs the same, however small).
        topk: used by ``topk_mean``.
        labels: predicted label map ``[D, H, W]``, required by ``foreground`` and ``class_mean``.

    Returns:
        A Python float.
    """
    values = np.asarray(values)
    if values.size == 0:
        raise ValueError("reduce_map: empty voxel map")
    if reduction == "mean":
        return float(values.mean(dtype=np.float64))
    if reduction == "sum":
        return float(values.sum(dtype=np.float64))
    if reduction == "topk_mean":
        k = topk_count(values.size, topk)
        flat = values.ravel()
        return float(np.partition(flat, flat.size - k)[flat.size - k :].mean(dtype=np.float64))
    if reduction in ("foreground", "class_mean"):
        if labels is None:
            raise ValueError(f"reduction {reduction!r} needs the predicted label map (labels=...)")
        labels = np.asarray(labels)
        if labels.shape != values.shape:
            raise ValueError(f"reduce_map: labels shape {labels.shape} != values shape {values.shape}")
        if reduction == "foreground":
            fg = labels > 0
            return float(values[fg].mean(dtype=np.float64)) if fg.any() else float(values.mean(dtype=np.float64))
        flat_l = labels.ravel().astype(np.int64)
        sums = np.bincount(flat_l, weights=values.ravel().astype(np.float64))
        counts = np.bincount(flat_l)
        present = counts > 0
        return float((sums[present] / counts[present]).mean())
    raise ValueError(f"unknown reduction {reduction!r}; known: {', '.join(REDUCTIONS)}")


def reduce_slices(
    values: np.ndarray,
    axis: int,
    reduction: str = "mean",
    *,
    topk: float = 0.05,
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """Reduce a voxel map to one score per slice along ``axis``: the volume reduction of each slice (slice units).

    Slice ``i`` scores ``reduce_map(values.take(i, axis), reduction, topk=topk, labels=labels.take(i, axis))``, so a
    slice score is exactly what :func:`reduce_map` gives for a volume made of that slice alone (``topk_mean``'s
    ``k`` is counted on the slice's voxels; ``foreground`` falls back to the slice mean when the slice has no
    predicted foreground).

    Args:
        values: ``[D, H, W]`` voxel map.
        axis: 0, 1 or 2, the slicing axis of the ``[D, H, W]`` grid.
        reduction: see :func:`reduce_map`.
        topk: see :func:`reduce_map`.
        labels: predicted label map ``[D, H, W]`` (``foreground`` and ``class_mean``).

    Returns:
        ``float64 [values.shape[axis]]``.
    """
    values = np.asarray(values)
    if values.ndim != 3:
        raise ValueError(f"reduce_slices: expected a [D, H, W] voxel map, got shape {values.shape}")
    if axis not in (0, 1, 2):
        raise ValueError(f"reduce_slices: axis must be 0, 1 or 2, got {axis!r}")
    if labels is not None and np.shape(labels) != values.shape:
        raise ValueError(f"reduce_slices: labels shape {np.shape(labels)} != values shape {values.shape}")
    if reduction == "mean":
        other = tuple(a for a in range(3) if a != axis)
        return values.mean(axis=other, dtype=np.float64)
    if reduction == "sum":
        other = tuple(a for a in range(3) if a != axis)
        return values.sum(axis=other, dtype=np.float64)
    return np.array([reduce_map(values.take(i, axis=axis), reduction, topk=topk,
                                labels=None if labels is None else np.asarray(labels).take(i, axis=axis))
                     for i in range(values.shape[axis])], dtype=np.float64)


def reduce_regions(
    values: np.ndarray,
    regions: Sequence[tuple],
    reduction: str = "mean",
    *,
    topk: float = 0.05,
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """Reduce a voxel map to one score per region (patch units): the volume reduction of each region.

    Region ``i`` scores ``reduce_map(values[regions[i]], reduction, topk=topk, labels=labels[regions[i]])``, so a
    patch score is exactly what :func:`reduce_map` gives for a volume made of that patch alone.

    Args:
        values: ``[D, H, W]`` voxel map, or ``[C, D, H, W]`` with ``reduction="mean"`` (a mean per channel).
        regions: numpy indices of the spatial axes (e.g. :meth:`raylearn.units.UnitGrid.regions`).
        reduction: see :func:`reduce_map` (only ``mean`` for a ``[C, D, H, W]`` map).
        topk: see :func:`reduce_map`.
        labels: predicted label map ``[D, H, W]`` (``foreground`` and ``class_mean``).

    Returns:
        ``float64 [len(regions)]``, or ``[len(regions), C]`` for a ``[C, D, H, W]`` map.
    """
    values = np.asarray(values)
    if values.ndim not in (3, 4):
        raise ValueError(f"reduce_regions: expected a [D, H, W] (or [C, D, H, W]) voxel map, got shape {values.shape}")
    if values.ndim == 4 and reduction != "mean":
        raise ValueError(f"reduce_regions: a [C, D, H, W] map is reduced by its mean only, not {reduction!r}")
    if labels is not None and np.shape(labels) != values.shape[-3:]:
        raise ValueError(f"reduce_regions: labels shape {np.shape(labels)} != values shape {values.shape[-3:]}")
    if not regions:
        return np.zeros((0, *values.shape[:-3]), dtype=np.float64)
    out = []
    for region in regions:
        region = tuple(region)[-3:]
        if values.ndim == 4:
            out.append(values[(slice(None), *region)].reshape(values.shape[0], -1).mean(axis=1, dtype=np.float64))
            continue
        part = values[region]
        if part.size == 0:
            raise ValueError(f"reduce_regions: region {region} is empty in a map of shape {values.shape}")
        part_labels = None if labels is None else np.asarray(labels)[region]
        out.append(reduce_map(part, reduction, topk=topk, labels=part_labels))
    return np.asarray(out, dtype=np.float64)


def foreground_volume(labels: np.ndarray, num_classes: int, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Predicted volume of each foreground class.

    Args:
        labels: label map ``[D, H, W]`` (integers in ``[0, num_classes)``).
        num_classes: ``K`` including background.
        spacing: voxel spacing ``(D, H, W)`` in mm; when given the result is in mL, else in voxels.

    Returns:
        ``float64 [K-1]``: classes ``1..K-1``.
    """
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"foreground_volume: label values outside [0, {num_classes}) (max {labels.max()})")
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=num_classes)[1:num_classes].astype(np.float64)
    if spacing is None:
        return counts
    if len(spacing) != labels.ndim:
        raise ValueError(f"foreground_volume: spacing {tuple(spacing)} does not match a {labels.ndim}-d label map")
    return counts * float(np.prod(spacing)) / 1000.0


def area_resize(values: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resize a map by area averaging (adaptive average pooling; torch ``interpolate(mode="area")`` semantics).

    Output cell ``i`` along an axis of input length ``n`` and output length ``m`` averages the input cells
    ``floor(i n / m) .. ceil((i + 1) n / m) - 1``; when ``n`` is a multiple of ``m`` that is the exact block mean,
    and when enlarging each output cell copies one input cell.

    Args:
        values: ``[D, H, W]`` (any number of axes).
        shape: target shape, same number of axes.

    Returns:
        ``float64`` array of ``shape``.
    """
    out = np.asarray(values, dtype=np.float64)
    if out.ndim != len(shape):
        raise ValueError(f"area_resize: cannot resize shape {out.shape} to {tuple(shape)}")
    for axis, m in enumerate(int(x) for x in shape):
        n = out.shape[axis]
        if n == m:
            continue
        if m < 1 or n < 1:
            raise ValueError(f"area_resize: sizes must be >= 1, got {n} -> {m}")
        i = np.arange(m)
        start, stop = (i * n) // m, -((-(i + 1) * n) // m)
        csum = np.concatenate([np.zeros_like(out.take([0], axis=axis)), np.cumsum(out, axis=axis)], axis=axis)
        sums = csum.take(stop, axis=axis) - csum.take(start, axis=axis)
        counts = (stop - start).reshape([-1 if a == axis else 1 for a in range(out.ndim)])
        out = sums / counts
    return out


def weighted_pool(features: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Global (optionally uncertainty-weighted) average pooling of a feature map: the PGDR idea of SUGFW.

    ``out_f = sum_v w_v x_{f,v} / sum_v w_v`` over the feature cells ``v``; with ``weights=None`` (or weights that
    sum to zero) a plain mean. This is the one pooling behind every backend's ``Segmenter.embed``: a backend
    zero-pads its input for the network, so it pads the weights the same way (zeros: padding is not pooled).

    Args:
        features: ``[F, d, h, w]`` feature map (e.g. a network bottleneck).
        weights: finite, non-negative ``[D, H, W]`` map on the image grid or on the feature grid; it is
            area-resized to ``(d, h, w)`` with :func:`area_resize` (exact block means when ``D`` is a multiple of
            ``d`` and so on).

    Returns:
        ``float32 [F]``.
    """
    features = np.asarray(features, dtype=np.float32)
    if features.ndim < 2:
        raise ValueError(f"weighted_pool: expected a feature map [F, ...spatial], got shape {features.shape}")
    flat = features.reshape(features.shape[0], -1)
    if weights is None:
        return flat.mean(axis=1, dtype=np.float64).astype(np.float32)
    weights = np.asarray(weights)
    if weights.ndim != features.ndim - 1:
        raise ValueError(f"weighted_pool: weights shape {weights.shape} vs feature map shape {features.shape}")
    if not np.all(np.isfinite(weights)):
        raise ValueError("weighted_pool: weights must be finite")
    if (weights < 0).any():
        raise ValueError("weighted_pool: weights must be non-negative")
    w = area_resize(weights, features.shape[1:]).ravel()
    total = w.sum()
    if total <= 0:
        return flat.mean(axis=1, dtype=np.float64).astype(np.float32)
    return (flat.astype(np.float64) @ w / total).astype(np.float32)
