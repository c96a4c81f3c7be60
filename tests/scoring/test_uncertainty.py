"""Voxel uncertainty maps on hand-made probabilities whose values and ranking are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raylearn.scoring import (
    bald,
    entropy,
    least_confidence,
    margin,
    mc_variance,
    predictive_entropy,
    tta_variance,
)


def vox(*ps):
    """Probabilities [K, 1, 1, n] from per-voxel class vectors."""
    return np.array(ps, dtype=np.float32).T.reshape(len(ps[0]), 1, 1, len(ps))


CONFIDENT = (0.98, 0.01, 0.01)
UNSURE = (0.5, 0.3, 0.2)
UNIFORM = (1 / 3, 1 / 3, 1 / 3)


def test_least_confidence_values():
    lc = least_confidence(vox(CONFIDENT, UNSURE, UNIFORM))
    assert lc.shape == (1, 1, 3) and lc.dtype == np.float32
    np.testing.assert_allclose(lc.ravel(), [0.02, 0.5, 2 / 3], rtol=1e-5)


def test_entropy_values_and_ranking():
    h = entropy(vox(CONFIDENT, UNSURE, UNIFORM)).ravel()
    assert h[2] == pytest.approx(math.log(3), rel=1e-5)
    assert h[0] < h[1] < h[2]
    assert entropy(vox((1.0, 0.0, 0.0))).item() == pytest.approx(0.0, abs=1e-6)


def test_margin_values():
    m = margin(vox(CONFIDENT, UNSURE, (0.45, 0.45, 0.1))).ravel()
    np.testing.assert_allclose(m, [1 - 0.97, 1 - 0.2, 1.0], rtol=1e-5)


@pytest.mark.parametrize("fn", [least_confidence, entropy, margin])
def test_map_rejects_bad_shapes(fn):
    with pytest.raises(ValueError, match="4-d"):
        fn(np.zeros((2, 3, 3), np.float32))
    with pytest.raises(ValueError, match="2 classes"):
        fn(np.ones((1, 2, 2, 2), np.float32))


def test_mc_scores_agreeing_vs_disagreeing_samples():
    a = vox((1.0, 0.0), (0.5, 0.5))
    b = vox((0.0, 1.0), (0.5, 0.5))
    mc = np.stack([a, b])  # [T=2, K=2, 1, 1, 2]
    # voxel 0: confident samples that disagree (epistemic); voxel 1: agreeing 50/50 samples (aleatoric)
    np.testing.assert_allclose(bald(mc).ravel(), [math.log(2), 0.0], atol=1e-5)
    np.testing.assert_allclose(predictive_entropy(mc).ravel(), [math.log(2), math.log(2)], rtol=1e-5)
    np.testing.assert_allclose(mc_variance(mc).ravel(), [0.25, 0.0], atol=1e-6)
    np.testing.assert_allclose(tta_variance(mc).ravel(), [0.25, 0.0], atol=1e-6)


def test_bald_is_zero_for_identical_samples():
    p = vox(UNSURE, CONFIDENT)
    assert np.allclose(bald(np.stack([p, p, p])), 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="5-d"):
        bald(p)
