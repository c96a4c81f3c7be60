"""Per-slice reductions of voxel maps (slice units) and per-slice features."""

from __future__ import annotations

import numpy as np
import pytest

from raylearn.scoring.features import compute_features
from raylearn.scoring.reduce import reduce_map, reduce_slices


def test_reduce_slices_by_hand():
    v = np.arange(8, dtype=np.float64).reshape(2, 2, 2)  # v[d, h, w] = 4d + 2h + w
    np.testing.assert_allclose(reduce_slices(v, 0), [1.5, 5.5])
    np.testing.assert_allclose(reduce_slices(v, 1), [2.5, 4.5])
    np.testing.assert_allclose(reduce_slices(v, 2), [3.0, 4.0])
    np.testing.assert_allclose(reduce_slices(v, 2, "sum"), [12.0, 16.0])
    np.testing.assert_allclose(reduce_slices(v, 0, "topk_mean", topk=1), [3.0, 7.0])
    labels = np.zeros((2, 2, 2), np.uint8)
    labels[0, 0, 0] = 1  # slice 0 along axis 0 has one foreground voxel (value 0); slice 1 none (falls back to mean)
    np.testing.assert_allclose(reduce_slices(v, 0, "foreground", labels=labels), [0.0, 5.5])
    np.testing.assert_allclose(reduce_slices(v, 0, "class_mean", labels=labels), [(0.0 + 2.0) / 2, 5.5])


@pytest.mark.parametrize("reduction", ["mean", "sum", "topk_mean", "foreground", "class_mean"])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_each_slice_is_its_own_volume_reduction(reduction, axis):
    rng = np.random.default_rng(axis)
    v = rng.random((3, 4, 5))
    labels = rng.integers(0, 3, (3, 4, 5))
    got = reduce_slices(v, axis, reduction, topk=0.3, labels=labels)
    want = [reduce_map(v.take(i, axis), reduction, topk=0.3, labels=labels.take(i, axis)) for i in range(v.shape[axis])]
    np.testing.assert_allclose(got, want)


def test_reduce_slices_errors():
    with pytest.raises(ValueError, match="axis must be 0, 1 or 2"):
        reduce_slices(np.zeros((2, 2, 2)), 3)
    with pytest.raises(ValueError, match=r"\[D, H, W\]"):
        reduce_slices(np.zeros((2, 2)), 0)


class _Fixed:
    """A segmenter predicting fixed probabilities ``[K, D, H, W]``."""

    num_classes = 2
    in_channels = 1

    def __init__(self, probs: np.ndarray) -> None:
        self.probs = probs

    def predict_proba(self, image):
        return self.probs


def test_compute_features_per_slice():
    p1 = np.zeros((2, 3, 4)) + 0.5
    p1[:, :, 0] = 1.0  # slice 0 along axis 2 is certain
    probs = np.stack([1 - p1, p1])
    feats = compute_features(_Fixed(probs), np.zeros((1, 2, 3, 4), np.float32), ["least_confidence", "entropy"],
                             slice_axis=2)
    assert feats["least_confidence"].shape == (4,) and feats["least_confidence"].dtype == np.float32
    np.testing.assert_allclose(feats["least_confidence"], [0.0, 0.5, 0.5, 0.5])
    np.testing.assert_allclose(feats["entropy"], [0.0, np.log(2), np.log(2), np.log(2)], rtol=1e-5, atol=1e-6)
    whole = compute_features(_Fixed(probs), np.zeros((1, 2, 3, 4), np.float32), ["least_confidence"])
    assert whole["least_confidence"].shape == () and abs(float(whole["least_confidence"]) - 0.375) < 1e-6
    with pytest.raises(ValueError, match="per case only"):
        compute_features(_Fixed(probs), np.zeros((1, 2, 3, 4), np.float32), ["embedding"], slice_axis=0)
