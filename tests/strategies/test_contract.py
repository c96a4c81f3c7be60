"""One contract test run over every registered strategy, plus PoolView and registry errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from raylearn.scoring.features import FEATURES, LABEL_FEATURES
from raylearn.strategies import STRATEGIES, PoolView, build_strategy

#: strategies whose selection depends on the seed even when the features have no ties
RANDOMISED = {"random", "fg_random", "fg_random33", "power", "fps", "clasp_pe"}
KNOWN = set(FEATURES) | set(LABEL_FEATURES)


def synthetic_pool(n=40, n_labeled=8, seed=0) -> PoolView:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 5, size=(4, 6))
    emb = (centres[rng.integers(0, 4, n)] + rng.normal(0, 1, (n, 6))).astype(np.float16)
    feats = {name: rng.random(n).astype(np.float32) for name, spec in FEATURES.items() if spec.kind == "scalar"}
    feats["embedding"] = emb
    feats["weighted_embedding"] = (emb * 0.5 + rng.normal(0, 0.1, emb.shape)).astype(np.float16)
    fg = rng.integers(0, 50, size=(n, 2)).astype(np.float32)
    fg[rng.random(n) < 0.3, 1] = 0
    feats["fg_volume"] = fg
    feats["class_entropy"] = rng.random((n, 3)).astype(np.float32)
    feats["sbc_consistency"] = (rng.random((n, 3)) * [2.0, 1.0, 20.0]).astype(np.float32)  # Q_cos, Q_dice, HD
    gt = rng.integers(0, 50, size=(n, 2)).astype(np.float32)
    gt[rng.random(n) < 0.3] = 0
    feats["label_class_voxels"] = gt
    mask = np.zeros(n, bool)
    mask[rng.choice(n, n_labeled, replace=False)] = True
    # round 2 of 5 (scheduled strategies read it; the others ignore it)
    return PoolView(np.array([f"case_{i:03d}" for i in range(n)]), mask, feats, round_index=2, n_rounds=5)


def snapshot(pool: PoolView):
    return pool.ids.copy(), pool.labeled_mask.copy(), {k: v.copy() for k, v in pool.features.items()}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize(("n_labeled", "budget"), [(8, 5), (0, 3), (8, 32)])
def test_strategy_contract(name, n_labeled, budget):
    pool = synthetic_pool(n_labeled=n_labeled)
    before = snapshot(pool)
    strat = build_strategy(name, random_state=7)
    assert strat.required_features() <= KNOWN, "requires names an unknown feature"
    assert isinstance(type(strat).requires, frozenset) and type(strat).requires <= KNOWN
    assert strat.requires == strat.required_features()
    params_before = copy.deepcopy(strat.get_params())

    sel = strat.select(pool, budget)
    assert isinstance(sel, np.ndarray) and sel.shape == (budget,)
    assert len(set(sel.tolist())) == budget, "duplicates"
    labeled_ids = set(pool.ids[pool.labeled_mask].tolist())
    assert set(sel.tolist()) <= set(pool.ids.tolist()) - labeled_ids, "selected a labelled or unknown case"

    # deterministic for a seed, also for a fresh instance
    np.testing.assert_array_equal(sel, strat.select(pool, budget))
    np.testing.assert_array_equal(sel, build_strategy(name, random_state=7).select(pool, budget))

    # input and hyperparameters untouched
    ids, mask, feats = before
    np.testing.assert_array_equal(pool.ids, ids)
    np.testing.assert_array_equal(pool.labeled_mask, mask)
    assert set(pool.features) == set(feats)
    for k, v in feats.items():
        np.testing.assert_array_equal(pool.features[k], v)
    assert strat.get_params() == params_before


@pytest.mark.parametrize("name", sorted(RANDOMISED))
def test_randomised_strategies_depend_on_seed(name):
    pool = synthetic_pool()
    picks = {tuple(build_strategy(name, random_state=s).select(pool, 5)) for s in range(6)}
    assert len(picks) > 1


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_errors(name):
    pool = synthetic_pool()
    strat = build_strategy(name)
    with pytest.raises(ValueError, match="exceeds the 32 unlabelled"):
        strat.select(pool, 33)
    with pytest.raises(ValueError, match="positive integer"):
        strat.select(pool, 0)
    needed = sorted(strat.required_features())
    if needed:
        feats = {k: v for k, v in pool.features.items() if k != needed[0]}
        with pytest.raises(ValueError, match=f"lacks required feature.*{needed[0]}"):
            strat.select(PoolView(pool.ids, pool.labeled_mask, feats, round_index=2, n_rounds=5), 2)
        bad = dict(pool.features)
        arr = bad[needed[0]].astype(np.float32).copy()
        arr[np.flatnonzero(~pool.labeled_mask)[0]] = np.nan
        bad[needed[0]] = arr
        with pytest.raises(ValueError, match="non-finite"):
            strat.select(PoolView(pool.ids, pool.labeled_mask, bad, round_index=2, n_rounds=5), 2)


def test_build_strategy_errors():
    with pytest.raises(ValueError, match=r"unknown strategy 'nope'; known: .*kcenter.*typiclust"):
        build_strategy("nope")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['k'\]; allowed: knn, max_clusters"):
        build_strategy("typiclust", k=3)
    with pytest.raises(ValueError, match=r"unknown feature\(s\) \['entropi'\]; known features: bald"):
        build_strategy("cluster_topk", score="entropi")
    s = build_strategy("typiclust", knn=5, random_state=1)
    assert s.get_params()["knn"] == 5 and "knn=5" in repr(s)


def test_poolview_validation():
    ids = np.array(["a", "b", "c"])
    mask = np.array([True, False, False])
    with pytest.raises(ValueError, match="'entropy' has shape \\(2,\\)"):
        PoolView(ids, mask, {"entropy": np.zeros(2)})
    with pytest.raises(ValueError, match="duplicate"):
        PoolView(np.array(["a", "a", "c"]), mask)
    with pytest.raises(ValueError, match="labeled_mask"):
        PoolView(ids, np.array([1, 0, 0]))
    view = PoolView(ids, mask, {"entropy": np.zeros(3)})
    assert PoolView(ids.astype(object), mask).ids.dtype.kind == "U"
    with pytest.raises(TypeError):
        view.features["x"] = np.zeros(3)  # read-only mapping
    with pytest.raises(AttributeError):
        view.ids = ids  # frozen


def test_poolview_from_records():
    recs = {
        "b": {"entropy": np.float32(0.5), "embedding": np.ones(3, np.float16)},
        "c": {"entropy": np.float32(0.7), "embedding": np.zeros(3, np.float16)},
    }
    view = PoolView.from_records(["a", "b", "c"], {"a"}, recs)
    assert view.labeled_mask.tolist() == [True, False, False]
    assert view.features["entropy"].shape == (3,) and view.features["embedding"].shape == (3, 3)
    assert np.isnan(view.features["embedding"][0]).all()  # labelled, not scored
    assert build_strategy("entropy").select(view, 1).tolist() == ["c"]
    with pytest.raises(ValueError, match="unlabelled case 'c' has no features"):
        PoolView.from_records(["a", "b", "c"], {"a"}, {"b": recs["b"]})
    with pytest.raises(ValueError, match="case 'c' has features"):
        PoolView.from_records(["b", "c"], set(), {"b": recs["b"], "c": {"entropy": np.float32(1)}})


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_labelled_rows_may_be_unscored_unless_the_strategy_uses_them(name):
    pool = synthetic_pool()
    feats = {}
    for k, v in pool.features.items():
        v = v.astype(np.float32)
        v[pool.labeled_mask] = np.nan
        feats[k] = v
    nan_pool = PoolView(pool.ids, pool.labeled_mask, feats, round_index=2, n_rounds=5)
    strat = build_strategy(name, random_state=3)
    if strat.needs_labeled_features():
        with pytest.raises(ValueError, match="missing \\(non-finite\\) for labelled cases"):
            strat.select(nan_pool, 4)
    else:
        np.testing.assert_array_equal(strat.select(nan_pool, 4), strat.select(pool, 4))


def test_poolview_round_context():
    ids, mask = np.array(["a", "b"]), np.zeros(2, bool)
    assert PoolView(ids, mask).round_index is None and PoolView(ids, mask).n_rounds is None
    v = PoolView.from_records(["a", "b"], set(), {"a": {"entropy": np.float32(1)}, "b": {"entropy": np.float32(2)}},
                              round_index=3, n_rounds=4)
    assert (v.round_index, v.n_rounds) == (3, 4)
    with pytest.raises(ValueError, match="round_index 5 exceeds n_rounds 4"):
        PoolView(ids, mask, round_index=5, n_rounds=4)
    with pytest.raises(ValueError, match="n_rounds must be a non-negative integer"):
        PoolView(ids, mask, n_rounds=-1)
