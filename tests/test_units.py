"""Slice unit ids, their parsing and indexing, and the pool's unit bookkeeping (:mod:`raylearn.units`)."""

from __future__ import annotations

import numpy as np
import pytest

from raylearn.units import SliceUnit, UnitSpace, is_slice_id, parse_unit, slice_of, slice_units, unit_id


def test_unit_ids_round_trip():
    u = SliceUnit("hippocampus_001", 2, 17)
    assert u.id == "hippocampus_001@2:17" == unit_id("hippocampus_001", 2, 17)
    assert parse_unit(u.id) == u
    assert is_slice_id(u.id) and not is_slice_id("hippocampus_001")
    assert [s.id for s in slice_units("c", (4, 3, 2), 1)] == ["c@1:0", "c@1:1", "c@1:2"]
    assert len(slice_units("c", (1, 4, 3, 2), 0)) == 4  # [C, D, H, W]: the last three axes


@pytest.mark.parametrize("bad", ["case", "case@3:1", "case@1:-1", "case@1:x", "ca:se@1:2", "case@@1:2", "@1:2", ""])
def test_parse_errors_name_the_id(bad):
    with pytest.raises(ValueError, match="not a slice unit id"):
        parse_unit(bad)


@pytest.mark.parametrize("axis,index", [(3, 0), (-1, 0), (0, -2), (1, True)])
def test_bad_units_are_refused(axis, index):
    with pytest.raises(ValueError):
        SliceUnit("c", axis, index)


def test_unit_id_refuses_unsafe_case_ids():
    with pytest.raises(ValueError, match="cannot name a slice unit"):
        unit_id("a@b", 0, 1)


def test_slice_of_indexes_the_right_slice():
    arr = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    np.testing.assert_array_equal(arr[slice_of(arr.shape, SliceUnit("c", 0, 2))], arr[:, 2])
    np.testing.assert_array_equal(arr[slice_of(arr.shape, SliceUnit("c", 2, 4))], arr[:, :, :, 4])
    vol = arr[0]
    np.testing.assert_array_equal(vol[slice_of(vol.shape, SliceUnit("c", 1, 3))], vol[:, 3])
    with pytest.raises(ValueError, match="outside the case: axis 2 has 5 slices"):
        slice_of(vol.shape, SliceUnit("c", 2, 5))
    with pytest.raises(ValueError, match="3 spatial axes"):
        slice_of((4, 5), SliceUnit("c", 0, 1))


def test_unit_space_slices():
    space = UnitSpace(["a", "b"], "slice", 2, {"a": (3, 3, 11), "b": (3, 3, 2)})
    assert len(space) == 13
    assert space.ids[:3] == ["a@2:0", "a@2:1", "a@2:2"] and space.ids[10] == "a@2:10"  # index order, not text order
    assert space.case_of("b@2:1") == "b"
    labelled = ["b@2:0", "b@2:1", "a@2:4"]
    assert space.labelled_cases(labelled) == ["a", "b"]
    assert space.complete_cases(labelled) == ["b"] and space.open_cases(labelled) == ["a"]
    assert space.spread("b", np.array([0.5, 2.0])) == {"b@2:0": 0.5, "b@2:1": 2.0}
    with pytest.raises(ValueError, match="2 slices along axis 2"):
        space.spread("b", np.zeros(3))
    aligned = space.align({"a@2:1": 1.0, "b@2:1": 3.0})
    assert aligned[1] == 1.0 and aligned[12] == 3.0 and np.isnan(aligned).sum() == 11
    with pytest.raises(ValueError, match="not units of this pool"):
        space.align({"c@2:0": 1.0})
    with pytest.raises(ValueError, match="grid shape of every case"):
        UnitSpace(["a"], "slice", 0, {})


def test_unit_space_volumes_are_the_cases():
    space = UnitSpace(["a", "b", "c"])
    assert space.ids == ["a", "b", "c"] and not space.slices
    assert space.complete_cases(["b"]) == ["b"] and space.open_cases(["b"]) == ["a", "c"]
