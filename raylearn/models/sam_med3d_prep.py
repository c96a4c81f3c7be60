"""SAM-Med3D pre- and post-processing, as the official inference does it (no torch model here).

Resample to 1.5 mm isotropic (SimpleITK, linear), crop/pad an ``S^3`` window around the region of interest,
z-score over the window's foreground (voxels > 0); clicks in voxel or world (mm) coordinates become window
coordinates; the decoder's low-res logits are upsampled, pasted back and mapped to the original grid.
Arrays are in SimpleITK order ``[D, H, W]`` (z, y, x).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

__all__ = ["Click", "ClickError", "Volume", "prepare_volume", "window_start", "crop_window",
           "window_probability_to_original", "upsample_logits", "combine_class_probabilities", "group_clicks"]


class ClickError(ValueError):
    """A click prompt is invalid (outside the volume, outside the model's field of view, ...)."""


@dataclass(frozen=True)
class Click:
    """One click prompt. Give exactly one of ``voxel`` (array index ``(d, h, w)`` = (z, y, x) of the original
    image, may be fractional) or ``world`` (physical point ``(x, y, z)`` in mm, ITK/LPS convention)."""

    label: int
    positive: bool = True
    voxel: tuple[float, float, float] | None = None
    world: tuple[float, float, float] | None = None


@dataclass
class Volume:
    """An image prepared for SAM-Med3D: the original geometry plus the 1.5 mm resampled array ``[D, H, W]``."""

    original: sitk.Image
    resampled: sitk.Image
    array: np.ndarray
    sha256: str
    shape: tuple[int, int, int] = field(init=False)

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.original.GetSize()[::-1])

    def click_index(self, click: Click, name: str = "click") -> np.ndarray:
        """Continuous index ``(d, h, w)`` of a click on the resampled grid; :class:`ClickError` when outside."""
        if (click.voxel is None) == (click.world is None):
            raise ClickError(f"{name}: give exactly one of 'voxel' or 'world'")
        if click.voxel is not None:
            idx = np.asarray(click.voxel, dtype=float)
            if idx.shape != (3,) or not np.all(np.isfinite(idx)):
                raise ClickError(f"{name}: voxel must be 3 finite numbers (d, h, w)")
            if np.any(idx < -0.5) or np.any(idx > np.asarray(self.shape) - 0.5):
                raise ClickError(f"{name}: voxel {tuple(click.voxel)} lies outside the volume of shape {self.shape}")
            point = self.original.TransformContinuousIndexToPhysicalPoint([float(v) for v in idx[::-1]])
        else:
            point = [float(v) for v in click.world]
            if len(point) != 3 or not np.all(np.isfinite(point)):
                raise ClickError(f"{name}: world must be 3 finite numbers (x, y, z) in mm")
            ijk = np.asarray(self.original.TransformPhysicalPointToContinuousIndex(point))
            if np.any(ijk < -0.5) or np.any(ijk > np.asarray(self.original.GetSize()) - 0.5):
                raise ClickError(f"{name}: world point {tuple(point)} mm lies outside the volume "
                                 f"(shape {self.shape}, origin {self.original.GetOrigin()})")
        return np.asarray(self.resampled.TransformPhysicalPointToContinuousIndex(point))[::-1]


def prepare_volume(image: sitk.Image, spacing_mm: float = 1.5) -> Volume:
    """Resample a 3D scalar image to ``spacing_mm`` isotropic (linear), keeping origin and direction."""
    img = sitk.Cast(image, sitk.sitkFloat32)
    old_sp, old_size = np.asarray(img.GetSpacing()), np.asarray(img.GetSize())
    new_size = [max(1, int(round(n))) for n in old_size * old_sp / spacing_mm]
    res = sitk.Resample(img, new_size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), (spacing_mm,) * 3,
                        img.GetDirection(), 0.0, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(res).astype(np.float32)
    h = hashlib.sha256(sitk.GetArrayViewFromImage(img).tobytes())
    h.update(repr((img.GetSpacing(), img.GetOrigin(), img.GetDirection())).encode())
    return Volume(original=image, resampled=res, array=arr, sha256=h.hexdigest())


def window_start(volume: Volume, center: np.ndarray | None, size: int) -> tuple[int, int, int]:
    """Start index of the ``size^3`` window centred on ``center`` (resampled index; volume centre when None)."""
    c = np.asarray(volume.array.shape, dtype=float) / 2 - 0.5 if center is None else np.asarray(center, float)
    # round first so that a voxel click and the same click in mm (float noise) give the same window
    return tuple(int(v) for v in np.floor(np.round(c, 3) - size / 2 + 1))


def crop_window(array: np.ndarray, start: Sequence[int], size: int) -> np.ndarray:
    """``size^3`` crop at ``start`` with zero padding where it leaves the array, z-scored over voxels > 0.

    Returns:
        float32 ``[S, S, S]``.
    """
    out = np.zeros((size,) * 3, dtype=np.float32)
    src = tuple(slice(max(s, 0), min(s + size, n)) for s, n in zip(start, array.shape, strict=True))
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start, strict=True))
    if all(sl.stop > sl.start for sl in src):
        out[dst] = array[src]
    fg = out > 0
    vals = out[fg] if fg.any() else out.ravel()
    std = float(vals.std())
    return ((out - float(vals.mean())) / (std if std > 0 else 1.0)).astype(np.float32)


def window_probability_to_original(volume: Volume, start: Sequence[int], prob: np.ndarray) -> np.ndarray:
    """Paste a window probability ``[S,S,S]`` into the resampled grid and map it to the original grid.

    Returns:
        float32 ``[D, H, W]`` on the original image grid (linear interpolation; 0 outside the window).
    """
    full = np.zeros(volume.array.shape, dtype=np.float32)
    size = prob.shape[0]
    dst = tuple(slice(max(s, 0), min(s + size, n)) for s, n in zip(start, full.shape, strict=True))
    src = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(dst, start, strict=True))
    if all(sl.stop > sl.start for sl in dst):
        full[dst] = prob[src]
    img = sitk.GetImageFromArray(full)
    img.CopyInformation(volume.resampled)
    # nearest-neighbour extrapolation: the rounded 1.5 mm grid can end up to half a voxel short of the original
    back = sitk.Resample(img, volume.original, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32, True)
    return sitk.GetArrayFromImage(back)


def upsample_logits(low_res: np.ndarray, size: int) -> np.ndarray:
    """Low-res logits ``[L,L,L]`` -> window probability ``float32 [S,S,S]`` (trilinear, then sigmoid)."""
    t = torch.tensor(np.asarray(low_res), dtype=torch.float32)[None, None]
    up = F.interpolate(t, size=(size,) * 3, mode="trilinear", align_corners=False)
    return torch.sigmoid(up)[0, 0].numpy()


def combine_class_probabilities(probs: dict[int, np.ndarray], threshold: float = 0.5) -> np.ndarray:
    """Label map ``uint8 [D,H,W]``: per voxel the class of highest probability among those above threshold."""
    labels = sorted(probs)
    shape = next(iter(probs.values())).shape
    if not labels:
        return np.zeros(shape, np.uint8)
    stack = np.stack([probs[k] for k in labels])
    best = np.argmax(stack, axis=0)
    out = np.asarray(labels, dtype=np.uint8)[best]
    out[np.max(stack, axis=0) <= threshold] = 0
    return out


def group_clicks(volume: Volume, clicks: Sequence[Click], size: int, start: Sequence[int] | None = None
                 ) -> dict[int, tuple[tuple[int, int, int], np.ndarray, np.ndarray]]:
    """Per class: the window start and the class's clicks as window coordinates ``[N,3]`` and labels ``[N]``.

    Without a fixed ``start`` the window is centred on the centroid of all clicks (one encoder pass for every
    class); a class with a click outside that window gets a window centred on its own clicks.

    Raises:
        ClickError: empty click list, a click outside the volume, or (with a fixed ``start``) outside the window.
    """
    if not clicks:
        raise ClickError("the click list is empty: give at least one click")
    idx = np.stack([volume.click_index(c, name=f"click {i}") for i, c in enumerate(clicks)])
    common = tuple(start) if start is not None else window_start(volume, idx.mean(axis=0), size)
    out = {}
    for k in sorted({c.label for c in clicks}):
        sel = np.asarray([c.label == k for c in clicks])
        st = common
        inside = lambda s: np.all((idx[sel] >= np.asarray(s) - 0.5) & (idx[sel] < np.asarray(s) + size - 0.5))  # noqa: E731, B023
        if not inside(st):
            if start is not None:
                raise ClickError(f"class {k}: a click lies outside the model's {size}-voxel field of view starting "
                                 f"at {tuple(start)} (resampled grid); start a new session centred nearer the clicks")
            st = window_start(volume, idx[sel].mean(axis=0), size)
            if not inside(st):
                raise ClickError(f"class {k}: the clicks span more than the model's field of view ({size} voxels)")
        pts = (idx[sel] - np.asarray(st)).astype(np.float32)
        labs = np.asarray([1 if c.positive else 0 for c in clicks if c.label == k], dtype=np.float32)
        out[k] = (st, pts, labs)
    return out
