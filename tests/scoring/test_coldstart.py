"""Pure pieces of the cold-start papers against hand-computed small cases (milliseconds)."""

from __future__ import annotations

import numpy as np
import pytest

from raylearn.scoring import coldstart as cs


def test_view_alignment_restores_the_volume_exactly():
    x = np.arange(2 * 1 * 4 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4, 4)
    for view in range(3):
        for rot in range(4):
            y = cs.to_view(x, view, rot)
            assert y.shape == x.shape
            np.testing.assert_array_equal(cs.from_view(y, view, rot), x)
    # the views really move voxels: X<->Y swap and a quarter turn in (Y, Z)
    np.testing.assert_array_equal(cs.to_view(x, 1, 0)[0, 0, 1, 2, 3], x[0, 0, 2, 1, 3])
    np.testing.assert_array_equal(cs.to_view(x, 0, 1), np.rot90(x, 1, axes=(3, 4)))
    assert not np.array_equal(cs.to_view(x, 2, 0), x)


def test_variance_of_reconstructions():
    same = np.repeat(np.random.default_rng(0).random((1, 3, 3, 3)), 9, axis=0)
    np.testing.assert_array_equal(cs.reconstruction_variance(same), 0.0)
    two = np.stack([np.zeros((2, 2)), np.full((2, 2), 2.0)])
    np.testing.assert_allclose(cs.reconstruction_variance(two), 1.0)  # population variance of {0, 2}


def test_window_starts_adapt_to_the_volume():
    assert cs.window_starts(10, 16) == [0]
    assert cs.window_starts(16, 16) == [0]
    assert cs.window_starts(40, 16) == [0, 8, 16, 24]
    s = cs.window_starts(35, 16)
    assert s[0] == 0 and s[-1] == 19 and max(np.diff(s)) <= 8  # evenly spread, last window flush with the end


def test_urds_kernel_weights_by_hand():
    x = np.array([[0.0, 0.0], [1.0, 0.0]])
    u = np.array([0.0, 1.0])
    k01, k1, k10 = cs.urds_kernels(x, u)
    # |x0 - x1|^2 = 1; weight 1 / (u_i + u_j)
    assert k1[0, 1] == pytest.approx(np.exp(-0.5) / 1.0)
    assert k10[0, 1] == pytest.approx(np.exp(-5.0))
    assert k01[1, 1] == pytest.approx(1.0 / 2.0)
    assert k01[0, 0] == pytest.approx(1e10)
    np.testing.assert_allclose(cs.minmax(np.array([2.0, 4.0, 3.0])), [0.0, 1.0, 0.5])
    np.testing.assert_array_equal(cs.minmax(np.array([3.0, 3.0])), [0.0, 0.0])


def test_kernel_kmeans_separates_blocks():
    block = np.kron(np.eye(3), np.ones((4, 4))) + 0.01
    for seed in range(4):
        labels = cs.kernel_kmeans(block, 3, np.random.default_rng(seed))
        groups = [set(labels[i * 4:(i + 1) * 4]) for i in range(3)]
        assert all(len(g) == 1 for g in groups) and len(set.union(*groups)) == 3


def test_typicality_ordering():
    x = np.array([[1.0, 0.0], [1.0, 0.05], [1.0, -0.05], [0.0, 1.0], [0.0, -1.0]])
    t = cs.typicality_cosine(x)
    assert set(np.argsort(t)[:2]) == {3, 4}  # the members pointing elsewhere
    assert t[0] > t[1] and t[0] > t[2]  # the centre of the three is the most typical
    # hand value: cosine distances of [1, 0] to the members: 0 (itself), 1 - c twice, 1 twice
    c = 1.0 / np.sqrt(1 + 0.05**2)
    assert t[0] == pytest.approx(1.0 / ((0 + 2 * (1 - c) + 2) / 5 + 1e-10))


def test_sam_uncertainty_follows_the_authors_code():
    np.testing.assert_allclose(cs.sam_uncertainty(np.array([0.0, 0.5, 1.0, 0.2])), [0.5, 0.75, 0.5, 0.66])


def test_augmentation_inverse_restores_the_geometry():
    rng = np.random.default_rng(0)
    img = rng.random((8, 8))
    seen = set()
    for _ in range(40):
        aug, p = cs.augment_slice(img, rng)
        assert aug.shape == img.shape and 0.0 <= aug.min() and aug.max() <= 1.0
        seen.add((p["flip"], p["rotate"]))
        marker = np.zeros((8, 8), dtype=np.uint8)
        marker[1, 2] = 1
        moved = np.rot90(np.flip(marker, axis=p["flip"]), p["rotate"] // 90)  # the forward geometry
        np.testing.assert_array_equal(cs.invert_geometry(moved, p), marker)
    assert len(seen) == 6  # both flips x three rotations occur


def test_pgdr_pooling_by_hand():
    f = np.zeros((2, 2, 2))
    f[0] = [[1.0, 2.0], [3.0, 4.0]]
    f[1] = 1.0
    w = np.array([[1.0, 0.0], [0.0, 3.0]])
    pooled, total = cs.pgdr_pool(f, w)
    np.testing.assert_allclose(pooled, [(1 * 1 + 3 * 4) / 4, 1.0])
    assert total == 4.0
    # slices pool jointly
    pooled2, _ = cs.pgdr_pool(np.stack([f, f]), np.stack([w, np.zeros((2, 2))]))
    np.testing.assert_allclose(pooled2, pooled)
    with pytest.raises(ValueError, match="zero"):
        cs.pgdr_pool(f, np.zeros((2, 2)))
