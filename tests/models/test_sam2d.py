"""SUGFW's SAM extractor with randomly initialised SAM weights at a small image size (CPU, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from raylearn.models.sam2d import SugfwParams, load_sam, sam_blob, union_mask, volume_features
from tests.conftest import SAM_SMALL

SMALL = {**SAM_SMALL, "max_slices": 2}


def test_params_and_checkpoint_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="checkpoint"):
        SugfwParams()
    with pytest.raises(ValueError, match="img_size"):
        SugfwParams(checkpoint=str(tmp_path / "sam.pth"), img_size=64)
    with pytest.raises(FileNotFoundError, match="extractor.checkpoint"):
        sam_blob(SugfwParams(checkpoint=str(tmp_path / "missing.pth")))


def test_union_mask_keeps_what_the_authors_keep():
    p = SugfwParams(**SMALL)
    seg = np.zeros((4, 4), bool)

    def rec(iou, stab, area, at):
        m = seg.copy()
        m.flat[at] = True
        return {"predicted_iou": iou, "stability_score": stab, "area": area, "segmentation": m}

    recs = [rec(0.96, 0.97, 1, 0), rec(0.95, 0.99, 1, 1), rec(0.99, 0.94, 1, 2), rec(0.99, 0.99, 4, 3),
            rec(0.99, 0.99, 3, 5)]
    out = union_mask(recs, (4, 4), p)  # IoU and stability strictly above 0.95, area < 16 / 4
    assert out.dtype == np.uint8 and np.flatnonzero(out).tolist() == [0, 5]


def test_volume_features_small_random_sam():
    p = SugfwParams(**SMALL)
    sam = load_sam(sam_blob(p), p)
    img = np.random.default_rng(0).random((1, 10, 20, 14)).astype(np.float32)
    a = volume_features(sam, img, p, seed=1)
    assert a["sugfw_embedding"].shape == (256,) and a["sugfw_embedding"].dtype == np.float16
    assert 0.5 <= float(a["sugfw_uncertainty"]) <= 0.75
    one = p.model_copy(update={"max_slices": 1})
    b, c = volume_features(sam, img, one, seed=1), volume_features(sam, img, one, seed=1)
    np.testing.assert_array_equal(b["sugfw_embedding"], c["sugfw_embedding"])  # deterministic for a seed
    d = volume_features(sam, img, one.model_copy(update={"axis": 2}), seed=1)
    assert not np.array_equal(b["sugfw_embedding"], d["sugfw_embedding"])  # other slices, other features
