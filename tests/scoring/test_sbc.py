"""SBC-AL scores against hand-computed small cases (raylearn.scoring.sbc)."""

from __future__ import annotations

import numpy as np
import pytest

from raylearn.scoring import sbc


def cube(shape=(12, 12, 12), lo=(3, 3, 3), size=4, value=1) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    out[lo[0]:lo[0] + size, lo[1]:lo[1] + size, lo[2]:lo[2] + size] = value
    return out


def test_signed_distance_map_by_hand():
    mask = np.zeros((1, 1, 5), bool)
    mask[0, 0, 2] = True
    # outside: distances 2, 1, -, 1, 2 -> / 2; inside: distance 1 to the background -> -1
    np.testing.assert_allclose(sbc.signed_distance_map(mask)[0, 0], [1.0, 0.5, -1.0, 0.5, 1.0])
    m = sbc.signed_distance_map(cube())
    assert m.dtype == np.float32 and m.min() == -1.0 and m.max() == 1.0
    assert m[11, 11, 11] == 1.0 and m[0, 0, 0] == pytest.approx(np.sqrt(27) / np.sqrt(75))
    assert (m[cube() == 1] < 0).all() and (m[cube() == 0] > 0).all()
    np.testing.assert_array_equal(sbc.signed_distance_map(np.zeros((3, 3, 3))), 1.0)
    np.testing.assert_array_equal(sbc.signed_distance_map(np.ones((3, 3, 3))), -1.0)
    with pytest.raises(ValueError, match="D, H, W"):
        sbc.signed_distance_map(np.zeros((3, 3)))


def test_cosine_similarity():
    a = np.array([1.0, 2.0, -3.0])
    assert sbc.cosine_similarity(a, a) == pytest.approx(1.0)
    assert sbc.cosine_similarity(a, 5 * a) == pytest.approx(1.0)
    assert sbc.cosine_similarity(a, -a) == pytest.approx(-1.0)
    assert sbc.cosine_similarity([1, 0], [0, 1]) == 0.0
    assert sbc.cosine_similarity([0, 0], [0, 0]) == 1.0 and sbc.cosine_similarity([0, 0], [1, 0]) == 0.0
    assert sbc.cosine_similarity([1, 1], [1, 0]) == pytest.approx(1 / np.sqrt(2))


def test_q_cos_is_a_cosine_distance():
    labels = cube(value=1) + cube(lo=(8, 0, 0), size=3, value=2)
    own = np.stack([sbc.signed_distance_map(labels == c) for c in (1, 2)])
    assert sbc.q_cos(labels, own) == pytest.approx(0.0, abs=1e-6)  # identical maps: cosine 1
    assert sbc.q_cos(labels, -own) == pytest.approx(2.0, abs=1e-6)  # opposite maps: cosine -1
    # one class right, the other class's map shifted: strictly between
    shifted = own.copy()
    shifted[1] = sbc.signed_distance_map(np.roll(labels == 2, 4, axis=1))
    assert 0.0 < sbc.q_cos(labels, shifted) < 1.0
    with pytest.raises(ValueError, match="K-1"):
        sbc.q_cos(labels, own[:, :5])


def test_q_dice_by_hand():
    a = cube()
    assert sbc.q_dice(a, a, 2) == 0.0
    assert sbc.q_dice(a, np.roll(a, 4, axis=0), 2) == 1.0  # disjoint
    b = np.roll(a, 2, axis=0)  # half of the 64 voxels overlap: Dice 32 * 2 / 128 = 0.5
    assert sbc.q_dice(a, b, 2) == pytest.approx(0.5)
    # class 2 empty in both maps agrees (0), class 1 half: mean 0.25
    assert sbc.q_dice(a, b, 3) == pytest.approx(0.25)


def test_boundary_hausdorff_of_shifted_cubes():
    a = cube()
    assert sbc.boundary_hausdorff(a, a, 2) == 0.0
    assert sbc.boundary_hausdorff(a, np.roll(a, 3, axis=2), 2) == pytest.approx(3.0)
    assert sbc.boundary_hausdorff(a, np.roll(np.roll(a, 3, axis=0), 4, axis=1), 2) == pytest.approx(5.0)
    # present in one map only: the grid's diagonal
    assert sbc.boundary_hausdorff(a, np.zeros_like(a), 2) == pytest.approx(np.sqrt(3 * 12**2))
    assert sbc.boundary_hausdorff(np.zeros_like(a), np.zeros_like(a), 2) == 0.0


def test_case_scores_and_structure_consistency():
    labels = cube()
    coarse = np.stack([labels == 0, labels == 1]).astype(np.float32)
    own = sbc.signed_distance_map(labels)[None]
    np.testing.assert_allclose(sbc.sbc_case_scores(coarse, own, coarse), [0.0, 0.0, 0.0], atol=1e-6)
    refined = np.stack([np.roll(labels, 2, 0) == 0, np.roll(labels, 2, 0) == 1]).astype(np.float32)
    qc, qd, hd = sbc.sbc_case_scores(coarse, own, refined)
    assert (qc, qd, hd) == (pytest.approx(0.0, abs=1e-6), pytest.approx(0.5), pytest.approx(2.0))
    assert sbc.structure_consistency(0.5, 0.25) == pytest.approx(0.6 * 0.5 + 0.4 * 0.25)


def test_consistency_score_orders_the_pool():
    comp = np.array([[0.0, 0.0, 0.0],    # fully consistent
                     [0.5, 0.5, 2.0],    # SCS 0.5, BCS 0.25
                     [0.1, 0.1, 8.0],    # SCS 0.1, BCS 1.0
                     [1.0, 1.0, 4.0]])   # SCS 1.0, BCS 0.5
    cs = sbc.consistency_score(comp)
    np.testing.assert_allclose(cs, [0.0, 0.8 * 0.5 + 0.2 * 0.25, 0.8 * 0.1 + 0.2, 0.8 + 0.2 * 0.5])
    assert np.argsort(-cs).tolist() == [3, 1, 2, 0]
    # boundary only: ordered by the Hausdorff distance
    assert np.argsort(-sbc.consistency_score(comp, w_structure=0, w_boundary=1)).tolist() == [2, 3, 1, 0]
    np.testing.assert_array_equal(sbc.normalise_across_pool([3.0, 3.0]), [0.0, 0.0])
    with pytest.raises(ValueError, match="M, 3"):
        sbc.consistency_score(comp[:, :2])
