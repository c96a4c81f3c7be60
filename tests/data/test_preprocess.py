"""Preprocessing: shapes, normalisation, config validation and the round trip back to the source grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from datahelpers import OBLIQUE

from raylearn.config import ConfigError, parse_config
from raylearn.data.preprocess import PreprocessConfig, preprocess_case, restore_to_source


def _image(arr, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection([float(d) for d in direction])
    return img


def _case(rng, shape=(13, 17, 11), geom=None):
    """Image with a zero border (for cropping) and a label of a few boxes; returns sitk images."""
    geom = geom or {}
    arr = np.zeros(shape, np.float32)
    arr[2:-2, 3:-1, 1:-3] = rng.normal(50, 10, (shape[0] - 4, shape[1] - 4, shape[2] - 4))
    lbl = np.zeros(shape, np.uint8)
    lbl[4:8, 5:9, 3:6] = 1
    lbl[7:10, 9:13, 4:7] = 2
    return _image(arr, **geom), _image(lbl, **geom), arr, lbl


def _same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    assert a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin()
    assert a.GetDirection() == b.GetDirection()


GEOMS = {
    "identity": {},
    "oblique": {"spacing": (0.9, 1.3, 2.0), "origin": (-12.5, 3.0, 40.0), "direction": OBLIQUE},
    "flipped": {"spacing": (1.0, 1.0, 1.5), "origin": (5.0, 5.0, 5.0), "direction": (-1, 0, 0, 0, 0, 1, 0, -1, 0)},
}


@pytest.mark.parametrize("geom", list(GEOMS))
@pytest.mark.parametrize("orientation", ["RAS", "LPS", None])
@pytest.mark.parametrize("crop", [False, True])
def test_round_trip_without_resampling_is_exact(rng, geom, orientation, crop):
    img, lbl, _, lbl_arr = _case(rng, geom=GEOMS[geom])
    cfg = PreprocessConfig(orientation=orientation, crop_foreground=crop, pad_multiple=8)
    pre = preprocess_case([img], lbl, cfg)
    assert pre.image.dtype == np.float32 and pre.image.ndim == 4 and pre.image.shape[0] == 1
    assert pre.label.dtype == np.uint8 and pre.label.shape == pre.image.shape[1:]
    assert all(n % 8 == 0 for n in pre.label.shape)
    meta = json.loads(json.dumps(pre.meta))  # JSON-serialisable and still sufficient
    back = restore_to_source(pre.label, meta)
    _same_geometry(back, lbl)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), lbl_arr)


def test_crop_removes_zero_border(rng):
    img, lbl, arr, _ = _case(rng)
    pre = preprocess_case([img], lbl, PreprocessConfig(crop_foreground=True, pad_multiple=1, orientation=None))
    assert pre.image.shape[1:] == (9, 13, 7)
    assert pre.meta["crop"] == [[2, 11], [3, 16], [1, 8]]


@pytest.mark.parametrize("interp", ["linear", "bspline"])
def test_round_trip_with_resampling(rng, interp):
    img, lbl, _, lbl_arr = _case(rng, shape=(20, 24, 18), geom=GEOMS["oblique"])
    cfg = PreprocessConfig(target_spacing=(1.0, 1.0, 1.0), image_interpolation=interp, crop_foreground=True)
    pre = preprocess_case([img], lbl, cfg)
    assert pre.spacing == (1.0, 1.0, 1.0)
    # source spacing (x,y,z) = (0.9, 1.3, 2.0) -> array (D,H,W) extent 20*2.0, 24*1.3, 18*0.9 mm
    assert pre.meta["grid"]["size"] == [16, 31, 40]
    back = restore_to_source(pre.label, pre.meta)
    _same_geometry(back, lbl)
    got = sitk.GetArrayFromImage(back)
    for k in (1, 2):  # nearest down/up sampling: not exact, but the structures survive
        inter = np.sum((got == k) & (lbl_arr == k))
        assert 2 * inter / (np.sum(got == k) + np.sum(lbl_arr == k)) > 0.8
    assert set(np.unique(got)) <= {0, 1, 2}


def test_identity_resample_is_skipped(rng):
    img, lbl, _, _ = _case(rng)
    pre = preprocess_case(img, lbl, PreprocessConfig(target_spacing=(1.0, 1.0, 1.0)))
    assert pre.meta["resampled"] is None


def test_zscore_over_nonzero_voxels(rng):
    img, lbl, arr, _ = _case(rng)
    pre = preprocess_case([img], None, PreprocessConfig(pad_multiple=1, orientation=None))
    fg = pre.image[0][arr != 0]
    assert abs(fg.mean()) < 1e-4 and abs(fg.std() - 1) < 1e-3
    assert np.all(pre.image[0][arr == 0] == 0) and pre.label is None


def test_ct_window():
    arr = np.linspace(-2000, 3000, 8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8)
    pre = preprocess_case(
        [_image(arr)], None, PreprocessConfig(normalization="ct", ct_window=(-100, 300), orientation=None)
    )
    x = pre.image[0]
    assert x.min() == 0.0 and x.max() == 1.0
    inside = (arr > -100) & (arr < 300)
    np.testing.assert_allclose(x[inside], (arr[inside] + 100) / 400, rtol=1e-5)


def test_none_normalisation_and_multichannel(rng):
    a = rng.normal(size=(8, 9, 10)).astype(np.float32)
    pre = preprocess_case([_image(a), _image(2 * a)], None, PreprocessConfig(normalization="none", orientation=None))
    assert pre.image.shape == (2, 8, 16, 16)
    np.testing.assert_array_equal(pre.image[1], 2 * pre.image[0])
    np.testing.assert_array_equal(pre.image[0, :, 3:12, 3:13], a)


def test_label_out_of_uint8_range_is_refused(rng):
    img, _, _, lbl = _case(rng)
    big = _image(lbl.astype(np.int16) * 200)
    with pytest.raises(ValueError, match=r"label values must lie in \[0, 255\], got \[0.0, 400.0\]"):
        preprocess_case([img], big)


def test_restore_rejects_wrong_shape(rng):
    img, lbl, _, _ = _case(rng)
    pre = preprocess_case([img], lbl)
    with pytest.raises(ValueError, match="prediction shape"):
        restore_to_source(pre.label[:-1], pre.meta)


@pytest.mark.parametrize(
    ("data", "msg"),
    [
        ({"orientation": "XYZ"}, "orientation"),
        ({"target_spacing": [1, -1, 1]}, "target_spacing"),
        ({"normalization": "minmax"}, "normalization"),
        ({"pad_multiple": 0}, "pad_multiple"),
        ({"ct_window": [10, 0]}, "lo must be below hi"),
        ({"spacing": [1, 1, 1]}, "spacing: unknown key"),
    ],
)
def test_config_errors(data, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_config(data, PreprocessConfig, source="pre.yaml")
