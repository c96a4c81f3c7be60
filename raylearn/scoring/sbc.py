"""SBC-AL scores: structure and boundary consistency between a model's coarse segmentation, its SFP distance
maps and its ASR-refined segmentation (Structure and Boundary Consistency-based Active Learning, MICCAI 2024;
seed paper 003, which released no code). Pure numpy; no Ray, no torch.

Per case (computed on the pool shards by :func:`raylearn.scoring.features.compute_features`, feature
``sbc_consistency``):

- ``Q_cos``: cosine *distance* ``1 - cos(DT(coarse mask), SFP map)`` between the normalised signed distance map of
  the predicted (coarse) mask (:func:`signed_distance_map`) and the distance map the SFP head regressed, mean over
  the foreground classes. The paper prints ``Q_cos`` as the plain cosine similarity, which is 1 for a *consistent*
  prediction while its sibling ``Q_dice = 1 - Dice`` is 0 for one; summed into one uncertainty score that is
  queried top-K, the two would pull in opposite directions. We read the printed formula as a typo for the cosine
  distance, so that both terms (and the Hausdorff term) grow with inconsistency. :func:`cosine_similarity` itself
  is the textbook one (1 for identical maps).
- ``Q_dice = 1 - Dice(coarse, refined)``, mean over foreground classes (two empty masks agree: Dice 1).
- ``SCS = w_cos * Q_cos + w_dice * Q_dice`` (paper: 0.6, 0.4).
- ``HD``: symmetric Hausdorff distance between the coarse and refined masks (max of the surface distances of
  :func:`raylearn.metrics.surface_distances` in both directions), mean over foreground classes, in voxels.
  ``BCS`` is HD min-max normalised across the scored pool (:func:`normalise_across_pool`), so it needs the whole
  pool and is done by the strategy (:class:`raylearn.strategies.sbc.SBC`), not on a shard.
- ``CS = w_structure * SCS + w_boundary * BCS`` (paper: 0.8, 0.2); the top-K cases by CS are queried.

3D adaptation (the paper works on 2D slices/patches of ACDC and KiTS19):

- distance transforms, cosine, Dice and Hausdorff are taken over the whole 3D volume, one score per volume (the
  unit raylearn queries), instead of per 2D image;
- the Hausdorff distance is in voxels of the preprocessed grid (the pool's volumes are resampled to one spacing at
  ingest, and BCS is normalised across the pool, so the unit cancels);
- multi-class volumes average each term over the foreground classes (the paper's datasets are scored per class
  map the same way as far as it says).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "boundary_hausdorff",
    "consistency_score",
    "cosine_similarity",
    "normalise_across_pool",
    "q_cos",
    "q_dice",
    "sbc_case_scores",
    "signed_distance_map",
    "structure_consistency",
]


def signed_distance_map(mask: np.ndarray) -> np.ndarray:
    """Normalised signed Euclidean distance map of a binary mask (the SFP head's regression target).

    ``sdm = d_out / max(d_out) - d_in / max(d_in)``: ``d_out`` is each background voxel's distance to the nearest
    foreground voxel, ``d_in`` each foreground voxel's distance to the nearest background voxel (MONAI
    ``distance_transform_edt``, i.e. scipy on CPU). Values lie in ``[-1, 1]``: -1 at the structure's deepest interior,
    about 0 at its boundary, +1 at the voxel farthest from it. An empty mask is +1 everywhere (all outside), a full
    mask -1 everywhere. Each part is normalised by its own maximum, so small and large structures weigh alike and the
    map matches a ``tanh`` output.

    Args:
        mask: ``bool/int [D, H, W]`` (non-zero = foreground).

    Returns:
        ``float32 [D, H, W]``.
    """
    from monai.transforms.utils import distance_transform_edt

    fg = np.asarray(mask) != 0
    if fg.ndim != 3:
        raise ValueError(f"signed_distance_map: mask must be [D, H, W], got shape {fg.shape}")
    if not fg.any():
        return np.ones(fg.shape, np.float32)
    if fg.all():
        return -np.ones(fg.shape, np.float32)
    d_out = np.asarray(distance_transform_edt(fg[None] == 0)[0])  # background: distance to the structure
    d_in = np.asarray(distance_transform_edt(fg[None])[0])  # foreground: distance to the background
    return (d_out / d_out.max() - d_in / d_in.max()).astype(np.float32)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """``<a, b> / (|a| |b|)`` over all elements: 1 for identical (non-zero) maps, -1 for opposite ones.

    Two all-zero maps are identical (1.0); one all-zero map against a non-zero one is 0.0 (orthogonal).
    """
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"cosine_similarity: shapes differ, {a.shape} vs {b.shape}")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.clip(a @ b / (na * nb), -1.0, 1.0))


def q_cos(labels: np.ndarray, sfp: np.ndarray) -> float:
    """Structure term: mean over foreground classes of ``1 - cos(signed_distance_map(labels == c), sfp[c - 1])``.

    Args:
        labels: ``int [D, H, W]`` predicted (coarse) label map, classes ``0..K-1``.
        sfp: ``float [K-1, D, H, W]`` the SFP head's distance maps (same normalisation as
            :func:`signed_distance_map`).

    Returns:
        In ``[0, 2]``; 0 when the SFP maps are exactly the distance maps of the predicted mask.
    """
    sfp = np.asarray(sfp)
    labels = np.asarray(labels)
    if sfp.ndim != 4 or sfp.shape[1:] != labels.shape:
        raise ValueError(f"q_cos: sfp must be [K-1, D, H, W] with D, H, W = {labels.shape}, got {sfp.shape}")
    vals = [1.0 - cosine_similarity(signed_distance_map(labels == c + 1), sfp[c]) for c in range(sfp.shape[0])]
    return float(np.mean(vals))


def q_dice(coarse: np.ndarray, refined: np.ndarray, num_classes: int) -> float:
    """``1 - Dice(coarse == c, refined == c)`` averaged over foreground classes ``c = 1..K-1``; two empty masks
    count as agreeing (Dice 1). In ``[0, 1]``; 0 for identical label maps."""
    coarse, refined = np.asarray(coarse), np.asarray(refined)
    if coarse.shape != refined.shape:
        raise ValueError(f"q_dice: label maps differ in shape, {coarse.shape} vs {refined.shape}")
    vals = []
    for c in range(1, int(num_classes)):
        a, b = coarse == c, refined == c
        denom = int(a.sum()) + int(b.sum())
        vals.append(0.0 if denom == 0 else 1.0 - 2.0 * int((a & b).sum()) / denom)
    return float(np.mean(vals))


def structure_consistency(qcos: float, qdice: float, w_cos: float = 0.6, w_dice: float = 0.4) -> float:
    """``SCS = w_cos * Q_cos + w_dice * Q_dice`` (higher = less consistent = more informative)."""
    return float(w_cos * qcos + w_dice * qdice)


def boundary_hausdorff(coarse: np.ndarray, refined: np.ndarray, num_classes: int) -> float:
    """Symmetric Hausdorff distance (voxels) between the coarse and refined masks, mean over foreground classes.

    Surface distances from :func:`raylearn.metrics.surface_distances` (MONAI, boundary voxels), the maximum over
    both directions. A class empty in both maps contributes 0; empty in exactly one, the volume's diagonal (the
    largest distance the grid allows: the two predictions disagree on whether the structure exists at all).
    """
    from raylearn.metrics import surface_distances

    coarse, refined = np.asarray(coarse), np.asarray(refined)
    if coarse.shape != refined.shape or coarse.ndim != 3:
        raise ValueError(f"boundary_hausdorff: need two [D, H, W] label maps, got {coarse.shape} and {refined.shape}")
    diagonal = float(np.linalg.norm(coarse.shape))
    vals = []
    for c in range(1, int(num_classes)):
        a, b = coarse == c, refined == c
        if not a.any() and not b.any():
            vals.append(0.0)
        elif not a.any() or not b.any():
            vals.append(diagonal)
        else:
            d_ab, d_ba = surface_distances(a, b)
            vals.append(float(max(np.max(d_ab, initial=0.0), np.max(d_ba, initial=0.0))))
    return float(np.mean(vals))


def sbc_case_scores(coarse_probs: np.ndarray, sfp: np.ndarray, refined_probs: np.ndarray) -> np.ndarray:
    """The per-case SBC components from the three outputs of an SBC U-Net.

    Args:
        coarse_probs: ``float [K, D, H, W]`` the U-Net's softmax.
        sfp: ``float [K-1, D, H, W]`` the SFP head's distance maps.
        refined_probs: ``float [K, D, H, W]`` the ASR module's softmax.

    Returns:
        ``float32 [3]``: ``(Q_cos, Q_dice, HD)`` (see the module docstring); the pool-level BCS and CS are made
        from these by the strategy.
    """
    coarse_probs, refined_probs = np.asarray(coarse_probs), np.asarray(refined_probs)
    if coarse_probs.shape != refined_probs.shape or coarse_probs.ndim != 4:
        raise ValueError(f"sbc_case_scores: coarse and refined must both be [K, D, H, W], got {coarse_probs.shape} "
                         f"and {refined_probs.shape}")
    k = coarse_probs.shape[0]
    coarse, refined = coarse_probs.argmax(axis=0), refined_probs.argmax(axis=0)
    return np.array([q_cos(coarse, sfp), q_dice(coarse, refined, k), boundary_hausdorff(coarse, refined, k)],
                    dtype=np.float32)


def normalise_across_pool(values: np.ndarray) -> np.ndarray:
    """Min-max normalise ``[M]`` values to ``[0, 1]`` across the scored pool (all equal -> all 0)."""
    v = np.asarray(values, dtype=np.float64)
    lo, hi = float(v.min()), float(v.max())
    return np.zeros_like(v) if hi == lo else (v - lo) / (hi - lo)


def consistency_score(components: np.ndarray, w_cos: float = 0.6, w_dice: float = 0.4, w_structure: float = 0.8,
                      w_boundary: float = 0.2) -> np.ndarray:
    """``CS = w_structure * SCS + w_boundary * BCS`` for a pool of cases.

    Args:
        components: ``[M, 3]`` rows of ``(Q_cos, Q_dice, HD)`` (:func:`sbc_case_scores`) of the candidate cases.

    Returns:
        ``float64 [M]``, higher = more inconsistent = queried first.
    """
    comp = np.asarray(components, dtype=np.float64)
    if comp.ndim != 2 or comp.shape[1] != 3:
        raise ValueError(f"consistency_score: components must be [M, 3] (Q_cos, Q_dice, HD), got {comp.shape}")
    scs = w_cos * comp[:, 0] + w_dice * comp[:, 1]
    bcs = normalise_across_pool(comp[:, 2])
    return w_structure * scs + w_boundary * bcs
