"""Voxel-wise uncertainty maps from class probabilities, MC-dropout and test-time-augmentation samples.

Every map follows one sign convention: **higher means more uncertain**, so a top-k strategy always
takes the largest case scores. Shapes:

- probabilities ``probs``: ``float32 [K, D, H, W]``, sums to 1 over ``K`` (classes incl. background);
- MC-dropout samples ``mc``: ``[T, K, D, H, W]`` (``T`` stochastic forward passes);
- flip TTA predictions ``tta``: ``[A, K, D, H, W]`` (``A`` augmentations, already mapped back);
- a voxel map: ``float32 [D, H, W]``.

Entropies are in nats (natural logarithm).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "EPS",
    "bald",
    "class_weighted_entropy",
    "entropy",
    "least_confidence",
    "margin",
    "mc_variance",
    "predictive_entropy",
    "tta_variance",
]

#: floor applied inside logarithms
EPS = 1e-12


def _check_probs(probs: np.ndarray, ndim: int, name: str) -> np.ndarray:
    probs = np.asarray(probs)
    if probs.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d array, got shape {probs.shape}")
    if probs.shape[-4] < 2:
        raise ValueError(f"{name}: need at least 2 classes on the class axis, got shape {probs.shape}")
    return probs.astype(np.float32, copy=False)


def least_confidence(probs: np.ndarray) -> np.ndarray:
    """Classic least confidence ``1 - max_k p_k``: the least-confidence score of "From Prediction to Prompt".

    The paper writes the score as ``|1 - ŷ|`` averaged over voxels and classes. Read literally, with ``ŷ`` every
    class's probability, it is ``1 - 1/K`` for every voxel of any softmax output: the same number for every case,
    so a top-k over it selects at random. The faithful reading is ``ŷ`` = the winning (arg-max) class's
    probability, which is this map; reduced over the volume with ``mean`` (the default of
    :func:`raylearn.scoring.reduce.reduce_map`) it is the paper's case score.

    Args:
        probs: ``[K, D, H, W]`` class probabilities.

    Returns:
        ``float32 [D, H, W]`` in ``[0, 1 - 1/K]``.
    """
    probs = _check_probs(probs, 4, "least_confidence")
    return (1.0 - probs.max(axis=0)).astype(np.float32)


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy ``-sum_k p_k log p_k`` (nats).

    Args:
        probs: ``[K, D, H, W]``.

    Returns:
        ``float32 [D, H, W]`` in ``[0, log K]``.
    """
    probs = _check_probs(probs, 4, "entropy")
    return (-(probs * np.log(np.clip(probs, EPS, 1.0))).sum(axis=0)).astype(np.float32)


def class_weighted_entropy(probs: np.ndarray) -> np.ndarray:
    """Predictive entropy and its class-weighted copies: the score maps of ClaSP PE.

    Channel 0 is the predictive entropy ``H = -sum_k p_k log p_k``; channel ``c >= 1`` is ``H * p_c``, the
    entropy weighted by the probability of foreground class ``c``. It mirrors nnActive's
    ``Probs.class_pred_entropy`` (MIC-DKFZ/nnActive ``nnactive/strategies/uncertainties.py`` lines 109-135),
    which returns ``[H * p_0, ..., H * p_{K-1}, H]``; nnActive never reads the background channel, so here the
    unweighted ``H`` takes its place at index 0.

    Args:
        probs: ``[K, D, H, W]`` class probabilities.

    Returns:
        ``float32 [K, D, H, W]``.
    """
    probs = _check_probs(probs, 4, "class_weighted_entropy")
    h = entropy(probs)
    out = probs * h[None]
    out[0] = h
    return out.astype(np.float32, copy=False)


def margin(probs: np.ndarray) -> np.ndarray:
    """Margin uncertainty ``1 - (p_(1) - p_(2))`` (one minus the gap between the two largest probabilities).

    Args:
        probs: ``[K, D, H, W]``.

    Returns:
        ``float32 [D, H, W]`` in ``[0, 1]``; 1 where the top two classes tie.
    """
    probs = _check_probs(probs, 4, "margin")
    top2 = np.partition(probs, probs.shape[0] - 2, axis=0)[-2:]
    return (1.0 - (top2[1] - top2[0])).astype(np.float32)


def predictive_entropy(mc: np.ndarray) -> np.ndarray:
    """Entropy of the mean MC-dropout prediction, ``H[E_t p_t]``.

    Args:
        mc: ``[T, K, D, H, W]``.

    Returns:
        ``float32 [D, H, W]``.
    """
    mc = _check_probs(mc, 5, "predictive_entropy")
    return entropy(mc.mean(axis=0))


def bald(mc: np.ndarray) -> np.ndarray:
    """BALD mutual information ``H[E_t p_t] - E_t H[p_t]`` (epistemic part of the predictive entropy).

    Args:
        mc: ``[T, K, D, H, W]``.

    Returns:
        ``float32 [D, H, W]``, non-negative (clipped at 0 against rounding).
    """
    mc = _check_probs(mc, 5, "bald")
    mean_h = (-(mc * np.log(np.clip(mc, EPS, 1.0))).sum(axis=1)).mean(axis=0)
    return np.maximum(entropy(mc.mean(axis=0)) - mean_h, 0.0).astype(np.float32)


def mc_variance(mc: np.ndarray) -> np.ndarray:
    """Variance of the probabilities across samples, averaged over classes.

    Args:
        mc: ``[T, K, D, H, W]`` (MC-dropout or any stack of predictions).

    Returns:
        ``float32 [D, H, W]``.
    """
    mc = _check_probs(mc, 5, "mc_variance")
    return mc.var(axis=0).mean(axis=0).astype(np.float32)


def tta_variance(tta: np.ndarray) -> np.ndarray:
    """Variance across flip test-time augmentations, averaged over classes.

    Args:
        tta: ``[A, K, D, H, W]`` predictions mapped back to the original orientation.

    Returns:
        ``float32 [D, H, W]``.
    """
    tta = _check_probs(tta, 5, "tta_variance")
    return tta.var(axis=0).mean(axis=0).astype(np.float32)
