"""Phantom generator: layout, determinism, variety, and that a threshold does not solve it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from raylearn.data.phantom import make_phantom_case, make_phantom_dataset
from raylearn.data.readers import discover_dataset, read_case


def _arrays(root, i):
    name = f"phantom_{i:03d}.nii.gz"
    img = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "imagesTr" / name)))
    lbl = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "labelsTr" / name)))
    return img, lbl


def test_layout_and_labels(small_phantom):
    meta = json.loads((small_phantom / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "blob_1", "2": "tube_2"}
    assert meta["numTraining"] == 10 and len(meta["training"]) == 10
    info = discover_dataset(small_phantom)
    for rec in info.cases:
        images, label = read_case(rec, info.labels)  # validates geometry and label values
        assert images[0].GetSize() == (24, 24, 24)
        assert set(np.unique(sitk.GetArrayViewFromImage(label))) == {0, 1, 2}  # every structure present


def test_deterministic_for_a_seed(tmp_path, small_phantom):
    again = make_phantom_dataset(tmp_path / "again", n_cases=3, shape=(24, 24, 24), seed=3)
    other = make_phantom_dataset(tmp_path / "other", n_cases=3, shape=(24, 24, 24), seed=4)
    for i in range(3):
        a, b, c = _arrays(small_phantom, i), _arrays(again, i), _arrays(other, i)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        assert not np.array_equal(a[1], c[1])
        assert (small_phantom / "imagesTr" / f"phantom_{i:03d}.nii.gz").read_bytes() == (
            again / "imagesTr" / f"phantom_{i:03d}.nii.gz"
        ).read_bytes()


def _best_global_threshold_dice(imgs, lbls, k):
    """Dice of the best single intensity threshold (either polarity) applied to every case at once."""
    img, lbl = np.concatenate([i.ravel() for i in imgs]), np.concatenate([x.ravel() for x in lbls])
    body = img > 0
    best = 0.0
    for t in np.percentile(img[body], np.arange(2, 99, 2)):
        for pred in (img > t, (img < t) & body):
            best = max(best, 2 * np.sum(pred & (lbl == k)) / (pred.sum() + np.sum(lbl == k)))
    return best


def test_not_thresholdable_and_varied():
    rng = np.random.default_rng(11)
    cases = [make_phantom_case(rng, (32, 32, 32), n_structures=2) for _ in range(6)]
    sizes, contrasts = [], []
    for img, lbl in cases:
        assert img.dtype == np.float32 and lbl.dtype == np.uint8
        bg = img[(lbl == 0) & (img > 0)]
        for k in (1, 2):
            inside = img[lbl == k]
            # intensity ranges of structure and background overlap
            assert np.percentile(inside, 95) > np.percentile(bg, 5) and np.percentile(inside, 5) < np.percentile(bg, 95)
            sizes.append(np.sum(lbl == k))
            contrasts.append(inside.mean() - bg.mean())
    for k in (1, 2):
        assert _best_global_threshold_dice(*zip(*cases, strict=True), k) < 0.6
    assert max(sizes) > 1.5 * min(sizes)
    assert min(contrasts) < 0 < max(contrasts)


def test_n_structures_and_bad_args(tmp_path):
    root = make_phantom_dataset(tmp_path / "p", n_cases=1, shape=(16, 20, 24), n_structures=3, seed=1)
    img, lbl = _arrays(root, 0)
    assert img.shape == (16, 20, 24) and lbl.max() <= 3
    with pytest.raises(ValueError, match="n_cases"):
        make_phantom_dataset(tmp_path / "q", n_cases=0)
    with pytest.raises(ValueError, match="shape"):
        make_phantom_dataset(tmp_path / "q", shape=(4, 4, 4))
