"""nnActive's foreground-aware random baselines at case level (``fg_random``, ``fg_random33``) and their
ground-truth feature."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raylearn.scoring.features import label_feature_records, model_features
from raylearn.strategies import PoolView, build_strategy
from raylearn.strategies.random import VARIANT_KINDS, fg_aware_random


def gt_view(vox, labeled=()):
    vox = np.asarray(vox, dtype=np.float32)
    mask = np.zeros(len(vox), bool)
    mask[list(labeled)] = True
    return PoolView(np.array([f"c{i}" for i in range(len(vox))]), mask, {"label_class_voxels": vox})


def test_every_case_with_every_class_is_plain_shuffled_order():
    """When every case has foreground, the kinds do not matter: the picks are the first cases of the shuffled
    visiting order (nnActive cycles one shuffled image list)."""
    vox = np.ones((10, 2))
    cands = np.arange(10)
    picks = fg_aware_random(vox, cands, 4, VARIANT_KINDS["nnactive66"], np.random.default_rng(5))
    assert picks.tolist() == np.random.default_rng(5).permutation(cands)[:4].tolist()


@pytest.mark.parametrize(("variant", "expected"), [("nnactive66", 5 / 6), ("nnactive33", 2 / 3)])
def test_foreground_share_matches_the_kind_mix(variant, expected):
    """Half the cases have foreground. A ``seg`` / ``border`` pick (2/3 for 66%, 1/3 for 33%) always takes a
    foreground case, an ``all`` pick one with probability 1/2: 2/3 + 1/3 * 1/2 = 5/6 and 1/3 + 2/3 * 1/2 = 2/3."""
    n = 2000
    vox = np.zeros((n, 2))
    vox[: n // 2, 0] = 10
    shares = []
    for seed in range(40):
        picks = fg_aware_random(vox, np.arange(n), 50, VARIANT_KINDS[variant], np.random.default_rng(seed))
        shares.append((picks < n // 2).mean())
    assert np.mean(shares) == pytest.approx(expected, abs=0.03)


def test_all_classes_covers_the_rarest_class_first():
    # class 2 is in cases 5, 6, 7 only; class 1 in cases 0-4
    vox = np.zeros((8, 2))
    vox[:5, 0] = 3
    vox[5:, 1] = 4
    for seed in range(5):
        picks = fg_aware_random(vox, np.arange(8), 4, VARIANT_KINDS["nnactive66"], np.random.default_rng(seed),
                                all_classes=True, num_per_label=2)
        assert set(picks[:2].tolist()) <= {5, 6, 7} and set(picks[2:].tolist()) <= {0, 1, 2, 3, 4}
    # a class with fewer cases than num_per_label gives what it has, then the next class
    picks = fg_aware_random(vox, np.array([0, 1, 2, 3, 5]), 4, VARIANT_KINDS["nnactive66"],
                            np.random.default_rng(0), all_classes=True, num_per_label=2)
    assert picks[0] == 5 and set(picks[1:3].tolist()) <= {0, 1, 2, 3}


def test_no_foreground_left_falls_back_to_any_case():
    vox = np.zeros((4, 2))
    picks = fg_aware_random(vox, np.arange(4), 4, VARIANT_KINDS["nnactive66"], np.random.default_rng(0))
    assert sorted(picks.tolist()) == [0, 1, 2, 3]


def test_strategies_and_variants():
    vox = np.zeros((12, 2))
    vox[:4] = 5
    pool = gt_view(vox, labeled=[0])
    assert build_strategy("fg_random").required_features() == {"label_class_voxels"}
    assert build_strategy("fg_random", variant="predicted_cover").required_features() == {"fg_volume"}
    assert build_strategy("fg_random33").get_params()["variant"] is None  # its default: nnactive33
    sel66 = build_strategy("fg_random", random_state=2).select(pool, 3)
    sel33 = build_strategy("fg_random", variant="nnactive33", random_state=2).select(pool, 3)
    np.testing.assert_array_equal(sel33, build_strategy("fg_random33", random_state=2).select(pool, 3))
    assert "c0" not in sel66.tolist() + sel33.tolist()
    with pytest.raises(ValueError, match="strategy 'fg_random': variant must be one of nnactive66"):
        build_strategy("fg_random", variant="nnactive50")
    with pytest.raises(ValueError, match="all_classes applies to the nnactive variants only"):
        build_strategy("fg_random", variant="predicted_cover", all_classes=True)
    with pytest.raises(ValueError, match="num_per_label must be an integer >= 1"):
        build_strategy("fg_random", num_per_label=0)


def test_label_feature_records_from_the_manifest():
    class Store:
        labels = {0: "background", 1: "a", 2: "b"}
        manifest = pd.DataFrame({"case_id": ["x", "y", "z"], "class_voxels": [[90, 7, 3], [100, 0, 0], None]})

    rec = label_feature_records(Store(), ["x", "y"], ["label_class_voxels"])
    np.testing.assert_array_equal(rec["x"]["label_class_voxels"], [7, 3])
    np.testing.assert_array_equal(rec["y"]["label_class_voxels"], [0, 0])
    assert label_feature_records(Store(), ["x"], ["entropy"]) == {}
    with pytest.raises(ValueError, match="case 'z' has no ground-truth label"):
        label_feature_records(Store(), ["z"], ["label_class_voxels"])
    # the shards never get ground-truth features
    assert model_features(["label_class_voxels", "entropy"]) == ["entropy"]
