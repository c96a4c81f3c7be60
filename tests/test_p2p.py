"""Whole-volume P2P pre-annotation: reference on SAM-Med3D's grid, class windows, clicks back on the original grid."""

import numpy as np
import pytest
import SimpleITK as sitk

from raylearn.models.sam_med3d import prepare_volume
from raylearn.p2p import crop_labels, preannotate_volume, reference_on_grid, score_case


def _volume(shape=(30, 36, 40), spacing=(1.2, 1.0, 0.9)):
    z, y, x = np.indices(shape)
    lab = np.zeros(shape, np.uint8)
    lab[((z - 12) ** 2 + (y - 12) ** 2 + (x - 14) ** 2) < 36] = 1
    lab[((z - 18) ** 2 + (y - 24) ** 2 + (x - 26) ** 2) < 25] = 2
    img = sitk.GetImageFromArray((50 + 100 * (lab > 0) + np.random.default_rng(0).normal(0, 5, shape)).astype(
        np.float32))
    img.SetSpacing(spacing[::-1])
    img.SetOrigin((3.0, -2.0, 7.5))
    return prepare_volume(img), lab


class _OracleSam:
    """Stands in for SamMed3D: a 32^3 window; its low-res mask is a ball (radius 2 low-res voxels = 8 window voxels)
    around each positive click, so the round trip window -> original grid can be checked."""

    image_size = 32

    def __init__(self):
        self.encoded, self.decoded, self.prev = 0, [], []

    def encode(self, windows):
        assert windows.shape == (1, 32, 32, 32)
        self.encoded += 1
        return np.zeros((1, 4, 2, 2, 2), np.float32)

    def decode(self, emb, points, labels, masks):
        self.decoded.append(len(points[0]))
        self.prev.append(masks[0] is not None)
        low = np.full((8, 8, 8), -10.0, np.float32)
        g = np.indices((8, 8, 8)).transpose(1, 2, 3, 0) + 0.5
        for p, lab in zip(points[0], labels[0], strict=True):
            if lab:
                low[np.linalg.norm(g - (np.asarray(p) + 0.5) / 4, axis=-1) <= 2] = 10.0
        return low[None]


def test_reference_on_grid_and_crop():
    vol, lab = _volume()
    grid = reference_on_grid(vol, lab)
    assert grid.shape == vol.array.shape and set(np.unique(grid)) == {0, 1, 2}
    with pytest.raises(ValueError, match="reference shape"):
        reference_on_grid(vol, lab[:-1])
    a = np.arange(27).reshape(3, 3, 3)
    c = crop_labels(a, (-1, 1, 0), 3)
    assert c[0].sum() == 0 and np.array_equal(c[1:, :2], a[:2, 1:])


def test_preannotate_volume_clicks_map_back_to_the_reference():
    vol, lab = _volume()
    sam = _OracleSam()
    res = preannotate_volume(sam, vol, lab, [1, 3], np.random.default_rng(0))
    assert sorted(res.label_maps) == [1, 3] and all(m.shape == lab.shape for m in res.label_maps.values())
    assert sam.encoded == 2 and sam.decoded == [1, 2, 3, 1, 2, 3]  # one window per class, accumulated clicks
    assert sam.prev == [False, True, True] * 2  # the previous low-res mask fed back after the first click
    for k in (1, 2):
        clicks = res.clicks[k]
        assert len(clicks) == 3 and clicks[0].positive and clicks[0].label == k
        v = tuple(int(round(c)) for c in clicks[0].voxel)
        assert lab[v] == k  # the first click lands in the reference class on the original grid
        assert res.label_maps[1][v] == k  # and the mask around it comes back on the original grid there
    again = preannotate_volume(_OracleSam(), vol, lab, [1, 3], np.random.default_rng(0))
    assert again.clicks == res.clicks
    only = preannotate_volume(_OracleSam(), vol, lab, 2, np.random.default_rng(0), classes=[2, 3])
    assert set(only.clicks) == {2} and set(np.unique(only.label_maps[2])) <= {0, 2}


def test_preannotate_volume_with_the_small_sam_med3d():
    from raylearn.models.sam_med3d import SamMed3D, SamMed3DConfig

    vol, lab = _volume()
    sam = SamMed3D(SamMed3DConfig(preset="small", device="cpu"))
    res = preannotate_volume(sam, vol, lab, [1, 2], np.random.default_rng(1))
    assert sam.encoder_calls == 2 and sam.decoder_calls == 4
    assert set(np.unique(res.label_maps[2])) <= {0, 1, 2} and res.low_res[1].shape == (sam.low_res_size,) * 3
    with pytest.raises(ValueError, match=">= 1"):
        preannotate_volume(sam, vol, lab, [0], np.random.default_rng(1))


def test_score_case():
    gt = np.zeros((1, 1, 8), np.uint8)
    gt[0, 0, :4] = 1
    pred = gt.copy()
    pred[0, 0, 4] = 1
    s = score_case(pred, gt, [1, 2])
    assert s["nsd_1"] == pytest.approx(20.0) and s["nsd_2"] == 0.0 and s["nsd_overall"] == pytest.approx(20.0)
    assert s["dice_1"] == pytest.approx(8 / 9)
