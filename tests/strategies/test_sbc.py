"""The sbc strategy: known rankings from hand-made SBC components, weights, and parameter errors."""

from __future__ import annotations

import numpy as np
import pytest

from raylearn.strategies import PoolView, build_strategy


def pool(components, labeled=()) -> PoolView:
    comp = np.asarray(components, dtype=np.float32)
    ids = np.array([f"c{i}" for i in range(len(comp))])
    mask = np.isin(ids, list(labeled))
    return PoolView(ids, mask, {"sbc_consistency": comp})


COMP = [[0.0, 0.0, 0.0],   # c0: consistent                      CS 0
        [0.5, 0.5, 2.0],   # c1: SCS 0.5, BCS 0.25                CS 0.45
        [0.1, 0.1, 8.0],   # c2: SCS 0.1, BCS 1                   CS 0.28
        [1.0, 1.0, 4.0],   # c3: SCS 1.0, BCS 0.5                 CS 0.9
        [0.2, 0.9, 0.0]]   # c4: SCS 0.6*0.2+0.4*0.9 = 0.48, BCS 0  CS 0.384


def test_top_k_by_consistency_score():
    s = build_strategy("sbc")
    assert s.select(pool(COMP), 3).tolist() == ["c3", "c1", "c4"]
    np.testing.assert_allclose(s.scores(pool(COMP)), [0.0, 0.45, 0.28, 0.9, 0.384])
    # a labelled case is neither picked nor part of the pool's HD normalisation: with c2 (HD 8) labelled the
    # largest HD is c3's 4, so c1's BCS becomes 0.5 (CS 0.5) and c3's 1 (CS 1.0)
    assert s.select(pool(COMP, labeled=["c2"]), 2).tolist() == ["c3", "c1"]
    np.testing.assert_allclose(s.scores(pool(COMP, labeled=["c2"])), [0.0, 0.5, 1.0, 0.384])


def test_weights_are_configurable():
    boundary = build_strategy("sbc", w_structure=0.0, w_boundary=1.0)
    assert boundary.select(pool(COMP), 2).tolist() == ["c2", "c3"]
    dice_only = build_strategy("sbc", w_cos=0.0, w_dice=1.0, w_boundary=0.0)
    assert dice_only.select(pool(COMP), 2).tolist() == ["c3", "c4"]


def test_ties_are_broken_by_the_seed_only():
    flat = [[0.5, 0.5, 1.0]] * 6
    picks = {tuple(build_strategy("sbc", random_state=s).select(pool(flat), 2)) for s in range(8)}
    assert len(picks) > 1
    assert build_strategy("sbc", random_state=3).select(pool(flat), 2).tolist() == \
        build_strategy("sbc", random_state=3).select(pool(flat), 2).tolist()


@pytest.mark.parametrize(("params", "match"), [
    ({"w_cos": -0.1}, "w_cos"), ({"w_boundary": "high"}, "w_boundary"), ({"w_dice": float("nan")}, "w_dice"),
    ({"w_structure": 0.0, "w_boundary": 0.0}, "both 0"), ({"w_cos": 0.0, "w_dice": 0.0}, "SCS would be 0"),
    ({"weight": 1.0}, "unknown parameter"),
])
def test_bad_params_name_the_key(params, match):
    with pytest.raises(ValueError, match=match):
        build_strategy("sbc", **params)


def test_feature_shape_is_checked():
    bad = PoolView(np.array(["a", "b"]), np.zeros(2, bool), {"sbc_consistency": np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        build_strategy("sbc").select(bad, 1)
