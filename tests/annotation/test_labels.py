"""The label store (durable versions, history, idempotence) and label validation against the image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from raylearn.annotation.labels import LabelStore, LabelStoreError, label_digest
from raylearn.annotation.validate import LabelInvalid, check_label
from raylearn.data.preprocess import restore_to_source

CLASSES = {0: "background", 1: "Anterior", 2: "Posterior"}


def test_versions_history_and_idempotent_rewrite(tmp_path):
    store = LabelStore(tmp_path / "labels", known_ids={"a", "b"})
    lab = np.zeros((4, 5, 6), np.uint8)
    lab[1, 2, 3] = 1
    r1 = store.put("a", lab, "human", "alice")
    again = store.put("a", lab.copy(), "human", "alice")
    assert (r1.version, r1.created) == (1, True)
    assert (again.version, again.created, again.sha256) == (1, False, r1.sha256)
    lab2 = lab.copy()
    lab2[0, 0, 0] = 2
    r2 = store.put("a", lab2, "human", "bob", info={"note": "fix"})
    assert r2.version == 2 and r2.annotator == "bob"
    assert [r.version for r in store.history("a")] == [1, 2]
    np.testing.assert_array_equal(store.read("a"), lab2)
    np.testing.assert_array_equal(store.read("a", version=1), lab)
    # a second process's view: everything is on disk
    other = LabelStore(tmp_path / "labels")
    assert other.labelled_ids() == ["a"] and "a" in other and "b" not in other
    assert other.latest("a").sha256 == label_digest(lab2) and other.latest("a").info == {"note": "fix"}
    recs = [json.loads(x)["payload"] for x in (tmp_path / "labels" / "labels.jsonl").read_text().splitlines()]
    assert [(r["case_id"], r["version"], r["source"], r["annotator"]) for r in recs] == \
        [("a", 1, "human", "alice"), ("a", 2, "human", "bob")]
    assert all(isinstance(r["time"], float) for r in recs)


def test_refusals_store_nothing(tmp_path):
    store = LabelStore(tmp_path / "labels", known_ids={"a"})
    with pytest.raises(LabelStoreError, match="unknown case 'zz'"):
        store.put("zz", np.zeros((2, 2, 2)), "human", "x")
    with pytest.raises(LabelStoreError, match="invalid case id"):
        store.put("../etc", np.zeros((2, 2, 2)), "human", "x")
    with pytest.raises(LabelStoreError, match=r"\[D, H, W\]"):
        store.put("a", np.zeros((2, 2)), "human", "x")
    with pytest.raises(LabelStoreError, match="source"):
        store.put("a", np.zeros((2, 2, 2)), "robot", "x")
    assert store.records() == [] and not (tmp_path / "labels" / "labels.jsonl").exists()
    with pytest.raises(KeyError, match="no 'final' label"):
        store.read("a")


def test_orphan_file_without_record_is_ignored_and_tampering_detected(tmp_path):
    store = LabelStore(tmp_path / "labels")
    lab = np.ones((3, 3, 3), np.uint8)
    store.put("a", lab, "simulated", "simulated")
    # a kill after the file rename but before the record: an orphan v0002 that no record names
    np.save(tmp_path / "labels" / "cases" / "a" / "v0002.npy", np.zeros((3, 3, 3), np.uint8))
    assert store.latest("a").version == 1
    np.testing.assert_array_equal(store.read("a"), lab)
    assert store.put("a", lab * 2, "human", "x").version == 2  # the orphan is overwritten
    np.save(tmp_path / "labels" / "cases" / "a" / "v0002.npy", np.zeros((3, 3, 3), np.uint8))
    with pytest.raises(LabelStoreError, match="does not match its record"):
        store.read("a")


def _source_label(store, cid) -> sitk.Image:
    return sitk.ReadImage(store.manifest.set_index("case_id").loc[cid, "label_path"])


def test_source_labels_map_exactly_onto_the_store_grid(hippo_store):
    """Reorientation, resampling, crop and pad: an uploaded source label lands where the store put the GT."""
    for cid in hippo_store.case_ids("pool")[:3]:
        checked = check_label(_source_label(hippo_store, cid), hippo_store.meta(cid), CLASSES)
        np.testing.assert_array_equal(checked.array, hippo_store.get(cid).label)
        assert checked.values == [0, 1, 2] and checked.dropped_foreground_voxels == 0
        # the prediction path back (restore_to_source) and forward again
        back = restore_to_source(hippo_store.get(cid).label, hippo_store.meta(cid))
        assert check_label(back, hippo_store.meta(cid), CLASSES).array.shape == hippo_store.get(cid).label.shape


@pytest.mark.parametrize("change, message", [
    (lambda im: sitk.GetImageFromArray(sitk.GetArrayFromImage(im)[:-1]), "size"),
    (lambda im: (im.SetSpacing([s * 1.1 for s in im.GetSpacing()]), im)[1], "spacing"),
    (lambda im: (im.SetOrigin([o + 2.0 for o in im.GetOrigin()]), im)[1], "origin"),
    (lambda im: (im.SetDirection([1, 0, 0, 0, 1, 0, 0, 0, 1]), im)[1], "direction"),
    (lambda im: sitk.Add(im, 3), r"value\(s\) \[3, 4, 5\] are not classes"),
    (lambda im: sitk.Multiply(im, 0), "empty"),
    (lambda im: sitk.Add(sitk.Cast(im, sitk.sitkFloat32), 0.5), "whole numbers"),
])
def test_bad_labels_are_refused_naming_the_problem(hippo_store, change, message):
    cid = hippo_store.case_ids("pool")[0]
    good = _source_label(hippo_store, cid)
    bad = change(sitk.Image(good))
    if bad.GetSize() != good.GetSize():
        bad.CopyInformation(sitk.Image(bad.GetSize(), sitk.sitkUInt8))
    with pytest.raises(LabelInvalid, match=message) as err:
        check_label(bad, hippo_store.meta(cid), CLASSES)
    assert err.value.status == 422
    empty = sitk.Multiply(good, 0)
    assert check_label(empty, hippo_store.meta(cid), CLASSES, allow_empty=True).foreground_voxels == 0
