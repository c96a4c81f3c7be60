"""ClaSP PE: the noise schedule, power noising, the class-stratified budget split and selection, against small
hand-computed cases (nnActive's ``entropy_balanced.py`` / ``utils.py`` are the reference; see the module)."""

from __future__ import annotations

import numpy as np
import pytest

from raylearn.scoring.features import compute_features
from raylearn.scoring.uncertainty import class_weighted_entropy
from raylearn.strategies import PoolView, build_strategy
from raylearn.strategies.clasp import (
    beta_for_round,
    exponential_schedule,
    power_noising,
    sigmoid_schedule,
    stratified_select,
    stratum_quotas,
)


def view(scores, labeled=(), round_index=1, n_rounds=4):
    scores = np.asarray(scores, dtype=np.float32)
    mask = np.zeros(len(scores), bool)
    mask[list(labeled)] = True
    ids = np.array([f"c{i}" for i in range(len(scores))])
    return PoolView(ids, mask, {"class_entropy": scores}, round_index=round_index, n_rounds=n_rounds)


# ------------------------------------------------------------------------------------------- schedule
def test_exponential_schedule_by_hand():
    # 1 * (100 / 1) ** [0, 1/4, 1/2, 3/4, 1] = [1, sqrt(10), 10, 10 sqrt(10), 100]
    np.testing.assert_allclose(exponential_schedule(5, 1, 100), [1, 10**0.5, 10, 10**1.5, 100])
    np.testing.assert_allclose(exponential_schedule(3, 2, 8), [2, 4, 8])
    assert exponential_schedule(1, 1, 100).tolist() == [1.0]


def test_sigmoid_schedule_by_hand():
    # symmetric ramp: the middle of an odd-length schedule is the midpoint of the two ends
    np.testing.assert_allclose(sigmoid_schedule(3, 1, 100, temperature=2), [1, 50.5, 100])
    sharp, smooth = sigmoid_schedule(7, 1, 100, 0.5), sigmoid_schedule(7, 1, 100, 2)
    assert sharp[1] < smooth[1] and sharp[5] > smooth[5]  # sharper = flatter ends, steeper middle
    assert np.all(np.diff(smooth) > 0)


def test_beta_follows_nnactive_loop_numbering():
    """R = 4 query rounds after the cold start = 5 trainings (nnActive's query_steps); query round r uses schedule
    step r - 1, so the rounds get 1, sqrt(10), 10, 10 sqrt(10) and beta = 100 is never used."""
    betas = [beta_for_round("exponential", r, 5) for r in (1, 2, 3, 4)]
    np.testing.assert_allclose(betas, [1, 10**0.5, 10, 10**1.5])
    with pytest.raises(ValueError, match="outside 1..4"):
        beta_for_round("exponential", 5, 5)
    assert beta_for_round("constant", 3, 5, start=2.5) == 2.5
    assert beta_for_round("none", 3, 5) is None
    assert beta_for_round("sigmoid", 2, 3, temperature=2) == pytest.approx(50.5)


def test_strategy_beta_comes_from_the_view_or_query_steps():
    s = build_strategy("clasp_pe")
    assert s.beta(view(np.ones((3, 3)), round_index=3, n_rounds=4)) == pytest.approx(10.0)
    assert s.beta(view(np.ones((3, 3)), round_index=1, n_rounds=4)) == pytest.approx(1.0)
    # an explicit schedule length overrides the view's
    assert build_strategy("clasp_pe", query_steps=3).beta(view(np.ones((3, 3)), round_index=2)) == pytest.approx(10)
    no_round = PoolView(np.array(["a", "b"]), np.zeros(2, bool), {"class_entropy": np.ones((2, 3), np.float32)})
    with pytest.raises(ValueError, match="needs the round"):
        s.select(no_round, 1)
    # schedules without rounds work without them
    assert build_strategy("clasp_pe", schedule="none").select(no_round, 1).shape == (1,)


# ------------------------------------------------------------------------------------------- noise
def test_power_noising_is_log_plus_gumbel_of_scale_one_over_beta():
    s = np.array([0.5, 1.0, 2.0])
    out = power_noising(s, 4.0, np.random.default_rng(3))
    np.testing.assert_allclose(out, np.log(s) + np.random.default_rng(3).gumbel(0.0, 0.25, size=3))
    np.testing.assert_allclose(power_noising(s, None, np.random.default_rng(0)), np.log(s))
    assert power_noising(np.array([0.0]), 1.0, np.random.default_rng(0))[0] == -np.inf
    with pytest.raises(ValueError, match="non-negative"):
        power_noising(np.array([-1.0]), 1.0, np.random.default_rng(0))


def test_power_noising_top1_samples_proportional_to_score_power_beta():
    """Gumbel-max: argmax(log s + G/beta) picks i with probability s_i**beta / sum_j s_j**beta.
    Scores (1, 3): beta 1 -> 3/4; beta 2 -> 9/10."""
    rng = np.random.default_rng(0)
    s = np.tile([1.0, 3.0], (40000, 1))  # 40000 independent draws of the pair
    for beta, expected in ((1.0, 0.75), (2.0, 0.9)):
        wins = np.mean(np.argmax(power_noising(s, beta, rng), axis=1) == 1)
        assert wins == pytest.approx(expected, abs=0.01)


# ------------------------------------------------------------------------------------------- stratification
def test_stratum_quotas_by_hand():
    rng = np.random.default_rng(0)
    # budget 5, 2 classes: int(5 * 0.66) = 3 stratified -> 1 each + 1 to a random class; 2 unstratified
    seen = {tuple(stratum_quotas(5, 2, 0.66, np.random.default_rng(s))) for s in range(20)}
    assert seen == {(2, 2, 1), (2, 1, 2)}
    # budget 10, 3 classes: int(6.6) = 6 -> 2 each; 4 unstratified
    assert stratum_quotas(10, 3, 0.66, rng).tolist() == [4, 2, 2, 2]
    # budget 1: int(0.66) = 0 -> the single case is unstratified
    assert stratum_quotas(1, 2, 0.66, rng).tolist() == [1, 0, 0]
    # budget 100: int(66.00000000000001) = 66 -> 22 each; 34 unstratified
    assert stratum_quotas(100, 3, 0.66, rng).tolist() == [34, 22, 22, 22]
    assert stratum_quotas(4, 2, 1.0, rng).tolist() == [0, 2, 2]
    assert stratum_quotas(4, 2, 0.0, rng).tolist() == [4, 0, 0]


def test_stratified_select_takes_turns_and_never_repeats_a_case():
    # rows: candidates; columns: strata (0 = unstratified, 1, 2 = classes)
    keys = np.array([
        [0.9, 0.9, 0.8],  # row 0: best for everyone
        [0.1, 0.5, 0.7],  # row 1: second for class 2
        [0.5, 0.2, 0.1],  # row 2: second for the unstratified stratum
        [0.3, 0.6, 0.0],  # row 3: second for class 1
        [0.0, 0.0, 0.0],
    ])
    rng = np.random.default_rng(0)
    # turn order class 1, class 2, unstratified: class 1 takes row 0, class 2 its next best (row 1), the
    # unstratified stratum its next best (row 2)
    assert stratified_select(keys, np.array([1, 1, 1]), np.array([1, 2, 0]), rng).tolist() == [0, 1, 2]
    # order class 2 first: class 2 takes row 0, class 1 falls back to row 3
    assert stratified_select(keys, np.array([1, 1, 1]), np.array([2, 1, 0]), rng).tolist() == [0, 3, 2]
    # quotas (0, 2, 1): turns c1, c2, c1 -> rows 0, 1, 3
    assert stratified_select(keys, np.array([0, 2, 1]), np.array([1, 2, 0]), rng).tolist() == [0, 1, 3]
    with pytest.raises(ValueError, match="do not fit"):
        stratified_select(keys, np.array([3, 2, 1]), np.array([1, 2, 0]), rng)


def test_clasp_pe_covers_the_rare_class_that_entropy_misses():
    """Without noise (schedule none = nnActive's class_pe66): case c5 is the only one uncertain about class 2, but
    its overall entropy is low; a plain entropy top-k never takes it, ClaSP PE's class-2 stratum does."""
    h = np.array([0.9, 0.85, 0.8, 0.75, 0.7, 0.2])
    p1 = np.array([0.5, 0.5, 0.5, 0.5, 0.5, 0.0])
    p2 = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.9])
    scores = np.stack([h, h * p1, h * p2], axis=1)  # class_entropy layout [H, H p1, H p2]
    pool = view(scores)
    entropy_pick = build_strategy("entropy").select(PoolView(pool.ids, pool.labeled_mask, {"entropy": h}), 3)
    assert "c5" not in entropy_pick.tolist()
    for seed in range(5):
        # budget 3: int(1.98) = 1 stratified case (class 1 or 2 at random), 2 unstratified
        picks = build_strategy("clasp_pe", schedule="none", random_state=seed).select(pool, 3).tolist()
        assert len(set(picks)) == 3
        assert {"c0", "c1"} <= set(picks) or "c5" in picks
    # budget 4: int(2.64) = 2 -> one case per class: class 2's stratum always takes c5
    for seed in range(5):
        picks = build_strategy("clasp_pe", schedule="none", random_state=seed).select(pool, 4).tolist()
        assert "c5" in picks and {"c0", "c1"} <= set(picks)


def test_noise_decays_over_the_rounds():
    """Early rounds (beta 1) spread the picks; late rounds (beta near 100) nearly follow the scores."""
    rng = np.random.default_rng(0)
    base = np.sort(rng.uniform(0.2, 1.0, 40))[::-1]
    scores = np.stack([base, base * 0.5, base * 0.5], axis=1)

    def distinct(round_index):
        pool = view(scores, round_index=round_index, n_rounds=10)
        return len({tuple(sorted(build_strategy("clasp_pe", random_state=s).select(pool, 5).tolist()))
                    for s in range(30)})

    early, late = distinct(1), distinct(10)
    assert early >= 25 and late <= 10 and early > 2 * late


def test_clasp_pe_ignores_labelled_cases_and_is_seeded():
    scores = np.random.default_rng(1).random((12, 3))
    pool = view(scores, labeled=[0, 1, 2])
    a = build_strategy("clasp_pe", random_state=4).select(pool, 5)
    assert not {"c0", "c1", "c2"} & set(a.tolist())
    np.testing.assert_array_equal(a, build_strategy("clasp_pe", random_state=4).select(pool, 5))


@pytest.mark.parametrize(("params", "match"), [
    ({"fg_ratio": 1.5}, "fg_ratio must be a number in \\[0, 1\\]"),
    ({"schedule": "linear"}, "schedule must be one of exponential, sigmoid, constant, none"),
    ({"beta_start": 0}, "beta_start must be a number > 0"),
    ({"query_steps": 1}, "query_steps must be an integer >= 2"),
    ({"beta": 3}, "unknown parameter\\(s\\) \\['beta'\\]"),
])
def test_bad_parameters_are_named(params, match):
    with pytest.raises(ValueError, match=f"strategy 'clasp_pe': .*{match}"):
        build_strategy("clasp_pe", **params)


def test_experiment_config_names_the_bad_key():
    from raylearn.config import ConfigError, parse_config
    from raylearn.experiment import ExperimentConfig

    ok = parse_config({"strategy": {"name": "clasp_pe", "params": {"fg_ratio": 0.5, "schedule": "sigmoid"}}},
                      ExperimentConfig)
    assert ok.strategy.params["schedule"] == "sigmoid"
    with pytest.raises((ConfigError, ValueError), match="fg_ratio"):
        parse_config({"strategy": {"name": "clasp_pe", "params": {"fg_ratio": 7}}}, ExperimentConfig)


# ------------------------------------------------------------------------------------------- the score
def test_class_weighted_entropy_and_feature_by_hand():
    # one voxel p = (0.5, 0.5, 0) -> H = log 2; H p1 = log2 / 2; H p2 = 0. A confident voxel (1, 0, 0) -> 0.
    probs = np.zeros((3, 1, 1, 2), np.float32)
    probs[:, 0, 0, 0] = [0.5, 0.5, 0.0]
    probs[:, 0, 0, 1] = [1.0, 0.0, 0.0]
    maps = class_weighted_entropy(probs)
    np.testing.assert_allclose(maps[:, 0, 0, 0], [np.log(2), np.log(2) / 2, 0.0], rtol=1e-6)
    np.testing.assert_allclose(maps[:, 0, 0, 1], [0.0, 0.0, 0.0], atol=1e-6)

    class Fixed:
        num_classes = 3

        def predict_proba(self, image):
            return probs

    out = compute_features(Fixed(), np.zeros((1, 1, 1, 2), np.float32), ["class_entropy"])
    # volume means over the 2 voxels
    np.testing.assert_allclose(out["class_entropy"], [np.log(2) / 2, np.log(2) / 4, 0.0], rtol=1e-6)


def test_tune_search_space_over_clasp_pe_parameters_is_validated():
    """`raylearn tune` checks every grid value through the experiment schema: a bad ClaSP PE value is refused
    before any trial runs, naming the parameter."""
    from raylearn.config import ConfigError
    from raylearn.tune import validate_search_space

    base = {"strategy": {"name": "clasp_pe"}}
    space = validate_search_space({"strategy.params.fg_ratio": {"grid": [0.33, 0.66]},
                                   "strategy.params.schedule": {"choice": ["exponential", "sigmoid"]}}, base, "s.yaml")
    assert set(space) == {"strategy.params.fg_ratio", "strategy.params.schedule"}
    with pytest.raises((ConfigError, ValueError), match="fg_ratio"):
        validate_search_space({"strategy.params.fg_ratio": {"grid": [0.66, 1.5]}}, base, "s.yaml")
