"""Volume reductions, foreground volume and weighted pooling on hand-made maps."""

from __future__ import annotations

import numpy as np
import pytest

from raylearn.scoring import foreground_volume, reduce_map, topk_count, weighted_pool

VALUES = np.arange(8, dtype=np.float32).reshape(2, 2, 2)  # 0..7
LABELS = np.array([0, 0, 0, 0, 1, 1, 2, 2], dtype=np.uint8).reshape(2, 2, 2)


@pytest.mark.parametrize(
    ("reduction", "kw", "expected"),
    [
        ("mean", {}, 3.5),
        ("sum", {}, 28.0),
        ("topk_mean", {"topk": 0.25}, 6.5),  # ceil(0.25 * 8) = 2 largest: 6, 7
        ("topk_mean", {"topk": 3}, 6.0),  # 5, 6, 7
        ("topk_mean", {"topk": 1.0}, 7.0),
        ("foreground", {"labels": LABELS}, 5.5),  # 4..7
        ("class_mean", {"labels": LABELS}, (1.5 + 4.5 + 6.5) / 3),
    ],
)
def test_reductions(reduction, kw, expected):
    assert reduce_map(VALUES, reduction, **kw) == pytest.approx(expected)


def test_foreground_reduction_falls_back_to_mean_without_foreground():
    assert reduce_map(VALUES, "foreground", labels=np.zeros_like(LABELS)) == pytest.approx(3.5)


def test_class_mean_weighs_small_classes_equally():
    big_unsure = np.full((1, 1, 10), 0.5, np.float32)
    big_unsure[0, 0, 9] = 0.0
    labels = np.zeros((1, 1, 10), np.uint8)
    labels[0, 0, 9] = 1
    assert reduce_map(big_unsure, "class_mean", labels=labels) == pytest.approx(0.25)
    assert reduce_map(big_unsure, "mean") == pytest.approx(0.45)


def test_reduce_errors():
    with pytest.raises(ValueError, match="unknown reduction"):
        reduce_map(VALUES, "median")
    with pytest.raises(ValueError, match="needs the predicted label map"):
        reduce_map(VALUES, "foreground")
    with pytest.raises(ValueError, match="shape"):
        reduce_map(VALUES, "class_mean", labels=np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="integer"):
        topk_count(10, 2.5)
    with pytest.raises(ValueError, match="> 0"):
        topk_count(10, 0)
    assert topk_count(10, 50) == 10


def test_foreground_volume_voxels_and_ml():
    np.testing.assert_array_equal(foreground_volume(LABELS, 4), [2, 2, 0])
    np.testing.assert_allclose(foreground_volume(LABELS, 3, spacing=(10.0, 10.0, 5.0)), [1.0, 1.0])
    with pytest.raises(ValueError, match="outside"):
        foreground_volume(LABELS, 2)
    with pytest.raises(ValueError, match="spacing"):
        foreground_volume(LABELS, 3, spacing=(1.0, 1.0))


def test_weighted_pool():
    feats = np.zeros((2, 2, 2, 2), np.float32)
    feats[0] = np.arange(8).reshape(2, 2, 2)
    feats[1, 1, 1, 1] = 8.0
    np.testing.assert_allclose(weighted_pool(feats), [3.5, 1.0])
    w = np.zeros((2, 2, 2))
    w[1, 1, 1] = 1.0
    np.testing.assert_allclose(weighted_pool(feats, w), [7.0, 8.0])
    # weights on a finer (image) grid are resampled: constant weights give the plain mean
    np.testing.assert_allclose(weighted_pool(feats, np.full((8, 8, 8), 0.3)), [3.5, 1.0], rtol=1e-6)
    # weights concentrated in the upper half of the image -> pooled towards the upper half of the feature map
    wi = np.zeros((8, 8, 8))
    wi[4:] = 1.0
    assert weighted_pool(feats, wi)[0] > 3.5
    np.testing.assert_allclose(weighted_pool(feats, np.zeros((2, 2, 2))), [3.5, 1.0])
    with pytest.raises(ValueError, match="non-negative"):
        weighted_pool(feats, -w)
