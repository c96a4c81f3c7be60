"""Preprocessing of one case (reorient, resample, crop, normalise, pad) and its exact inverse.

Forward (:func:`preprocess_case`), in this order:

1. reorient every channel and the label to ``cfg.orientation`` with SimpleITK ``DICOMOrient``
   (a pure permutation/flip of axes, no interpolation);
2. resample to ``cfg.target_spacing`` (array order ``(D, H, W)``, mm): images linear or B-spline,
   labels nearest neighbour;
3. optionally crop to the bounding box of voxels that are non-zero in any channel;
4. normalise intensities: ``zscore`` per channel over the non-zero voxels (the MR foreground; zeros stay
   zero, as MONAI ``NormalizeIntensity(nonzero=True, channel_wise=True)``), ``ct`` (clip to the HU
   window then scale to [0, 1], as MONAI ``ScaleIntensityRange(clip=True)``) or ``none``;
5. pad (zeros, centred) so every spatial size is a multiple of ``cfg.pad_multiple``.

The intensity steps are written in numpy rather than with MONAI transforms so that the data layer
stays free of the 6 s torch/MONAI import; semantics are those of the MONAI transforms named above.

Every step records what it did in a JSON-serialisable ``meta`` dict, and :func:`restore_to_source`
undoes them in reverse (unpad, uncrop, nearest-neighbour resample, reorient back) so that a label map
predicted on the preprocessed grid becomes a ``sitk.Image`` with exactly the source's size, spacing,
origin and direction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk
from pydantic import Field, field_validator, model_validator

from raylearn.config import StrictModel, load_yaml, parse_config

__all__ = [
    "PreprocessConfig", "PreprocessedCase", "grid_of", "load_preprocess_config", "preprocess_case", "restore_to_source",
]

logger = logging.getLogger(__name__)

_INTERP = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline}


class PreprocessConfig(StrictModel):
    """Preprocessing settings (the YAML ``preprocess:`` section).

    Attributes:
        target_spacing: voxel spacing to resample to, array order ``(D, H, W)`` in mm; ``None`` keeps the
            source spacing.
        orientation: canonical orientation code for ``DICOMOrient`` (e.g. ``"RAS"``, ``"LPS"``); ``None``
            keeps the source orientation.
        image_interpolation: ``"linear"`` or ``"bspline"`` (labels always use nearest neighbour).
        normalization: ``"zscore"`` (MR, over non-zero voxels), ``"ct"`` (HU window) or ``"none"``.
        ct_window: ``(lo, hi)`` HU clip window for ``normalization="ct"``; scaled to [0, 1].
        crop_foreground: crop to the bounding box of non-zero image voxels.
        pad_multiple: pad each spatial size up to a multiple of this (the network's total stride).
    """

    target_spacing: tuple[float, float, float] | None = None
    orientation: str | None = "RAS"
    image_interpolation: Literal["linear", "bspline"] = "linear"
    normalization: Literal["zscore", "ct", "none"] = "zscore"
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    crop_foreground: bool = False
    pad_multiple: int = Field(8, ge=1, le=1024)

    @field_validator("target_spacing")
    @classmethod
    def _positive(cls, v):
        if v is not None and any(s <= 0 for s in v):
            raise ValueError("spacings must be positive")
        return v

    @field_validator("orientation")
    @classmethod
    def _orient(cls, v):
        if v is None:
            return v
        v = v.upper()
        axes = [{"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}.get(c) for c in v]
        if len(v) != 3 or None in axes or sorted(axes) != [0, 1, 2]:
            raise ValueError("expected a 3-letter orientation code with one of R/L, A/P, S/I each, e.g. 'RAS'")
        return v

    @model_validator(mode="after")
    def _window(self):
        if self.ct_window[0] >= self.ct_window[1]:
            raise ValueError("ct_window: lo must be below hi")
        return self


class _PreprocessFile(StrictModel):
    preprocess: PreprocessConfig = PreprocessConfig()


def load_preprocess_config(path: str | Path | None) -> PreprocessConfig:
    """Preprocessing settings from YAML (``raylearn ingest --config``).

    The file holds either the keys of :class:`PreprocessConfig` at the top level or a ``preprocess:`` section
    (other top-level keys are then errors). ``None`` gives the defaults.

    Raises:
        ConfigError: ``file.yaml: key.path: message`` lines.
    """
    if path is None:
        return PreprocessConfig()
    data = load_yaml(path)
    if isinstance(data, dict) and "preprocess" in data:
        return parse_config(data, _PreprocessFile, source=str(path)).preprocess
    return parse_config(data, PreprocessConfig, source=str(path))


@dataclass
class PreprocessedCase:
    """Result of :func:`preprocess_case`.

    Attributes:
        image: float32 ``[C, D, H, W]``.
        label: uint8 ``[D, H, W]`` or ``None``.
        meta: JSON-serialisable record of every step, input to :func:`restore_to_source`.
    """

    image: np.ndarray
    label: np.ndarray | None
    meta: dict[str, Any]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing of ``image`` in array order ``(D, H, W)``, mm."""
        return tuple(self.meta["spacing"])


def grid_of(img: sitk.Image) -> dict[str, list]:
    """Geometry of a ``sitk.Image`` as plain lists (SimpleITK ``x, y, z`` order)."""
    return {
        "size": list(img.GetSize()),
        "spacing": list(img.GetSpacing()),
        "origin": list(img.GetOrigin()),
        "direction": list(img.GetDirection()),
    }


def _apply_grid(img: sitk.Image, grid: dict) -> sitk.Image:
    img.SetSpacing(grid["spacing"])
    img.SetOrigin(grid["origin"])
    img.SetDirection(grid["direction"])
    return img


def _reference(grid: dict) -> sitk.Image:
    ref = sitk.Image([int(s) for s in grid["size"]], sitk.sitkUInt8)
    return _apply_grid(ref, grid)


def _zscore(x: np.ndarray) -> np.ndarray:
    """Per channel z-score over the non-zero voxels of that channel; zeros stay zero. ``x``: [C,D,H,W]."""
    out = np.zeros_like(x, dtype=np.float32)
    for c in range(x.shape[0]):
        mask = x[c] != 0
        if not mask.any():
            continue
        vals = x[c][mask].astype(np.float64)
        std = vals.std()
        out[c][mask] = (vals - vals.mean()) / (std if std > 0 else 1.0)
    return out


def preprocess_case(
    images: list[sitk.Image] | sitk.Image, label: sitk.Image | None, cfg: PreprocessConfig | None = None
) -> PreprocessedCase:
    """Preprocess one case for the network.

    Args:
        images: one 3D ``sitk.Image`` per channel (same geometry; see :func:`raylearn.data.readers.read_case`).
        label: 3D label image on the same grid, or ``None``.
        cfg: settings; defaults to ``PreprocessConfig()``.

    Returns:
        :class:`PreprocessedCase` with image float32 ``[C, D, H, W]``, label uint8 ``[D, H, W]`` (or
        ``None``) and the ``meta`` needed by :func:`restore_to_source`.
    """
    cfg = cfg or PreprocessConfig()
    if isinstance(images, sitk.Image):
        images = [images]
    if not images:
        raise ValueError("preprocess_case: no image channels given")
    imgs = [sitk.Cast(im, sitk.sitkFloat32) for im in images]
    lbl = None
    if label is not None:
        mm = sitk.MinimumMaximumImageFilter()
        mm.Execute(label)
        if mm.GetMinimum() < 0 or mm.GetMaximum() > 255:
            raise ValueError(f"label values must lie in [0, 255], got [{mm.GetMinimum()}, {mm.GetMaximum()}]")
        lbl = sitk.Cast(label, sitk.sitkUInt8)
    source = grid_of(imgs[0])
    source["orientation"] = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(imgs[0].GetDirection())
    meta: dict[str, Any] = {"source": source, "config": cfg.model_dump(mode="json")}

    # 1. reorient (axis permutation / flips only)
    if cfg.orientation and cfg.orientation != source["orientation"]:
        imgs = [sitk.DICOMOrient(im, cfg.orientation) for im in imgs]
        lbl = sitk.DICOMOrient(lbl, cfg.orientation) if lbl is not None else None
        meta["oriented"] = grid_of(imgs[0])
    else:
        meta["oriented"] = None

    # 2. resample
    meta["resampled"] = None
    if cfg.target_spacing is not None:
        target = tuple(float(s) for s in reversed(cfg.target_spacing))  # array (D,H,W) -> sitk (x,y,z)
        sp, size = np.array(imgs[0].GetSpacing()), np.array(imgs[0].GetSize())
        if not np.allclose(sp, target, rtol=1e-5, atol=0):
            new_size = [max(1, int(round(n))) for n in size * sp / np.array(target)]
            ref = sitk.Image(new_size, sitk.sitkFloat32)
            ref.SetSpacing(target)
            ref.SetOrigin(imgs[0].GetOrigin())
            ref.SetDirection(imgs[0].GetDirection())
            ident = sitk.Transform()
            imgs = [sitk.Resample(im, ref, ident, _INTERP[cfg.image_interpolation], 0.0) for im in imgs]
            if lbl is not None:
                lbl = sitk.Resample(lbl, ref, ident, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
            meta["resampled"] = grid_of(imgs[0])

    grid = grid_of(imgs[0])
    image = np.stack([sitk.GetArrayFromImage(im) for im in imgs]).astype(np.float32, copy=False)
    lab = sitk.GetArrayFromImage(lbl).astype(np.uint8, copy=False) if lbl is not None else None
    meta["grid"] = grid  # the grid the arrays live on before crop/pad

    # 3. crop to the non-zero bounding box
    full = image.shape[1:]
    crop = [[0, int(n)] for n in full]
    if cfg.crop_foreground:
        nz = np.any(image != 0, axis=0)
        if nz.any():
            idx = np.nonzero(nz)
            crop = [[int(i.min()), int(i.max()) + 1] for i in idx]
            sl = tuple(slice(a, b) for a, b in crop)
            image = image[(slice(None), *sl)]
            lab = lab[sl] if lab is not None else None
    meta["crop"] = crop

    # 4. normalise
    if cfg.normalization == "zscore":
        image = _zscore(image)
    elif cfg.normalization == "ct":
        lo, hi = cfg.ct_window
        image = ((np.clip(image, lo, hi) - lo) / (hi - lo)).astype(np.float32)

    # 5. pad to a multiple (centred, zeros)
    m = cfg.pad_multiple
    pad = []
    for n in image.shape[1:]:
        extra = (-n) % m
        pad.append([extra // 2, extra - extra // 2])
    if any(a or b for a, b in pad):
        image = np.pad(image, [(0, 0), *pad], constant_values=0)
        lab = np.pad(lab, pad, constant_values=0) if lab is not None else None
    meta["pad"] = pad
    meta["shape"] = [int(n) for n in image.shape[1:]]
    meta["spacing"] = [float(s) for s in reversed(grid["spacing"])]
    image = np.ascontiguousarray(image, dtype=np.float32)
    lab = np.ascontiguousarray(lab, dtype=np.uint8) if lab is not None else None
    return PreprocessedCase(image, lab, meta)


def restore_to_source(pred: np.ndarray, meta: dict[str, Any]) -> sitk.Image:
    """Map a label map on the preprocessed grid back onto the source image grid.

    Undoes padding, cropping (filled with 0 = background), resampling (nearest neighbour) and
    reorientation, in that order.

    Args:
        pred: integer label map ``[D, H, W]`` with the preprocessed shape ``meta["shape"]``.
        meta: the ``meta`` of :func:`preprocess_case` (as stored in the pool store).

    Returns:
        uint8 ``sitk.Image`` with exactly the source's size, spacing, origin and direction.

    Raises:
        ValueError: ``pred`` is not 3D or its shape differs from ``meta["shape"]``.
    """
    pred = np.asarray(pred)
    if pred.ndim != 3 or list(pred.shape) != list(meta["shape"]):
        raise ValueError(f"restore_to_source: prediction shape {pred.shape} != preprocessed shape {meta['shape']}")
    if pred.size and (pred.min() < 0 or pred.max() > 255):
        raise ValueError("restore_to_source: label values must lie in [0, 255]")
    # unpad
    sl = tuple(slice(a, n - b) for (a, b), n in zip(meta["pad"], pred.shape, strict=True))
    arr = pred[sl].astype(np.uint8)
    # uncrop
    grid = meta["grid"]
    full = np.zeros(tuple(reversed(grid["size"])), dtype=np.uint8)
    full[tuple(slice(a, b) for a, b in meta["crop"])] = arr
    img = _apply_grid(sitk.GetImageFromArray(full), grid)
    # un-resample onto the (reoriented) source grid
    if meta.get("resampled"):
        before = meta["oriented"] or meta["source"]
        img = sitk.Resample(img, _reference(before), sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    # reorient back
    if meta.get("oriented"):
        img = sitk.DICOMOrient(img, meta["source"]["orientation"])
    src = meta["source"]
    if list(img.GetSize()) != list(src["size"]):
        raise ValueError(f"restore_to_source: restored size {img.GetSize()} != source size {src['size']}")
    return _apply_grid(img, src)  # exact source geometry (removes float round-off of the steps above)
