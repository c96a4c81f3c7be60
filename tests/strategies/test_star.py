"""STAR and evenly spaced slices: grouping, the every-j-th cold start, the similarity query, the top-N entropy keep."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raylearn.models import star_propagate
from raylearn.strategies import PoolView, build_strategy
from raylearn.strategies.star import grid_slices, group_bounds, group_of, star_order
from raylearn.units import PropagationContext, unit_id


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def slice_pool(sizes: dict[str, int], labelled: dict[str, list[int]] | None = None, axis: int = 2,
               scores: dict[str, float] | None = None) -> PoolView:
    ids = [unit_id(c, axis, i) for c, n in sizes.items() for i in range(n)]
    lab = {unit_id(c, axis, i) for c, idx in (labelled or {}).items() for i in idx}
    feats = {}
    if scores is not None:
        feats["propagation_score"] = np.array([scores.get(u, np.nan) for u in ids], dtype=np.float64)
    return PoolView(np.array(ids), np.array([u in lab for u in ids]), feats)


def test_grid_and_groups_of_j_plus_one_slices():
    np.testing.assert_array_equal(grid_slices(23, 10), [0, 10, 20])
    np.testing.assert_array_equal(group_of(23, 10), [0] * 10 + [1] * 10 + [2] * 3)
    np.testing.assert_array_equal(group_bounds(23, 10), [[0, 10], [10, 20], [20, 22]])
    # 21 slices: two full groups of 11 sharing slice 10; the last slice belongs to the last group
    np.testing.assert_array_equal(group_bounds(21, 10), [[0, 10], [10, 20]])
    assert group_of(21, 10)[20] == 1
    np.testing.assert_array_equal(group_bounds(1, 10), [[0, 0]])
    with pytest.raises(ValueError, match="spacing"):
        group_of(10, 0)


def test_even_slices_cold_start_labels_every_jth_slice():
    pool = slice_pool({"a": 23, "b": 21, "c": 7})
    strat = build_strategy("even_slices", spacing=10)
    sel = strat.select(pool, 7)  # 3 + 3 + 1 grid slices
    assert set(sel) == {unit_id(c, 2, i) for c, n in (("a", 23), ("b", 21), ("c", 7)) for i in range(0, n, 10)}
    # fewer than the grid: round-robin over cases, the centre-most grid slice of each first
    first = strat.select(pool, 3)
    assert {u.split("@")[0] for u in first} == {"a", "b", "c"}
    assert set(first) == {"a@2:10", "b@2:10", "c@2:0"}


def test_even_slices_halves_the_largest_gaps_after_the_grid():
    pool = slice_pool({"a": 21}, labelled={"a": [0, 10, 20]})
    sel = build_strategy("even_slices", spacing=10).select(pool, 2)
    assert set(sel) == {"a@2:5", "a@2:15"}
    pool = slice_pool({"a": 21, "b": 5}, labelled={"a": [0, 10, 20], "b": [0]})
    assert list(build_strategy("even_slices").select(pool, 1)) == ["a@2:5"]  # gap 5 beats b's 4


def test_star_queries_per_group_the_least_similar_slice():
    # hand-computed: group 0 of case a has slices 1..9 unlabelled; scores = 1 - mean cosine similarity
    cos = {"a@2:3": 0.9, "a@2:7": 0.2, "a@2:12": 0.5, "a@2:18": 0.6, "b@2:4": 0.95}
    scores = {u: 1.0 - c for u, c in cos.items()}
    pool = slice_pool({"a": 21, "b": 11}, labelled={"a": [0, 10, 20], "b": [0, 10]}, scores=scores)
    strat = build_strategy("star", spacing=10)
    # one slice per group, groups by their best score: a/0 (0.8 at slice 7), a/1 (0.5 at 12), b/0 (0.05)
    assert list(strat.select(pool, 3)) == ["a@2:7", "a@2:12", "b@2:4"]
    # then a second pass, again groups by their best remaining slice: a/1 (0.4 at 18), a/0 (0.1 at 3)
    assert list(strat.select(pool, 5)) == ["a@2:7", "a@2:12", "b@2:4", "a@2:18", "a@2:3"]


def test_star_fills_unscored_groups_evenly_and_starts_with_the_grid():
    pool = slice_pool({"a": 21}, labelled={"a": [0, 10]}, scores={"a@2:4": 0.3})
    # the grid slice 20 is unlabelled: first; then the scored slice; then evenly spaced (no scores left)
    assert list(build_strategy("star").select(pool, 3)) == ["a@2:20", "a@2:4", "a@2:15"]
    # no propagation yet (no feature at all): evenly spaced, i.e. the cold start
    cold = build_strategy("star").select(slice_pool({"a": 21}), 3)
    assert set(cold) == {"a@2:0", "a@2:10", "a@2:20"}


def test_star_order_refuses_misaligned_scores():
    pool = slice_pool({"a": 5})
    with pytest.raises(ValueError, match="propagation_score"):
        star_order(pool, np.zeros(3), 10, 1, np.random.default_rng(0))


def test_slice_strategies_refuse_mixed_axes_and_bad_params():
    ids = np.array(["a@2:0", "a@2:1", "a@1:0"])
    with pytest.raises(ValueError, match="mixes slice axes"):
        build_strategy("even_slices").select(PoolView(ids, np.zeros(3, bool)), 1)
    with pytest.raises(ValueError, match="n_pseudo"):
        build_strategy("star", n_pseudo=-1)
    with pytest.raises(ValueError, match="torch_threads"):
        build_strategy("star", torch_threads=0)
    assert build_strategy("star").supported_units() == frozenset({"slice"})


def phantom_case(rng: np.random.Generator, d: int = 21, hw: int = 16) -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros((d, hw, hw), np.uint8)
    label[:, 4:12, 3:9] = 1
    label[:, 6:14, 10:14] = 2
    image = rng.normal(0, 0.3, (1, d, hw, hw)).astype(np.float32)
    image[0][label == 1] += 1.5
    image[0][label == 2] -= 1.5
    return image, label


def make_ctx(tmp_path, cases, labelled_idx, axis=0, round_index=0):
    def label(c):
        lab, ann = np.zeros_like(cases[c][1]), np.zeros(cases[c][1].shape, bool)
        for i in labelled_idx.get(c, []):
            idx = [slice(None)] * 3
            idx[axis] = i
            ann[tuple(idx)] = True
        lab[ann] = cases[c][1][ann]
        return lab, ann

    return PropagationContext(
        round_index=round_index, seed=round_index, axis=axis, case_ids=sorted(cases),
        labelled_units=[unit_id(c, axis, i) for c, idx in labelled_idx.items() for i in idx],
        image=lambda c: cases[c][0], label=label, num_classes=3, work_dir=tmp_path / f"round_{round_index:02d}")


def test_propagate_keeps_the_top_n_lowest_entropy_slices(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    cases = {"a": phantom_case(rng), "b": phantom_case(rng)}
    entropies = {"a": [0.5, 0.1, 0.9], "b": [0.05, 0.7]}

    def fake_predict(net, image, labels, lab_idx, spacing, chunk, device):
        case = "a" if len(lab_idx) == 3 else "b"
        unl = np.array([3, 5, 7][: len(entropies[case])])
        pred = np.full((len(unl), *image.shape[2:]), 2, np.uint8)
        ent = np.array(entropies[case])
        return unl, pred, ent, 1.0 - ent

    monkeypatch.setattr(star_propagate, "_predict_case", fake_predict)
    ctx = make_ctx(tmp_path, cases, {"a": [0, 10, 20], "b": [0, 10]})
    strat = build_strategy("star", n_pseudo=3, stage1_steps=0, stage2_steps=0, width=2, torch_threads=1)
    torch.set_num_threads(2)
    res = strat.propagate(ctx)
    assert torch.get_num_threads() == 2  # torch_threads applies during the stage only
    kept = {(c, int(i)) for c, (_, filled) in res.pseudo.items() for i in np.flatnonzero(filled.any(axis=(1, 2)))}
    assert kept == {("b", 3), ("a", 5), ("a", 3)}  # entropies 0.05, 0.1, 0.5
    for c, (lab, filled) in res.pseudo.items():
        assert filled.dtype == bool and lab.dtype == np.uint8 and lab.shape == cases[c][1].shape
        assert (lab[filled] == 2).all() and (lab[~filled] == 0).all()
    assert res.unit_scores == pytest.approx({"a@0:3": 0.5, "a@0:5": 0.9, "a@0:7": 0.1, "b@0:3": 0.95, "b@0:5": 0.3})
    assert res.info["kept"] == 3 and res.info["candidates"] == 5
    assert (ctx.work_dir / "star_round0000.pt").is_file()


@pytest.mark.parametrize("drop", [False, True])
def test_drop_blank_pseudo_leaves_out_all_background_slices(tmp_path, monkeypatch, drop):
    """The lowest-entropy slices of a small structure are the blank ones: by default (the code's main.py) they are
    kept; ``drop_blank_pseudo`` (the code's delete_black_patch) ranks only slices with a foreground voxel."""
    rng = np.random.default_rng(0)
    cases = {"a": phantom_case(rng)}

    def fake_predict(net, image, labels, lab_idx, spacing, chunk, device):
        unl = np.array([3, 5, 7, 9])
        pred = np.zeros((4, *image.shape[2:]), np.uint8)
        pred[2:, 4:6, 4:6] = 1  # slices 7 and 9 have foreground; 3 and 5 are blank and the most certain
        return unl, pred, np.array([0.01, 0.02, 0.3, 0.4]), np.zeros(4)

    monkeypatch.setattr(star_propagate, "_predict_case", fake_predict)
    ctx = make_ctx(tmp_path, cases, {"a": [0, 10, 20]})
    strat = build_strategy("star", n_pseudo=2, drop_blank_pseudo=drop, stage1_steps=0, stage2_steps=0, width=2)
    res = strat.propagate(ctx)
    lab, filled = res.pseudo["a"]
    kept = sorted(int(i) for i in np.flatnonzero(filled.any(axis=(1, 2))))
    assert kept == ([7, 9] if drop else [3, 5])
    assert res.info["kept_blank"] == (0 if drop else 2) and res.info["blank_candidates"] == 2
    with pytest.raises(ValueError, match="drop_blank_pseudo"):
        build_strategy("star", drop_blank_pseudo="yes").check_params()


def test_propagate_end_to_end_and_resume_from_the_previous_round(tmp_path):
    rng = np.random.default_rng(1)
    cases = {"a": phantom_case(rng), "b": phantom_case(rng)}
    strat = build_strategy("star", n_pseudo=4, stage1_steps=3, stage2_steps=3, width=2, lr1=1e-3, lr2=1e-3)
    ctx0 = make_ctx(tmp_path, cases, {"a": [0, 10, 20], "b": [0, 10, 20]}, axis=0)
    res0 = strat.propagate(ctx0)
    assert res0.info["resumed_from"] is None and res0.info["kept"] == 4 and res0.info["candidates"] == 36
    for c, (_lab, filled) in res0.pseudo.items():
        _, ann = ctx0.label(c)
        assert not (filled & ann).any()
        rows = np.flatnonzero(filled.any(axis=(1, 2)))
        assert all(filled[i].all() for i in rows)  # whole slices
    assert len(res0.unit_scores) == 36
    assert all(u.split(":")[1] not in {"0", "10", "20"} for u in res0.unit_scores)
    assert all(0.0 <= s <= 2.0 for s in res0.unit_scores.values())
    # round 1 (own work dir) starts from round 0's checkpoint; a repeated round 1 starts from the same one
    ctx1 = make_ctx(tmp_path, cases, {"a": [0, 5, 10, 20], "b": [0, 10, 20]}, axis=0, round_index=1)
    res1 = strat.propagate(ctx1)
    assert res1.info["resumed_from"].endswith("round_00/star_round0000.pt")
    again = strat.propagate(ctx1)
    assert again.info["resumed_from"] == res1.info["resumed_from"]
    assert again.unit_scores == pytest.approx(res1.unit_scores)
    assert "a@0:5" not in res1.unit_scores and len(res1.unit_scores) == 35


def test_propagate_refuses_a_labelled_slice_the_store_did_not_annotate(tmp_path):
    rng = np.random.default_rng(2)
    cases = {"a": phantom_case(rng)}
    ctx = make_ctx(tmp_path, cases, {"a": [0, 10]}, axis=0)
    ctx.labelled_units.append("a@0:20")
    with pytest.raises(ValueError, match=r"slices \[20\] of case 'a'"):
        build_strategy("star", stage1_steps=0, stage2_steps=0, width=2).propagate(ctx)
