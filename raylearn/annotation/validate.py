"""Checking an uploaded label against its image, and mapping it onto the pool store's grid.

People label the *source* image (the file the annotation API serves, as the viewer shows it). A label is
accepted only when its geometry is the image's (size, spacing, origin, direction, compared with SimpleITK's
own reading of both), its values are classes of the dataset (``dataset.json``'s ``labels``), and it is not
empty (unless allowed). It is then taken through the same steps the pool store applied to the image
(:func:`raylearn.data.preprocess.preprocess_case`: reorientation, nearest-neighbour resampling, crop, pad),
the inverse of :func:`raylearn.data.preprocess.restore_to_source`, so training sees it on the image's grid.

Every failure raises :class:`LabelInvalid` with an HTTP status and a message naming the problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from raylearn.data.preprocess import _apply_grid, _reference

__all__ = ["LabelInvalid", "CheckedLabel", "check_label", "label_to_store"]

#: tolerances of the geometry comparison (mm for origin, relative for spacing, absolute for direction cosines)
ORIGIN_ATOL_MM = 1e-3
SPACING_RTOL = 1e-4
DIRECTION_ATOL = 1e-4


class LabelInvalid(ValueError):
    """An uploaded label is refused; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class CheckedLabel:
    """A label that passed :func:`check_label`: ``array`` uint8 [D, H, W] on the store grid, and counts."""

    array: np.ndarray
    values: list[int]
    foreground_voxels: int
    dropped_foreground_voxels: int


def _fmt(v) -> str:
    return "(" + ", ".join(f"{float(x):g}" for x in v) + ")"


def check_geometry(label: sitk.Image, source: dict[str, Any], what: str = "label") -> None:
    """Refuse a label whose grid differs from the source image's (``meta["source"]`` of the pool store)."""
    if label.GetDimension() != 3:
        raise LabelInvalid(f"{what}: a 3D label is required, got {label.GetDimension()}D")
    if label.GetNumberOfComponentsPerPixel() != 1:
        raise LabelInvalid(f"{what}: a scalar label map is required, got {label.GetNumberOfComponentsPerPixel()} "
                           "components per voxel")
    size = list(label.GetSize())
    if size != [int(s) for s in source["size"]]:
        raise LabelInvalid(f"{what}: size {'x'.join(map(str, size))} does not match the image's "
                           f"{'x'.join(str(int(s)) for s in source['size'])} (x, y, z voxels)")
    if not np.allclose(label.GetSpacing(), source["spacing"], rtol=SPACING_RTOL, atol=0):
        raise LabelInvalid(f"{what}: spacing {_fmt(label.GetSpacing())} mm does not match the image's "
                           f"{_fmt(source['spacing'])} mm")
    if not np.allclose(label.GetOrigin(), source["origin"], rtol=0, atol=ORIGIN_ATOL_MM):
        raise LabelInvalid(f"{what}: origin {_fmt(label.GetOrigin())} mm does not match the image's "
                           f"{_fmt(source['origin'])} mm")
    if not np.allclose(label.GetDirection(), source["direction"], rtol=0, atol=DIRECTION_ATOL):
        raise LabelInvalid(f"{what}: direction {_fmt(label.GetDirection())} does not match the image's "
                           f"{_fmt(source['direction'])}")


def label_to_store(label: sitk.Image, meta: dict[str, Any]) -> tuple[np.ndarray, int]:
    """A label on the source grid -> ``(uint8 [D, H, W] on the store grid, foreground voxels cropped away)``.

    The steps of :func:`raylearn.data.preprocess.preprocess_case` for a label, with the grids it recorded in
    ``meta`` (reorient, resample with nearest neighbour, crop, pad).
    """
    img = _apply_grid(sitk.Cast(label, sitk.sitkUInt8), meta["source"])  # exact source geometry
    orient = (meta.get("config") or {}).get("orientation")
    if meta.get("oriented") and orient:
        img = sitk.DICOMOrient(img, orient)
    if meta.get("resampled"):
        img = sitk.Resample(img, _reference(meta["resampled"]), sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                            sitk.sitkUInt8)
    arr = sitk.GetArrayFromImage(img).astype(np.uint8, copy=False)
    if list(arr.shape) != list(reversed(meta["grid"]["size"])):
        raise LabelInvalid(f"label: on the store's grid it has shape {arr.shape}, expected "
                           f"{tuple(reversed(meta['grid']['size']))}", status=422)
    inside = arr[tuple(slice(a, b) for a, b in meta["crop"])]
    dropped = int(np.count_nonzero(arr)) - int(np.count_nonzero(inside))
    out = np.pad(inside, [tuple(p) for p in meta["pad"]], constant_values=0)
    if list(out.shape) != list(meta["shape"]):
        raise LabelInvalid(f"label: mapped shape {out.shape} != the stored image's {tuple(meta['shape'])}")
    return np.ascontiguousarray(out), dropped


def check_label(label: sitk.Image, meta: dict[str, Any], classes: dict[int, str], allow_empty: bool = False,
                what: str = "label") -> CheckedLabel:
    """Validate an uploaded label against its image and the dataset's classes; map it to the store grid.

    Args:
        label: the uploaded label as read by :func:`raylearn.serve.volumes.read_volume`.
        meta: the case's preprocessing record (``PoolStore.meta(case_id)``).
        classes: the dataset's labels ``{value: name}`` including 0 (background).
        allow_empty: accept a label with no foreground voxel.

    Raises:
        LabelInvalid: 422 naming the problem (geometry, non-integer or unknown values, empty).
    """
    check_geometry(label, meta["source"], what)
    arr = sitk.GetArrayViewFromImage(label)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise LabelInvalid(f"{what}: voxel values must be whole numbers (class values), got {arr.dtype} "
                               "with fractional or non-finite values")
    values = [int(v) for v in np.unique(arr)]
    unknown = [v for v in values if v not in classes]
    if unknown:
        known = ", ".join(f"{k} ({v})" for k, v in sorted(classes.items()))
        raise LabelInvalid(f"{what}: value(s) {unknown[:10]} are not classes of the dataset (known: {known})")
    fg = int(np.count_nonzero(arr))
    if fg == 0 and not allow_empty:
        raise LabelInvalid(f"{what}: the label is empty (no foreground voxel); empty labels are not accepted "
                           "here (annotation.allow_empty_labels)")
    mapped, dropped = label_to_store(label, meta)
    return CheckedLabel(mapped, values, fg, dropped)
