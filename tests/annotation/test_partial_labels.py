"""Partial labels (slice units) and pseudo-labels in the label store, what training reads from them, and the
simulated oracle revealing single slices."""

from __future__ import annotations

import numpy as np
import pytest

from raylearn.annotation.labelled import LabelledStore
from raylearn.annotation.labels import PSEUDO_TAG, LabelStore, LabelStoreError
from raylearn.oracle import SimulatedOracle

SHAPE = (3, 4, 5)


def _slice_mask(axis: int, index: int) -> np.ndarray:
    m = np.zeros(SHAPE, dtype=bool)
    m[(slice(None),) * axis + (index,)] = True
    return m


def test_partial_labels_merge_into_versions_with_the_union_mask(tmp_path):
    store = LabelStore(tmp_path / "labels", known_ids={"c1"})
    gt = np.random.default_rng(0).integers(0, 3, SHAPE).astype(np.uint8)
    m1, m2 = _slice_mask(2, 1), _slice_mask(2, 3)
    r1 = store.put_partial("c1", np.where(m1, gt, 0), m1, "simulated", "sim", units=["c1@2:1"])
    assert r1.partial and r1.version == 1 and r1.annotated_voxels == 12 and r1.units == ("c1@2:1",)
    r2 = store.put_partial("c1", gt, m2, "simulated", "sim", units=["c1@2:3"])  # only m2's voxels are read
    assert r2.version == 2 and r2.annotated_voxels == 24 and r2.units == ("c1@2:1", "c1@2:3")
    label, mask = store.read_masked("c1")
    np.testing.assert_array_equal(mask, m1 | m2)
    np.testing.assert_array_equal(label, np.where(m1 | m2, gt, 0))
    assert store.labelled_units() == ["c1@2:1", "c1@2:3"] and store.labelled_units("c1") == ["c1@2:1", "c1@2:3"]
    # the first version is kept, unchanged (versioned, durable)
    old, old_mask = store.read_masked("c1", version=1)
    np.testing.assert_array_equal(old_mask, m1)
    # re-revealing the same slice is idempotent
    again = store.put_partial("c1", gt, m1, "simulated", "sim", units=["c1@2:1"])
    assert not again.created and again.version == 2
    # a fresh process sees the same
    other = LabelStore(tmp_path / "labels")
    np.testing.assert_array_equal(other.read_masked("c1")[1], m1 | m2)
    assert "c1" in other and other.labelled_ids() == ["c1"]


def test_whole_volume_labels_read_with_a_full_mask(tmp_path):
    store = LabelStore(tmp_path / "labels")
    gt = np.ones(SHAPE, np.uint8)
    rec = store.put("c1", gt, "simulated", "sim")
    assert not rec.partial
    label, mask = store.read_masked("c1")
    assert mask.all() and (label == 1).all()


def test_partial_label_checks(tmp_path):
    store = LabelStore(tmp_path / "labels", known_ids={"c1"})
    with pytest.raises(LabelStoreError, match="annotated mask"):
        store.put_partial("c1", np.zeros(SHAPE), np.zeros((3, 4, 4), bool), "simulated", "sim")
    with pytest.raises(LabelStoreError, match="unknown case"):
        store.put_partial("c2", np.zeros(SHAPE), np.zeros(SHAPE, bool), "simulated", "sim")
    with pytest.raises(LabelStoreError, match="label source"):
        store.put_partial("c1", np.zeros(SHAPE), np.zeros(SHAPE, bool), "pseudo", "sim")


def test_a_tampered_mask_file_is_refused(tmp_path):
    store = LabelStore(tmp_path / "labels")
    m = _slice_mask(0, 0)
    rec = store.put_partial("c1", np.ones(SHAPE), m, "simulated", "sim")
    np.save(tmp_path / "labels" / rec.mask_path, np.ones(SHAPE, np.uint8))
    with pytest.raises(LabelStoreError, match="does not match its record"):
        store.read_masked("c1")


def test_pseudo_labels_are_separate_replaced_and_refused_over_annotations(tmp_path):
    store = LabelStore(tmp_path / "labels")
    annotated = _slice_mask(2, 0)
    store.put_partial("c1", np.where(annotated, 2, 0), annotated, "simulated", "sim", units=["c1@2:0"])
    with pytest.raises(LabelStoreError, match="overlap 12 annotated voxel"):
        store.put_pseudo("c1", np.ones(SHAPE), _slice_mask(2, 0) | _slice_mask(2, 1), round_index=0)
    filled = _slice_mask(2, 1)
    rec = store.put_pseudo("c1", np.ones(SHAPE), filled, round_index=0)
    assert rec.source == PSEUDO_TAG and rec.tag == PSEUDO_TAG and rec.info["round"] == 0
    assert store.pseudo_ids() == ["c1"]
    assert store.labelled_ids() == ["c1"] and store.labelled_units() == ["c1@2:0"]  # pseudo is never cost
    label, mask = store.read_masked("c1", tag=PSEUDO_TAG)
    np.testing.assert_array_equal(mask, filled)
    assert (label[filled] == 1).all() and (label[~filled] == 0).all()
    cleared = store.put_pseudo("c1", np.zeros(SHAPE), np.zeros(SHAPE, bool), round_index=1)
    assert cleared.created and store.pseudo_ids() == []
    assert store.latest("c1").version == 1  # the annotated label did not change


def test_training_case_combines_annotations_and_pseudo_labels(tmp_path):
    from raylearn.data.store import StoredCase

    class Images:
        def get(self, cid):
            return StoredCase(cid, np.zeros((1, *SHAPE), np.float32), None, (1.0, 1.0, 1.0), "pool")

    labels = LabelStore(tmp_path / "labels")
    ls = LabelledStore(Images(), labels)
    with pytest.raises(ValueError, match="no label"):
        ls.training_case("c1")
    labels.put("full", np.ones(SHAPE), "simulated", "sim")
    assert ls.training_case("full")[2] is None  # a whole-volume label: every voxel counts, as before
    annotated = _slice_mask(2, 0)
    labels.put_partial("c1", np.where(annotated, 2, 0), annotated, "simulated", "sim")
    v1 = ls.label_version("c1")
    _, label, mask = ls.training_case("c1")
    np.testing.assert_array_equal(mask, annotated)
    labels.put_pseudo("c1", np.ones(SHAPE), _slice_mask(2, 2), round_index=0)
    assert ls.label_version("c1") > v1  # new pseudo-labels make training re-read the case
    _, label, mask = ls.training_case("c1")
    np.testing.assert_array_equal(mask, annotated | _slice_mask(2, 2))
    assert (label[annotated] == 2).all() and (label[_slice_mask(2, 2)] == 1).all() and (label[~mask] == 0).all()
    labels.put_pseudo("pseudo_only", np.ones(SHAPE), _slice_mask(0, 1), round_index=0)
    _, label, mask = ls.training_case("pseudo_only")
    np.testing.assert_array_equal(mask, _slice_mask(0, 1))


def test_simulated_oracle_reveals_single_slices(tmp_path):
    from raylearn.data.store import StoredCase

    gt = np.random.default_rng(1).integers(0, 2, SHAPE).astype(np.uint8)

    class Truth:
        path = tmp_path

        def case_ids(self):
            return ["c1", "c2"]

        def get(self, cid):
            return StoredCase(cid, np.zeros((1, *SHAPE), np.float32), gt, (1.0, 1.0, 1.0), "pool")

    labels = LabelStore(tmp_path / "labels")
    oracle = SimulatedOracle(Truth(), labels)
    receipt = oracle.label(["c1@1:0", "c1@1:2", "c2@1:3"])
    assert receipt.ids == ["c1@1:0", "c1@1:2", "c2@1:3"]
    assert receipt.voxels == 3 * 15
    assert receipt.foreground_voxels == int(gt[:, 0].sum() + gt[:, 2].sum() + gt[:, 3].sum())
    label, mask = labels.read_masked("c1")
    np.testing.assert_array_equal(mask, _slice_mask(1, 0) | _slice_mask(1, 2))
    np.testing.assert_array_equal(label, np.where(mask, gt, 0))
    assert len(labels.history("c1")) == 1  # one version per case and call
    assert labels.labelled_units("c2") == ["c2@1:3"]
    assert not oracle.label(["c1@1:0"]).ids == []  # re-revealing is idempotent in the store
    assert len(labels.history("c1")) == 1
    with pytest.raises(ValueError, match="outside the case"):
        oracle.label(["c1@1:4"])
    with pytest.raises(ValueError, match="not in the store"):
        oracle.label(["c9@1:0"])
