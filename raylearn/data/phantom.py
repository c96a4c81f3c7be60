"""Synthetic 3D phantoms: the embedded default dataset (MSD layout, NIfTI).

Each case is a volume of "tissue" inside an ellipsoidal body (zero outside, like a skull-stripped MR)
holding ``n_structures`` labelled structures:

* odd classes are compact blobs (ellipsoids whose surface is deformed by smooth noise), even classes are
  elongated, curved tubes; sizes, aspect ratios, rotations and positions vary per case;
* every structure gets its own contrast per case: blobs are mostly brighter and tubes mostly darker than
  tissue, but in 5 % of cases the polarity flips, and the magnitude varies 18-32 (tissue ~100, noise
  sd 4-8), with a soft edge (hard enough that a threshold fails, easy enough that a small U-Net learns
  them from a dozen labelled cases in a few hundred steps);
* smooth texture (low-pass noise) in tissue and structures, Gaussian noise, and a smooth multiplicative
  bias field (exp of low-pass noise, about +-15 %).

Intensities of structures and background overlap, so a global threshold does not segment them; shape and
context must be learned. Everything is drawn from ``np.random.default_rng(seed)``: the same seed gives
the same files.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

__all__ = ["make_phantom_dataset", "make_phantom_case"]

logger = logging.getLogger(__name__)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], factor: int = 4) -> np.ndarray:
    """Low-pass noise with zero mean and unit std; ``factor``: correlation length in voxels."""
    fine = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=factor, truncate=2.5, mode="wrap")
    return (fine - fine.mean()) / (fine.std() + 1e-8)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _structure(
    rng: np.random.Generator, grid: np.ndarray, shape: tuple[int, int, int], kind: int, centre: np.ndarray
) -> np.ndarray:
    """Signed field (<0 inside) of one structure. ``grid``: [3, D, H, W] voxel coordinates."""
    n = np.array(shape, dtype=float)
    rot = _rotation(rng)
    rel = np.tensordot(rot.T, grid - centre[:, None, None, None], axes=1)
    if kind % 2 == 1:  # blob: deformed ellipsoid
        radii = n * rng.uniform(0.11, 0.22, 3)
        field = np.sqrt(np.sum((rel / radii[:, None, None, None]) ** 2, axis=0)) - 1.0
        field += 0.25 * _smooth_noise(rng, shape, factor=6)
    else:  # curved tube along the first rotated axis
        length = n.min() * rng.uniform(0.25, 0.4)
        radius = n.min() * rng.uniform(0.06, 0.1)
        bend = rng.uniform(-0.02, 0.02, 2) * n.min() / 48
        off1 = rel[1] - bend[0] * rel[0] ** 2
        off2 = rel[2] - bend[1] * rel[0] ** 2
        field = np.maximum(np.sqrt(off1**2 + off2**2) / radius, np.abs(rel[0]) / length) - 1.0
        field += 0.15 * _smooth_noise(rng, shape, factor=6)
    return field


def make_phantom_case(
    rng: np.random.Generator, shape: tuple[int, int, int] = (48, 48, 48), n_structures: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """One phantom.

    Args:
        rng: random generator (consumed).
        shape: ``(D, H, W)`` voxels.
        n_structures: labelled structures (labels ``1..n_structures``; later ones win where they overlap).

    Returns:
        ``(image float32 [D,H,W], label uint8 [D,H,W])``; the image is about 100 in tissue, 0 outside the body.
    """
    shape = tuple(int(s) for s in shape)
    n = np.array(shape, dtype=float)
    grid = np.indices(shape, dtype=np.float32)
    # body: large ellipsoid, slightly off-centre, deformed surface
    body_c = n / 2 + rng.uniform(-0.04, 0.04, 3) * n
    body_r = n * rng.uniform(0.40, 0.47, 3)
    body = np.sqrt(np.sum(((grid - body_c[:, None, None, None]) / body_r[:, None, None, None]) ** 2, axis=0))
    body = body + 0.05 * _smooth_noise(rng, shape, factor=8) < 1.0

    tissue = 100.0 + 5.0 * _smooth_noise(rng, shape, factor=4) + 2.5 * _smooth_noise(rng, shape, factor=2)
    image = tissue.astype(np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    centres: list[np.ndarray] = []
    for k in range(1, n_structures + 1):
        for _ in range(20):  # keep structures apart and inside the body
            c = n / 2 + rng.uniform(-0.22, 0.22, 3) * n
            if all(np.linalg.norm(c - o) > 0.22 * n.min() for o in centres):
                break
        centres.append(c)
        field = _structure(rng, grid, shape, k, c)
        inside = (field < 0) & body
        polarity = 1.0 if k % 2 else -1.0  # blobs mostly brighter, tubes mostly darker; 5 % of cases flipped
        contrast = polarity * (-1.0 if rng.random() < 0.05 else 1.0) * rng.uniform(18.0, 32.0)
        soft = 1.0 / (1.0 + np.exp(field / 0.08))  # soft edge
        texture = 1.0 + 0.15 * _smooth_noise(rng, shape, factor=3)
        image += (contrast * soft * texture).astype(np.float32)
        label[inside] = k
    bias = np.exp(0.15 * _smooth_noise(rng, shape, factor=12))
    image = image * bias + rng.normal(0.0, rng.uniform(4.0, 8.0), shape)
    image = np.where(body, np.maximum(image, 1.0), 0.0).astype(np.float32)
    return image, label


def make_phantom_dataset(
    out_dir: str | Path,
    n_cases: int = 40,
    shape: tuple[int, int, int] = (48, 48, 48),
    seed: int = 0,
    n_structures: int = 2,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> Path:
    """Write an MSD-layout phantom dataset (``dataset.json``, ``imagesTr/``, ``labelsTr/``, ``.nii.gz``).

    Args:
        out_dir: target folder (created; existing phantom files are overwritten).
        n_cases: number of cases (``phantom_000``, ``phantom_001``, ...).
        shape: ``(D, H, W)`` voxels per case.
        seed: random seed; the same seed gives identical files.
        n_structures: labelled structures per case (labels 1..n_structures, 0 background).
        spacing: voxel spacing, array order ``(D, H, W)`` in mm.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    if n_cases < 1 or n_structures < 1 or n_structures > 254:
        raise ValueError("make_phantom_dataset: need n_cases >= 1 and 1 <= n_structures <= 254")
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"make_phantom_dataset: shape must be 3 sizes >= 8, got {shape}")
    out = Path(out_dir)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    training = []
    sp = tuple(float(s) for s in reversed(spacing))
    for i in range(n_cases):
        image, label = make_phantom_case(rng, tuple(shape), n_structures)
        name = f"phantom_{i:03d}.nii.gz"
        for arr, sub in ((image, "imagesTr"), (label, "labelsTr")):
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing(sp)
            sitk.WriteImage(img, str(out / sub / name), useCompression=True)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    labels = {"0": "background"}
    labels.update({str(k): f"{'blob' if k % 2 else 'tube'}_{k}" for k in range(1, n_structures + 1)})
    meta = {
        "name": "Phantom",
        "description": f"raylearn synthetic phantoms (seed {seed}, shape {list(shape)})",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": labels,
        "numTraining": n_cases,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=1))
    logger.info("wrote %d phantom cases to %s", n_cases, out)
    return out
