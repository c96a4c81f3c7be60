"""Pure functions of the two cold-start papers (no Ray, no torch): CSAL-3D's alignment/variance/kernels and
SUGFW's augmentation inverses, uncertainty map and PGDR pooling.

CSAL-3D (HiLab-git/CSAL-3D, checked at commit e91b607): ``utils/view_transforms.py`` (rotations are quarter
turns of the last two axes of ``[B, C, X, Y, Z]``; the two non-identity view permutations swap X<->Y and
X<->Z, each its own inverse), ``inference/FeatureExtracter_v2.py`` (9 reconstructions: 3 rotations x 3 views,
aligned back, ``torch.var`` over them, mean) and ``CSAL_methods/ours.py`` (URDS: RBF kernels with
``gamma in {0.1, 1, 10}`` each multiplied by ``1 / (u_i + u_j)`` with min-max-scaled uncertainties, kernel
k-means on their sum, typicality ``1 / mean cosine distance`` inside the cluster, the ``search_nums`` most
typical then the most uncertain).

SUGFW (HiLab-git/SUGFW, checked at commit 6979278): ``UC-SAM/get_uncertainty.py`` and ``UC-SAM/augmentation``
(gamma, flip, rotate, posterize, contrast, sharpness, brightness in that order; the mask is mapped back by
rotating by ``360 - angle`` and flipping again; ``U = M(1 - M) + 0.5``) and ``UC-SAM/select_samples.py``
(PGDR: the uncertainty map average-pooled to the feature grid, normalised to sum 1, weighted sum of the SAM
image-encoder features).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageEnhance

__all__ = [
    "AUG_CHOICES",
    "EXTRACTOR_FEATURES",
    "VIEW_PERMUTATIONS",
    "augment_slice",
    "from_view",
    "invert_geometry",
    "kernel_kmeans",
    "minmax",
    "pgdr_pool",
    "sam_uncertainty",
    "reconstruction_variance",
    "typicality_cosine",
    "to_view",
    "urds_kernels",
    "window_starts",
]

#: features computed by a label-free extractor before round 0: name -> (extractor, kind, description)
EXTRACTOR_FEATURES: dict[str, tuple[str, str, str]] = {
    "csal3d_uncertainty": ("csal3d", "scalar", "CSAL-3D: mean variance of the 9 aligned pretext reconstructions"),
    "csal3d_embedding": ("csal3d", "vector", "CSAL-3D: pooled latent of the pretext encoder, float16 [F]"),
    "sugfw_uncertainty": ("sugfw", "scalar", "SUGFW: mean SAM-ensemble uncertainty U over the volume's slices"),
    "sugfw_embedding": ("sugfw", "vector", "SUGFW: PGDR, U-weighted pooled SAM encoder features, float16 [256]"),
}

#: axis orders of ``[B, C, X, Y, Z]`` for the 3 views (identity, X<->Y, X<->Z); each is its own inverse
VIEW_PERMUTATIONS: tuple[tuple[int, ...], ...] = ((0, 1, 2, 3, 4), (0, 1, 3, 2, 4), (0, 1, 4, 3, 2))


def to_view(x: np.ndarray, view: int, rot: int) -> np.ndarray:
    """CSAL-3D's view transform of ``x [B, C, X, Y, Z]`` (cubic spatial shape): ``rot`` quarter turns in the
    (Y, Z) plane, then the view's axis permutation (the authors' DEFAULT_ORDER: rotate, then permute)."""
    return np.transpose(np.rot90(x, rot, axes=(3, 4)), VIEW_PERMUTATIONS[view])


def from_view(y: np.ndarray, view: int, rot: int) -> np.ndarray:
    """Inverse of :func:`to_view`: undo the permutation, then turn back (``from_view(to_view(x)) == x`` exactly)."""
    return np.rot90(np.transpose(y, VIEW_PERMUTATIONS[view]), -rot, axes=(3, 4))


def reconstruction_variance(aligned: np.ndarray) -> np.ndarray:
    """Per-voxel variance over the aligned reconstructions.

    Args:
        aligned: ``[R, ...]`` reconstructions in the original frame (R = 9 in CSAL-3D).

    Returns:
        ``[...]`` population variance (ddof 0) over axis 0; 0 where all reconstructions agree.
    """
    d = np.asarray(aligned, dtype=np.float64)
    d = d - d[:1]  # shifted by the first reconstruction: exactly 0 when all agree, and numerically stable
    return np.maximum((d * d).mean(axis=0) - d.mean(axis=0) ** 2, 0.0)


def window_starts(length: int, patch: int, overlap: float = 0.5) -> list[int]:
    """Start offsets of sliding windows of ``patch`` voxels covering an axis of ``length`` voxels.

    The stride adapts to the volume: the fewest windows whose stride is at most ``patch * (1 - overlap)``,
    spread evenly from 0 to ``length - patch`` (one window when ``length <= patch``).
    """
    if length <= patch:
        return [0]
    step = max(1, int(round(patch * (1.0 - overlap))))
    n = int(np.ceil((length - patch) / step)) + 1
    return sorted({int(round(s)) for s in np.linspace(0, length - patch, n)})


def minmax(u: np.ndarray) -> np.ndarray:
    """Min-max scaling to [0, 1] (sklearn's ``MinMaxScaler``; constant input -> zeros)."""
    u = np.asarray(u, dtype=np.float64).ravel()
    span = u.max() - u.min()
    return (u - u.min()) / span if span > 0 else np.zeros_like(u)


def urds_kernels(x: np.ndarray, u: np.ndarray, gammas: Sequence[float] = (0.1, 1.0, 10.0)) -> list[np.ndarray]:
    """CSAL-3D's uncertainty-weighted RBF kernels ``K_g[i, j] = exp(-g * |x_i - x_j|^2 / 2) / (u_i + u_j + 1e-10)``.

    Args:
        x: ``[N, F]`` features.
        u: ``[N]`` uncertainties, already min-max scaled (as the authors' code does).
        gammas: RBF widths.

    Returns:
        one ``[N, N]`` kernel per gamma.
    """
    x = np.asarray(x, dtype=np.float64)
    sq = np.maximum((x * x).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2 * x @ x.T, 0.0)
    u = np.asarray(u, dtype=np.float64)
    w = 1.0 / (u[:, None] + u[None, :] + 1e-10)
    return [np.exp(-g * sq / 2.0) * w for g in gammas]


def kernel_kmeans(kernel: np.ndarray, k: int, rng: np.random.Generator, max_iter: int = 100) -> np.ndarray:
    """Kernel k-means as in CSAL-3D's ``multiple_kernel_kmeans`` (on the summed kernel), vectorised.

    Random initial assignment; each iteration assigns every point to the cluster minimising
    ``K_ii - 2 mean_j K_ij + mean_jl K_jl``; an emptied cluster takes a random point; stops when stable.

    Args:
        kernel: ``[N, N]`` combined kernel.
        k: clusters (clamped to N).
        rng: random generator (the initial assignment and re-seeding of empty clusters).

    Returns:
        ``int [N]`` labels in ``0..k-1``.
    """
    n = len(kernel)
    k = max(1, min(int(k), n))
    labels = rng.integers(0, k, n)
    diag = np.diag(kernel)
    for _ in range(max_iter):
        onehot = np.zeros((n, k))
        onehot[np.arange(n), labels] = 1.0
        sizes = onehot.sum(0)
        safe = np.where(sizes > 0, sizes, 1.0)
        cross = kernel @ onehot / safe  # [N, k]: mean kernel to each cluster's members
        within = np.einsum("ik,ij,jk->k", onehot, kernel, onehot) / safe**2
        dist = diag[:, None] - 2 * cross + within[None, :]
        dist[:, sizes == 0] = np.inf
        new = dist.argmin(1)
        for j in range(k):
            if not np.any(new == j):
                new[rng.integers(n)] = j
        if np.array_equal(new, labels):
            break
        labels = new
    return labels.astype(np.int64)


def typicality_cosine(x: np.ndarray) -> np.ndarray:
    """CSAL-3D's typicality ``1 / (mean cosine distance to the cluster's members (self included) + 1e-10)``.

    Args:
        x: ``[n, F]`` features of one cluster's members.

    Returns:
        ``[n]`` typicality (higher = more typical).
    """
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    xn = x / np.where(norms > 0, norms, 1.0)
    dist = np.clip(1.0 - xn @ xn.T, 0.0, 2.0)
    return 1.0 / (dist.mean(axis=1) + 1e-10)


# -- SUGFW ----------------------------------------------------------------------------------------------

#: the authors' choices (``UC-SAM/augmentation``): gamma, flip axis, rotation (deg), posterize bits, and the
#: PIL enhancement factors of contrast, sharpness, brightness
AUG_CHOICES = {
    "gamma": (0.1, 0.5, 1.5, 1.9),
    "flip": (0, 1),
    "rotate": (90, 180, 270),
    "posterize": (4, 5, 6, 7, 8, 9),
    "contrast": (0.1, 0.5, 1.5, 1.9),
    "sharpness": (0.1, 0.5, 1.5, 1.9),
    "brightness": (0.1, 0.5, 1.5, 1.9),
}


def _enhance(img01: np.ndarray, kind: str, factor: float) -> np.ndarray:
    pil = Image.fromarray((np.clip(img01, 0, 1) * 255).astype(np.uint8))
    return np.asarray(getattr(ImageEnhance, kind)(pil).enhance(factor), dtype=np.float64) / 255.0


def augment_slice(img01: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """One SUGFW augmentation of a square slice in [0, 1], in the authors' order.

    Args:
        img01: ``[S, S]`` image scaled to [0, 1].
        rng: random generator.

    Returns:
        ``(augmented [S, S] in [0, 1], params)`` with the drawn ``gamma, flip, rotate, posterize, contrast,
        sharpness, brightness``; only ``flip`` and ``rotate`` move pixels (see :func:`invert_geometry`).
    """
    p = {k: v[int(rng.integers(len(v)))] for k, v in AUG_CHOICES.items()}
    x = np.power(np.clip(np.asarray(img01, dtype=np.float64), 0, 1), p["gamma"])
    x = np.flip(x, axis=p["flip"])
    x = np.rot90(x, p["rotate"] // 90)  # exact quarter turns (the authors' ndimage.rotate at 90 deg multiples)
    levels = 2 ** p["posterize"]
    x = np.floor(x * levels) / levels
    x = _enhance(x, "Contrast", p["contrast"])
    x = _enhance(x, "Sharpness", p["sharpness"])
    x = _enhance(x, "Brightness", p["brightness"])
    return np.ascontiguousarray(x), p


def invert_geometry(mask: np.ndarray, params: dict) -> np.ndarray:
    """Map a mask predicted on an augmented slice back onto the original: turn back, then flip back."""
    return np.ascontiguousarray(np.flip(np.rot90(mask, -(params["rotate"] // 90)), axis=params["flip"]))


def sam_uncertainty(mean_mask: np.ndarray) -> np.ndarray:
    """SUGFW's pixel uncertainty ``U = M(1 - M) + 0.5`` of the mean union mask ``M`` over the K augmentations.

    This is the authors' code (``get_uncertainty.py``); the paper prints ``0.5 - M(1 - M)``, which would rank
    the pixels the other way. U lies in [0.5, 0.75]: 0.5 where all copies agree, 0.75 where half disagree.
    """
    m = np.asarray(mean_mask, dtype=np.float64)
    return m * (1.0 - m) + 0.5


def pgdr_pool(feature: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, float]:
    """PGDR's uncertainty-weighted pooling.

    Args:
        feature: ``[F, h, w]`` SAM image-encoder features (or ``[S, F, h, w]`` for S slices of a volume).
        weights: ``[h, w]`` (or ``[S, h, w]``) the uncertainty pooled to the feature grid; 0 excludes a cell.

    Returns:
        ``(pooled [F], weight sum)``: ``sum w * f / sum w`` over all cells (and slices).
    """
    f = np.asarray(feature, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if f.ndim == 3:
        f, w = f[None], w[None]
    total = float(w.sum())
    if total <= 0:
        raise ValueError("pgdr_pool: the weights sum to zero")
    return np.einsum("sfhw,shw->f", f, w) / total, total
