"""Helpers shared by the data-layer tests (imported by name; tests/data is put on sys.path by conftest)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

#: an oblique direction (rotation of ~20 degrees about z then ~10 about x), row-major 3x3
OBLIQUE = tuple(
    (
        np.array([[1, 0, 0], [0, np.cos(0.17), -np.sin(0.17)], [0, np.sin(0.17), np.cos(0.17)]])
        @ np.array([[np.cos(0.35), -np.sin(0.35), 0], [np.sin(0.35), np.cos(0.35), 0], [0, 0, 1]])
    ).ravel()
)


def write_image(
    path: Path,
    arr: np.ndarray,
    spacing=(1.0, 1.0, 1.0),
    origin=(0.0, 0.0, 0.0),
    direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
) -> Path:
    """Write a [D,H,W] array with SimpleITK geometry (x,y,z order)."""
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection([float(d) for d in direction])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def blob_case(rng: np.random.Generator, shape=(12, 14, 16), n_classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A random image (float32, non-zero) and a label with a box per class."""
    img = (rng.normal(100, 10, shape)).astype(np.float32)
    lbl = np.zeros(shape, np.uint8)
    for k in range(1, n_classes):
        c = [int(rng.integers(2, s - 5)) for s in shape]
        lbl[c[0] : c[0] + 3, c[1] : c[1] + 4, c[2] : c[2] + 3] = k
    return img, lbl
