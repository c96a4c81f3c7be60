"""Readers: the three layouts, the four formats, multi-channel cases and every bad-input case."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from datahelpers import OBLIQUE, blob_case, write_image

from raylearn.data.readers import DatasetError, discover_dataset, read_case

FORMATS = [".nii", ".nii.gz", ".mha", ".nrrd"]
GEOM = {"spacing": (0.8, 1.1, 2.5), "origin": (-10.0, 4.5, 7.25), "direction": OBLIQUE}


def _assert_geometry(img: sitk.Image, spacing, origin, direction):
    assert np.allclose(img.GetSpacing(), spacing)
    assert np.allclose(img.GetOrigin(), origin)
    assert np.allclose(img.GetDirection(), direction, atol=1e-6)


def test_msd_layout(small_phantom):
    info = discover_dataset(small_phantom)
    assert info.layout == "msd"
    assert info.labels == {0: "background", 1: "blob_1", 2: "tube_2"}
    assert info.channel_names == {0: "MRI"}
    assert [c.case_id for c in info.cases] == [f"phantom_{i:03d}" for i in range(10)]
    images, label = read_case(info.cases[0], info.labels)
    assert len(images) == 1 and images[0].GetSize() == (24, 24, 24)
    assert sitk.GetArrayViewFromImage(label).max() <= 2


@pytest.mark.parametrize("suffix", FORMATS)
def test_folder_layout_every_format_keeps_geometry(tmp_path, rng, suffix):
    img, lbl = blob_case(rng)
    write_image(tmp_path / "images" / f"c1{suffix}", img, **GEOM)
    write_image(tmp_path / "labels" / f"c1{suffix}", lbl, **GEOM)
    info = discover_dataset(tmp_path)
    assert info.layout == "folder" and [c.case_id for c in info.cases] == ["c1"]
    assert info.labels == {0: "background", 1: "label_1", 2: "label_2"}  # inferred from the label file
    images, label = read_case(info.cases[0], info.labels)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(images[0]), img)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), lbl)
    _assert_geometry(images[0], **GEOM)


def test_folder_layout_img_seg_pairs_with_labels_json(tmp_path, rng):
    for cid in ("a", "b"):
        img, lbl = blob_case(rng)
        write_image(tmp_path / f"{cid}_img.mha", img)
        write_image(tmp_path / f"{cid}_seg.mha", lbl)
    (tmp_path / "labels.json").write_text(json.dumps({"labels": {"0": "bg", "1": "x", "2": "y"}}))
    info = discover_dataset(tmp_path)
    assert [c.case_id for c in info.cases] == ["a", "b"]
    assert info.labels == {0: "bg", 1: "x", 2: "y"}
    assert info.cases[1].label_path == tmp_path / "b_seg.mha"


def test_folder_without_labels_is_unlabeled(tmp_path, rng):
    write_image(tmp_path / "images" / "u.nrrd", blob_case(rng)[0])
    info = discover_dataset(tmp_path)
    images, label = read_case(info.cases[0])
    assert label is None and len(images) == 1


def _nnunet(root: Path, rng, n_channels=2, ending=".nii.gz", drop_channel=False) -> Path:
    root.mkdir(parents=True)
    for cid in ("case_000", "case_001"):
        img, lbl = blob_case(rng)
        for ch in range(n_channels):
            if drop_channel and cid == "case_001" and ch == 1:
                continue
            write_image(root / "imagesTr" / f"{cid}_{ch:04d}{ending}", img + 10 * ch, **GEOM)
        write_image(root / "labelsTr" / f"{cid}{ending}", lbl, **GEOM)
    meta = {
        "channel_names": {str(c): f"mod{c}" for c in range(n_channels)},
        "labels": {"background": 0, "left": 1, "right": 2},
        "numTraining": 2,
        "file_ending": ending,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_nnunet_layout_multichannel(tmp_path, rng):
    root = _nnunet(tmp_path / "Dataset042_Tiny", rng, n_channels=2, ending=".nrrd")
    info = discover_dataset(root)
    assert info.layout == "nnunet" and info.file_ending == ".nrrd"
    assert info.labels == {0: "background", 1: "left", 2: "right"}
    assert info.channel_names == {0: "mod0", 1: "mod1"}
    rec = info.cases[0]
    assert [p.name for p in rec.image_paths] == ["case_000_0000.nrrd", "case_000_0001.nrrd"]
    images, label = read_case(rec, info.labels, num_channels=2)
    a, b = (sitk.GetArrayFromImage(i) for i in images)
    np.testing.assert_allclose(b - a, 10.0, atol=1e-4)
    _assert_geometry(label, **GEOM)


def test_nnunet_missing_channel(tmp_path, rng):
    root = _nnunet(tmp_path / "Dataset001_X", rng, drop_channel=True)
    with pytest.raises(DatasetError, match=r"case_001_0001\.nii\.gz: missing channel 1"):
        discover_dataset(root)


def test_msd_4d_multimodal_split_into_channels(tmp_path, rng):
    img, lbl = blob_case(rng)
    vol = sitk.JoinSeries([sitk.GetImageFromArray(img), sitk.GetImageFromArray(img * 2)])
    (tmp_path / "imagesTr").mkdir()
    sitk.WriteImage(vol, str(tmp_path / "imagesTr" / "m.nii.gz"))
    write_image(tmp_path / "labelsTr" / "m.nii.gz", lbl)
    meta = {"modality": {"0": "T1", "1": "T2"}, "labels": {"0": "bg", "1": "a", "2": "b"},
            "training": [{"image": "./imagesTr/m.nii.gz", "label": "./labelsTr/m.nii.gz"}]}  # fmt: skip
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    info = discover_dataset(tmp_path)
    images, _ = read_case(info.cases[0], info.labels, num_channels=2)
    assert len(images) == 2 and images[1].GetDimension() == 3
    np.testing.assert_allclose(sitk.GetArrayFromImage(images[1]), img * 2)


# ------------------------------------------------------------------ bad input
def test_corrupt_image_names_file(phantom_copy):
    bad = phantom_copy / "imagesTr" / "phantom_002.nii.gz"
    bad.write_bytes(b"this is not a nifti file" * 10)
    info = discover_dataset(phantom_copy)
    with pytest.raises(DatasetError, match=r"phantom_002\.nii\.gz: unreadable or corrupt image file"):
        read_case(info.cases[2], info.labels)


@pytest.mark.parametrize("suffix", FORMATS)
def test_truncated_file_is_corrupt(tmp_path, rng, suffix):
    """ITK zero-fills truncated .nii/.nii.gz data silently; the reader must not."""
    img, lbl = blob_case(rng, shape=(20, 20, 20))
    write_image(tmp_path / "images" / f"c{suffix}", img)
    bad = write_image(tmp_path / "labels" / f"c{suffix}", lbl)
    (tmp_path / "labels.json").write_text(json.dumps({"labels": {"0": "bg", "1": "a", "2": "b"}}))
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) - max(8, len(data) // 3)])
    info = discover_dataset(tmp_path)
    with pytest.raises(DatasetError, match=rf"labels/c{re.escape(suffix)}: unreadable or corrupt label file"):
        read_case(info.cases[0], info.labels)


def test_missing_label_names_file(phantom_copy):
    (phantom_copy / "labelsTr" / "phantom_004.nii.gz").unlink()
    info = discover_dataset(phantom_copy)
    with pytest.raises(DatasetError, match=r"labelsTr/phantom_004\.nii\.gz: label file missing"):
        read_case(info.cases[4], info.labels)


def test_label_value_not_in_dataset_json(make_msd, rng):
    img, lbl = blob_case(rng)
    lbl[0, 0, 0] = 7
    root = make_msd({"c": (img, lbl)})
    info = discover_dataset(root)
    with pytest.raises(DatasetError, match=r"c\.nii\.gz: label values \[7\] not in dataset\.json labels \[0, 1, 2\]"):
        read_case(info.cases[0], info.labels)


def test_size_mismatch(make_msd, rng, tmp_path):
    img, lbl = blob_case(rng)
    root = make_msd({"c": (img, lbl)})
    write_image(root / "labelsTr" / "c.nii.gz", lbl[:, :, :-1])
    with pytest.raises(DatasetError, match=r"labelsTr/c\.nii\.gz: label size \(15, 14, 12\) \(x,y,z\) does not match"):
        read_case(discover_dataset(root).cases[0])


@pytest.mark.parametrize(
    ("geom", "what"),
    [({"spacing": (1.0, 1.0, 2.0)}, "spacing"), ({"origin": (0.0, 5.0, 0.0)}, "origin"),
     ({"direction": OBLIQUE}, "direction")],
)  # fmt: skip
def test_geometry_mismatch(make_msd, rng, geom, what):
    img, lbl = blob_case(rng)
    root = make_msd({"c": (img, lbl)})
    write_image(root / "labelsTr" / "c.nii.gz", lbl, **geom)
    with pytest.raises(DatasetError, match=rf"labelsTr/c\.nii\.gz: label {what} .* does not match image {what}"):
        read_case(discover_dataset(root).cases[0])


def test_bad_dataset_json(tmp_path):
    (tmp_path / "dataset.json").write_text('{"labels": {"0": "bg",}')
    with pytest.raises(DatasetError, match=r"dataset\.json: not valid JSON \(line 1"):
        discover_dataset(tmp_path)


def test_non_consecutive_labels(make_msd, rng):
    root = make_msd({"c": blob_case(rng)}, labels={"0": "bg", "1": "a", "3": "c"})
    with pytest.raises(DatasetError, match=r"labels: values must be consecutive integers from 0 \(got \[0, 1, 3\]\)"):
        discover_dataset(root)


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="no dataset found"):
        discover_dataset(tmp_path)
    with pytest.raises(DatasetError, match="dataset folder not found"):
        discover_dataset(tmp_path / "nope")


def test_non_integer_label(make_msd, rng):
    img, lbl = blob_case(rng)
    root = make_msd({"c": (img, lbl.astype(np.float32) + 0.5)})
    with pytest.raises(DatasetError, match="non-integer values"):
        read_case(discover_dataset(root).cases[0])


def test_folder_label_inference_leaves_corrupt_files_to_read_case(tmp_path, rng):
    for cid in ("a", "b"):
        img, lbl = blob_case(rng)
        write_image(tmp_path / "images" / f"{cid}.nii.gz", img)
        write_image(tmp_path / "labels" / f"{cid}.nii.gz", lbl)
    (tmp_path / "labels" / "b.nii.gz").write_bytes(b"broken")
    info = discover_dataset(tmp_path)
    assert info.labels == {0: "background", 1: "label_1", 2: "label_2"}
    with pytest.raises(DatasetError, match=r"labels/b\.nii\.gz: unreadable or corrupt label file"):
        read_case(info.cases[1], info.labels)
