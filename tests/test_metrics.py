"""Metrics against hand-computed cases, brute-force references, and the documented empty-mask conventions."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from raylearn.metrics import (
    SURFACE_DICE_TOLERANCE_MM,
    correction_voxels,
    dice,
    dice_per_class,
    evaluate_case,
    hd95,
    surface_dice_per_class,
    surface_distances,
    symdiff_pct,
)


def cube_pair():
    """G = 4^3 cube; P = the same cube shifted by one voxel along D. |P|=|G|=64, overlap 48."""
    g = np.zeros((10, 10, 10), np.uint8)
    g[2:6, 2:6, 2:6] = 1
    p = np.zeros_like(g)
    p[3:7, 2:6, 2:6] = 1
    return p, g


def points(shape=(3, 3, 8), *ws):
    m = np.zeros(shape, bool)
    for w in ws:
        m[1, 1, w] = True
    return m


def test_dice_symdiff_correction_hand_computed():
    p, g = cube_pair()
    assert dice(p, g) == pytest.approx(2 * 48 / 128)
    # FP = 16, FN = 16, union = 80
    assert correction_voxels(p, g) == 32
    assert symdiff_pct(p, g) == pytest.approx(100 * 32 / 80)


def test_identical_masks():
    _, g = cube_pair()
    assert dice(g, g) == 1.0
    assert hd95(g, g, (1, 1, 1)) == 0.0
    assert symdiff_pct(g, g) == 0.0
    assert correction_voxels(g, g) == 0


def test_hd95_shift_is_spacing_aware():
    p, g = cube_pair()
    # boundary voxels are either matched (0) or one step along D apart
    assert hd95(p, g) == pytest.approx(1.0)
    assert hd95(p, g, spacing=(2.0, 1.0, 1.0)) == pytest.approx(2.0)
    # a spacing on an axis without displacement does not matter
    assert hd95(p, g, spacing=(1.0, 3.0, 3.0)) == pytest.approx(1.0)


def test_hd95_is_true_percentile_of_pooled_distances():
    # isolated voxels are their own boundary. pred at w=0; gt at w=1 and w=5.
    p, g = points((3, 3, 8), 0), points((3, 3, 8), 1, 5)
    d_pg, d_gp = surface_distances(p, g)
    assert sorted(d_pg) == [1.0] and sorted(d_gp) == [1.0, 5.0]
    # pooled [1, 1, 5]: position 0.95 * 2 = 1.9 -> 1 + 0.9 * 4 = 4.6
    assert hd95(p, g) == pytest.approx(4.6)
    assert hd95(p, g, spacing=(1, 1, 2)) == pytest.approx(9.2)
    assert hd95(p, g, percentile=100) == pytest.approx(5.0)
    # MONAI's convention: max of the directed 95th percentiles = max(1, 1 + 0.95 * 4) = 4.8
    import torch
    from monai.metrics import compute_hausdorff_distance

    onehot = lambda m: torch.from_numpy(m[None, None].astype(np.float32))  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # MONAI warns about its own internal argument
        monai_hd = compute_hausdorff_distance(onehot(p), onehot(g), include_background=True, percentile=95)
    assert float(monai_hd) == pytest.approx(4.8)


@pytest.mark.parametrize(
    ("p_empty", "g_empty", "expected"),
    [
        (True, True, {"dice": 1.0, "hd95": 0.0, "symdiff_pct": 0.0, "corr": 0}),
        (True, False, {"dice": 0.0, "hd95": math.inf, "symdiff_pct": 100.0, "corr": 64}),
        (False, True, {"dice": 0.0, "hd95": math.inf, "symdiff_pct": 100.0, "corr": 64}),
    ],
)
def test_empty_mask_conventions(p_empty, g_empty, expected):
    p, g = cube_pair()
    if p_empty:
        p = np.zeros_like(p)
    if g_empty:
        g = np.zeros_like(g)
    assert dice(p, g) == expected["dice"]
    assert surface_dice_per_class(p, g, 2)[0] == expected["dice"]  # same rule: 1 when both empty, else 0
    assert hd95(p, g, (1, 1, 1)) == expected["hd95"]
    assert symdiff_pct(p, g) == expected["symdiff_pct"]
    assert correction_voxels(p, g) == expected["corr"]


def test_evaluate_case_keys_values_and_means():
    p, g = cube_pair()
    p[8, 8, 8] = 2  # class 2 predicted but absent from the ground truth
    out = evaluate_case(p, g, (2.0, 1.0, 1.0), num_classes=3)
    metrics = ("dice", "hd95", "surface_dice", "symdiff_pct")
    assert set(out) == {
        *(f"{m}_{c}" for m in (*metrics, "correction") for c in (1, 2)),
        *(f"{m}_mean" for m in metrics),
        "correction_total",
    }
    assert out["dice_1"] == pytest.approx(0.75) and out["dice_2"] == 0.0
    assert out["dice_mean"] == pytest.approx(0.375)
    assert out["hd95_1"] == pytest.approx(2.0) and out["hd95_2"] == math.inf and out["hd95_mean"] == math.inf
    # 1 mm tolerance, 2 mm shift along D: the 2 x 16 boundary voxels of the shifted faces miss, 80 of 112 match
    assert out["surface_dice_1"] == pytest.approx(80 / 112) and out["surface_dice_2"] == 0.0
    assert out["surface_dice_mean"] == pytest.approx(40 / 112)
    assert out["symdiff_pct_1"] == pytest.approx(40.0) and out["symdiff_pct_2"] == 100.0
    assert out["symdiff_pct_mean"] == pytest.approx(70.0)
    assert out["correction_1"] == 32 and out["correction_2"] == 1 and out["correction_total"] == 33
    wider = evaluate_case(p, g, (2.0, 1.0, 1.0), num_classes=3, surface_tolerance_mm=2.0)
    assert wider["surface_dice_1"] == 1.0


def test_evaluate_case_without_distance_metrics():
    p, g = cube_pair()
    out = evaluate_case(p, g, (1, 1, 1), 2, hd95=False, surface_tolerance_mm=None)
    assert set(out) == {"dice_1", "symdiff_pct_1", "correction_1", "dice_mean", "symdiff_pct_mean", "correction_total"}
    assert out["dice_mean"] == pytest.approx(0.75)


def test_evaluate_case_class_names():
    p, g = cube_pair()
    out = evaluate_case(p, g, None, 2, class_names={0: "background", 1: "cube"})
    assert out["dice_cube"] == pytest.approx(0.75) and "dice_1" not in out
    out = evaluate_case(p, g, None, 2, class_names=["bg", "c"])
    assert out["symdiff_pct_c"] == pytest.approx(40.0)


def test_evaluate_case_all_perfect_including_absent_class():
    _, g = cube_pair()
    out = evaluate_case(g, g, (1, 1, 1), num_classes=3)
    assert out["dice_2"] == 1.0 and out["hd95_2"] == 0.0 and out["symdiff_pct_2"] == 0.0
    assert out["surface_dice_2"] == 1.0 and out["surface_dice_mean"] == 1.0
    assert out["dice_mean"] == 1.0 and out["hd95_mean"] == 0.0 and out["correction_total"] == 0


@pytest.mark.parametrize(
    ("pred", "gt", "spacing", "k", "match"),
    [
        (np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 5), np.uint8), None, 2, "shape"),
        (np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8), None, 2, "3-d"),
        (np.full((4, 4, 4), 3, np.uint8), np.zeros((4, 4, 4), np.uint8), None, 3, "outside"),
        (np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), (1, 1), 2, "spacing"),
        (np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), (1, 0, 1), 2, "spacing"),
        (np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), None, 1, "num_classes"),
    ],
)
def test_evaluate_case_errors(pred, gt, spacing, k, match):
    with pytest.raises(ValueError, match=match):
        evaluate_case(pred, gt, spacing, k)


def _brute_hd95(p, g, spacing):
    """Independent reference: boundary = mask minus its 6-connected erosion; all pairwise distances in mm."""
    from scipy.ndimage import binary_erosion
    from scipy.spatial.distance import cdist

    def edge_points(m):
        return np.argwhere(m & ~binary_erosion(m, border_value=0)) * np.asarray(spacing, float)

    ep, eg = edge_points(p), edge_points(g)
    d = cdist(ep, eg)
    return float(np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_matches_brute_force_on_random_blobs_with_anisotropic_spacing(seed):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    g = gaussian_filter(rng.random((14, 12, 10)), 2) > 0.5
    p = gaussian_filter(rng.random((14, 12, 10)), 2) > 0.5
    assert g.any() and p.any()
    spacing = (2.5, 0.8, 1.3)
    assert hd95(p, g, spacing) == pytest.approx(_brute_hd95(p, g, spacing), rel=1e-6)
    # the axis order of the spacing matters (array order D, H, W)
    assert hd95(p, g, spacing[::-1]) == pytest.approx(_brute_hd95(p, g, spacing[::-1]), rel=1e-6)


def _brute_surface_dice(p, g, spacing, tol):
    """Independent reference: share of boundary points of both masks within ``tol`` mm of the other boundary."""
    from scipy.ndimage import binary_erosion
    from scipy.spatial.distance import cdist

    def edge_points(m):
        return np.argwhere(m & ~binary_erosion(m, border_value=0)) * np.asarray(spacing, float)

    d = cdist(edge_points(p), edge_points(g))
    near = np.concatenate([d.min(axis=1), d.min(axis=0)]) <= tol
    return float(near.mean())


@pytest.mark.parametrize(("seed", "tol"), [(0, 1.0), (1, 2.5), (2, 0.0)])
def test_surface_dice_matches_brute_force(seed, tol):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    g = gaussian_filter(rng.random((14, 12, 10)), 2) > 0.5
    p = gaussian_filter(rng.random((14, 12, 10)), 2) > 0.5
    spacing = (2.5, 0.8, 1.3)
    got = surface_dice_per_class(p.astype(np.uint8), g.astype(np.uint8), 2, spacing, tol)
    assert got.shape == (1,) and got[0] == pytest.approx(_brute_surface_dice(p, g, spacing, tol), rel=1e-6)
    assert SURFACE_DICE_TOLERANCE_MM == 1.0
    with pytest.raises(ValueError, match="tolerance"):
        surface_dice_per_class(p, g, 2, spacing, -1.0)


def test_dice_per_class_numpy_and_torch():
    import torch

    p, g = cube_pair()
    p[8, 8, 8] = 2  # class 2: predicted only; class 3: absent from both
    values, present = dice_per_class(p, g, 4)
    np.testing.assert_allclose(values, [0.75, 0.0, 1.0])
    np.testing.assert_array_equal(present, [True, True, False])
    assert values.dtype == np.float64 and present.dtype == bool
    t_values, t_present = dice_per_class(torch.from_numpy(p), torch.from_numpy(g).long(), 4)
    np.testing.assert_allclose(t_values, values)
    np.testing.assert_array_equal(t_present, present)
    assert values[present].mean() == pytest.approx(0.375)  # the mean over classes that occur
    with pytest.raises(ValueError, match="shape"):
        dice_per_class(p, g[:5], 4)
    with pytest.raises(ValueError, match="outside"):
        dice_per_class(p, g, 2)


def test_metric_labels_cover_every_key_prefix():
    from raylearn.metrics import METRIC_LABELS

    p, g = cube_pair()
    prefixes = {k.rsplit("_", 1)[0] for k in evaluate_case(p, g, None, 2)}
    assert prefixes == set(METRIC_LABELS)
    assert METRIC_LABELS["symdiff_pct"].startswith("NSD (P2P)")
