"""Prediction -> prompt: interior-weighted click sampling and the symmetric-difference comparison."""

import numpy as np
import pytest
from scipy import ndimage

from raylearn.prompts import clicks_from_prediction, compare_symdiff_pct, symdiff_pct_per_class


def _two_blobs(shape=(32, 40, 36)) -> np.ndarray:
    z, y, x = np.indices(shape)
    lab = np.zeros(shape, np.uint8)
    lab[((z - 16) ** 2 + (y - 12) ** 2 + (x - 18) ** 2) < 64] = 1
    lab[((z - 16) ** 2 + (y - 30) ** 2 + (x - 18) ** 2) < 25] = 2
    return lab


def test_clicks_inside_each_class_and_counts():
    lab = _two_blobs()
    clicks = clicks_from_prediction(lab, 5, seed=0)
    assert [c.label for c in clicks] == [1] * 5 + [2] * 5
    for c in clicks:
        assert c.positive and c.world is None
        assert lab[tuple(int(v) for v in c.voxel)] == c.label
    assert len({c.voxel for c in clicks}) == 10  # drawn without replacement


def test_clicks_are_seeded():
    lab = _two_blobs()
    a = clicks_from_prediction(lab, 10, n_negative=3, seed=7)
    b = clicks_from_prediction(lab, 10, n_negative=3, seed=np.random.default_rng(7))
    c = clicks_from_prediction(lab, 10, n_negative=3, seed=8)
    assert a == b and a != c


def test_clicks_favour_the_interior():
    lab = _two_blobs()
    dist = ndimage.distance_transform_edt(lab == 1)
    clicks = clicks_from_prediction(lab, 200, classes=[1], seed=0)
    sampled = np.mean([dist[tuple(int(v) for v in c.voxel)] for c in clicks])
    uniform = clicks_from_prediction(lab, 200, classes=[1], interior_power=0.0, seed=0)
    flat = np.mean([dist[tuple(int(v) for v in c.voxel)] for c in uniform])
    assert sampled > flat + 0.5 and sampled > dist[lab == 1].mean()


def test_negative_clicks_come_from_the_surroundings():
    lab = _two_blobs()
    clicks = clicks_from_prediction(lab, 1, classes=[2], n_negative=6, margin_mm=3.0, seed=0)
    neg = [c for c in clicks if not c.positive]
    assert len(neg) == 6 and all(c.label == 2 for c in neg)
    outside = ndimage.distance_transform_edt(lab != 2)
    for c in neg:
        d = outside[tuple(int(v) for v in c.voxel)]
        assert 0 < d <= 3.0


def test_absent_class_small_region_and_bad_input():
    lab = np.zeros((8, 8, 8), np.uint8)
    lab[4, 4, 4] = 1
    clicks = clicks_from_prediction(lab, 10, classes=[1, 2], seed=0)
    assert [c.voxel for c in clicks] == [(4.0, 4.0, 4.0)]  # one voxel: one click; class 2 absent: none
    with pytest.raises(ValueError, match="3D"):
        clicks_from_prediction(lab[0], 1)
    with pytest.raises(ValueError, match=">= 0"):
        clicks_from_prediction(lab, -1)


def test_symdiff_pct_known_values():
    gt = np.zeros((1, 1, 8), np.uint8)
    pred = np.zeros((1, 1, 8), np.uint8)
    gt[0, 0, 0:4] = 1
    pred[0, 0, 2:6] = 1  # overlap 2, FP 2, FN 2, union 6
    gt[0, 0, 6:8] = 2
    pred[0, 0, 6:8] = 2
    out = symdiff_pct_per_class(pred, gt, [1, 2, 3])
    assert out[1] == pytest.approx(4 / 6 * 100) and out[2] == 0.0 and out[3] == 0.0
    cmp = compare_symdiff_pct(gt, pred, gt, [1])
    assert cmp[1] == {"symdiff_pct_sam": 0.0, "symdiff_pct_segmenter": pytest.approx(66.666, abs=1e-2),
                      "gain": pytest.approx(66.666, abs=1e-2)}
    with pytest.raises(ValueError, match="shape"):
        symdiff_pct_per_class(pred, gt[..., :4], [1])


def test_clicks_on_real_hippocampus_label(hippocampus_dir):
    import SimpleITK as sitk

    path = sorted((hippocampus_dir / "labelsTr").glob("*.nii.gz"))[0]
    img = sitk.ReadImage(str(path))
    lab = sitk.GetArrayFromImage(img).astype(np.uint8)
    clicks = clicks_from_prediction(lab, 10, n_negative=2, spacing=img.GetSpacing()[::-1], seed=0)
    pos = [c for c in clicks if c.positive]
    assert {c.label for c in pos} == {1, 2} and len(pos) == 20
    assert all(lab[tuple(int(v) for v in c.voxel)] == c.label for c in pos)
    assert all(lab[tuple(int(v) for v in c.voxel)] != c.label for c in clicks if not c.positive)
