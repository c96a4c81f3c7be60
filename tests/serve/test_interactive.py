"""nnInteractive interactions -> SAM-Med3D prompts, and the safe array decoders (no Ray)."""

import gzip
import io

import numpy as np
import pytest
import SimpleITK as sitk
from fastapi import HTTPException

from raylearn.models.sam_med3d import prepare_volume
from raylearn.serve.interactive import (
    InteractiveState,
    changed_bbox,
    gunzip,
    gzip_bits,
    load_npy,
    nnia_shape,
    window_sizes,
)


def _state(shape=(10, 12, 14)):
    st = InteractiveState()
    img = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=shape).astype(np.float32))
    st.volume = prepare_volume(img)
    st.reset()
    return st


def test_interactions_become_clicks():
    st = _state()
    st.add_click([1, 2, 3], True)
    st.add_box([[2, 6], [4, 5], [0, 10]], False)  # half-open: centre (3.5, 4, 4.5)
    line = np.zeros((10, 12, 14), np.uint8)
    line[5, 2:9, 7] = 1  # thin: every voxel at distance 1, the middle one is taken
    st.add_mask_click(line, True, "scribble")
    blob = np.zeros((10, 12, 14), np.uint8)
    blob[2:9, 3:10, 4:11] = 1  # a 7^3 cube: its centre is the most interior voxel
    st.add_mask_click(blob, False, "lasso")
    assert [(c.voxel, c.positive) for c in st.clicks] == [((1.0, 2.0, 3.0), True), ((3.5, 4.0, 4.5), False),
                                                          ((5.0, 5.0, 7.0), True), ((5.0, 6.0, 7.0), False)]
    assert st.pending and len(st.history) == 4
    assert st.undo() and len(st.clicks) == 3 and not st.pending


def test_interaction_errors_name_the_problem():
    st = _state()
    for call, needle in [(lambda: st.add_click([1, 2, 99], True), "outside the volume"),
                         (lambda: st.add_box([[1, 1], [0, 2], [0, 2]], True), "zero size"),
                         (lambda: st.add_box([[1, 2]], True), "expected [[x0, x1]"),
                         (lambda: st.add_mask_click(np.zeros((10, 12, 14)), True, "lasso"), "lasso: the mask is empty"),
                         (lambda: st.add_mask_click(np.ones((3, 3, 3)), True, "scribble"), "scribble: shape"),
                         (lambda: st.set_target((3, 3, 3), np.uint8), "target buffer shape"),
                         (lambda: InteractiveState().add_click([0, 0, 0], True), "no image")]:
        with pytest.raises(HTTPException) as err:
            call()
        assert err.value.status_code == 400 and needle in err.value.detail


def test_initial_segment_is_the_mask_prompt():
    st = _state((30, 30, 30))
    seg = np.zeros((30, 30, 30), np.uint8)
    seg[10:20, 12:18, 5:25] = 1
    st.add_click([15, 15, 15], True)
    st.set_segment(seg, 32, 16)
    assert st.clicks == [] and np.array_equal(st.mask, seg) and st.low_res.shape == (16, 16, 16)
    assert st.low_res.max() > 0 > st.low_res.min()  # inside positive logits, outside negative
    st.set_segment(np.zeros_like(seg), 32, 16)  # an empty segmentation resets
    assert st.low_res is None and not st.mask.any() and st.history == []


def test_window_sizes_from_info():
    assert window_sizes({"input_size": 128, "architecture": {"image_size": 128, "patch_size": 16}}) == (128, 32)
    assert window_sizes({"input_size": 32, "architecture": {"image_size": 32, "patch_size": 8}}) == (32, 16)


def test_changed_bbox():
    a = np.zeros((5, 5, 5), np.uint8)
    b = a.copy()
    assert changed_bbox(a, b) is None
    b[1, 2, 3] = b[3, 2, 1] = 1
    assert changed_bbox(a, b) == [[1, 4], [2, 3], [1, 4]]
    assert changed_bbox(None, b) == [[1, 4], [2, 3], [1, 4]]


def test_safe_decoders():
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    buf = io.BytesIO()
    np.save(buf, arr)
    assert np.array_equal(load_npy(buf.getvalue(), 24, "image"), arr)
    with pytest.raises(HTTPException) as err:
        load_npy(buf.getvalue(), 23, "image")
    assert err.value.status_code == 413 and "above max_voxels" in err.value.detail
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(HTTPException) as err:
        load_npy(obj.getvalue(), 10, "mask")
    assert "object arrays are refused" in err.value.detail
    with pytest.raises(HTTPException) as err:
        gunzip(gzip.compress(bytes(1000)), 999, "segment")
    assert err.value.status_code == 413
    assert gunzip(gzip.compress(b"abc"), 3, "x") == b"abc"
    with pytest.raises(HTTPException) as err:
        gunzip(b"plain", 10, "x")
    assert err.value.status_code == 400 and "not gzip data" in err.value.detail
    with pytest.raises(HTTPException) as err:
        nnia_shape(b"NOPE" + bytes(20), "image")
    assert "not an nnInteractive array" in err.value.detail
    mask = np.zeros((3, 5, 7), bool)
    mask[1, 2, 3] = True
    bits = np.unpackbits(np.frombuffer(gzip.decompress(gzip_bits(mask)), np.uint8))[:105].reshape(3, 5, 7)
    assert np.array_equal(bits, mask)


def test_nnia_shape_matches_the_client_codec():
    remote = pytest.importorskip("nnInteractive.inference.remote.serialization")
    packed = remote.pack_array(np.zeros((1, 6, 7, 8), np.int16))
    assert nnia_shape(packed, "image") == (1, 6, 7, 8)
