"""Pool store: ingest, zero-copy reads, splits, idempotence, refusal, atomicity, skip_bad, restore."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import SimpleITK as sitk
from datahelpers import blob_case, write_image

from raylearn.data import store as store_mod
from raylearn.data.preprocess import PreprocessConfig, preprocess_case
from raylearn.data.readers import DatasetError, discover_dataset, read_case
from raylearn.data.store import PoolStore, StoreError, ingest, split_cases


@pytest.fixture(scope="module")
def phantom_store(small_phantom, tmp_path_factory):
    out = tmp_path_factory.mktemp("stores") / "phantom"
    report = ingest(small_phantom, out, n_test=3, seed=1, progress=False)
    return out, report


def test_ingest_report_and_manifest(phantom_store):
    out, report = phantom_store
    assert (report.n_cases, report.n_pool, report.n_test) == (10, 7, 3)
    assert not report.reused and report.skipped == [] and report.cases_per_s > 0
    assert "10 (7 pool, 3 test)" in report.summary()
    store = PoolStore.open(out)
    m = store.manifest
    assert isinstance(m, pd.DataFrame) and len(m) == 10
    for col in ("case_id", "shape", "spacing", "image_paths", "label_path", "split", "shard", "batch",
                "image_offset", "image_nbytes", "label_offset", "label_nbytes", "nbytes", "class_voxels"):  # fmt: skip
        assert col in m.columns, col
    assert store.labels == {0: "background", 1: "blob_1", 2: "tube_2"}
    assert (store.num_classes, store.num_channels, len(store)) == (3, 1, 10)
    assert sorted(store.case_ids("pool") + store.case_ids("test")) == store.case_ids()
    assert len(store.case_ids("test")) == 3
    assert list(m.loc[m.case_id == "phantom_000", "split"])[0] in ("pool", "test")


def test_get_matches_preprocessing_and_is_zero_copy(phantom_store, small_phantom):
    out, _ = phantom_store
    store = PoolStore.open(out)
    info = discover_dataset(small_phantom)
    rec = info.cases[4]
    expected = preprocess_case(*read_case(rec, info.labels), PreprocessConfig())
    before = pa.total_allocated_bytes()
    case = store.get(rec.case_id)
    assert pa.total_allocated_bytes() == before  # nothing allocated by Arrow: views on the memory map
    assert case.image.dtype == np.float32 and case.image.shape == (1, 24, 24, 24)
    assert case.label.dtype == np.uint8 and case.label.shape == (24, 24, 24)
    assert not case.image.flags.writeable and not case.image.flags.owndata
    assert not case.label.flags.writeable and not case.label.flags.owndata
    with pytest.raises(ValueError, match="read-only"):
        case.image[0, 0, 0, 0] = 1.0
    np.testing.assert_array_equal(case.image, expected.image)
    np.testing.assert_array_equal(case.label, expected.label)
    assert case.spacing == (1.0, 1.0, 1.0) and case.shape == (24, 24, 24)
    assert store.nbytes(rec.case_id) == case.image.nbytes + case.label.nbytes
    # the manifest's byte offsets point at exactly these bytes of the shard file
    row = store.manifest.set_index("case_id").loc[rec.case_id]
    raw = (out / "shards" / row["shard"]).read_bytes()
    img = np.frombuffer(raw, np.float32, count=row["image_nbytes"] // 4, offset=row["image_offset"])
    np.testing.assert_array_equal(img, case.image.ravel())
    lbl = np.frombuffer(raw, np.uint8, count=row["label_nbytes"], offset=row["label_offset"])
    np.testing.assert_array_equal(lbl, case.label.ravel())


def test_pickles_by_path(phantom_store):
    out, _ = phantom_store
    store = PoolStore.open(out)
    store.get("phantom_001")  # opens a memory map, which must not travel
    blob = pickle.dumps(store)
    assert len(blob) < 500
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again.get("phantom_001").image, store.get("phantom_001").image)


def test_unknown_case_and_split(phantom_store):
    store = PoolStore.open(phantom_store[0])
    with pytest.raises(KeyError, match="nope"):
        store.get("nope")
    with pytest.raises(StoreError, match="unknown split 'train'"):
        store.case_ids("train")


def test_restore_maps_back_to_source(phantom_store, small_phantom, tmp_path):
    store = PoolStore.open(phantom_store[0])
    case = store.get("phantom_002")
    img = store.restore("phantom_002", case.label, path=tmp_path / "pred.nii.gz")
    src = sitk.ReadImage(str(small_phantom / "labelsTr" / "phantom_002.nii.gz"))
    written = sitk.ReadImage(str(tmp_path / "pred.nii.gz"))
    for im in (img, written):
        assert im.GetSize() == src.GetSize() and im.GetDirection() == src.GetDirection()
        assert im.GetOrigin() == src.GetOrigin() and im.GetSpacing() == src.GetSpacing()
        np.testing.assert_array_equal(sitk.GetArrayFromImage(im), sitk.GetArrayFromImage(src))


def test_split_is_deterministic():
    ids = [f"c{i:03d}" for i in range(50)]
    a = split_cases(ids, seed=5, test_fraction=0.2)
    assert a == split_cases(list(reversed(ids)), seed=5, test_fraction=0.2)
    assert sum(v == "test" for v in a.values()) == 10
    assert a != split_cases(ids, seed=6, test_fraction=0.2)
    assert sum(v == "test" for v in split_cases(ids, seed=5, n_test=7).values()) == 7
    with pytest.raises(StoreError, match="n_test=50"):
        split_cases(ids, n_test=50)
    with pytest.raises(StoreError, match="test_fraction"):
        split_cases(ids, test_fraction=1.0)


def test_same_split_in_two_stores(small_phantom, phantom_store, tmp_path):
    ingest(small_phantom, tmp_path / "b", n_test=3, seed=1, progress=False)
    a, b = PoolStore.open(phantom_store[0]), PoolStore.open(tmp_path / "b")
    assert a.case_ids("test") == b.case_ids("test")


def test_reingest_is_noop_and_changes_are_refused(small_phantom, tmp_path):
    out = tmp_path / "s"
    ingest(small_phantom, out, n_test=2, progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = ingest(small_phantom, out, n_test=2, progress=False)
    assert again.reused and again.n_cases == 10 and again.n_test == 2
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps
    with pytest.raises(StoreError, match=r"different settings \(preprocess.pad_multiple: stored 8, requested 16\)"):
        ingest(small_phantom, out, PreprocessConfig(pad_multiple=16), n_test=2, progress=False)
    with pytest.raises(StoreError, match=r"split.seed: stored 0, requested 1"):
        ingest(small_phantom, out, n_test=2, seed=1, progress=False)


def test_changed_input_is_refused(phantom_copy, tmp_path):
    out = tmp_path / "s"
    ingest(phantom_copy, out, progress=False)
    img, lbl = blob_case(np.random.default_rng(1), shape=(24, 24, 24))
    write_image(phantom_copy / "imagesTr" / "phantom_000.nii.gz", img)
    with pytest.raises(StoreError, match="different input data"):
        ingest(phantom_copy, out, progress=False)


def test_refuses_foreign_folder(small_phantom, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="holds no store.json"):
        ingest(small_phantom, tmp_path / "x", progress=False)
    assert (tmp_path / "x" / "notes.txt").read_text() == "mine"


def test_bad_case_fails_atomically(phantom_copy, tmp_path):
    bad = phantom_copy / "labelsTr" / "phantom_007.nii.gz"
    bad.write_bytes(b"garbage")
    out = tmp_path / "stores" / "store"
    with pytest.raises(DatasetError, match=r"phantom_007\.nii\.gz: unreadable or corrupt label file"):
        ingest(phantom_copy, out, progress=False)
    assert not out.exists() and os.listdir(tmp_path / "stores") == []  # no store, no temporary left behind
    with pytest.raises(StoreError, match="not a complete pool store"):
        PoolStore.open(out)


def test_interrupted_ingest_leaves_nothing(small_phantom, tmp_path, monkeypatch):
    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return preprocess_case(*args, **kwargs)

    monkeypatch.setattr(store_mod, "preprocess_case", boom)
    with pytest.raises(KeyboardInterrupt):
        ingest(small_phantom, tmp_path / "store", progress=False)
    assert os.listdir(tmp_path) == []


def test_incomplete_store_is_not_opened(phantom_store, tmp_path):
    copy = shutil.copytree(phantom_store[0], tmp_path / "copy")
    (copy / "shards" / "shard-00000.arrow").unlink()
    with pytest.raises(StoreError, match="incomplete store, missing shard-00000.arrow"):
        PoolStore.open(copy)
    info = json.loads((copy / "store.json").read_text())
    info["complete"] = False
    (copy / "store.json").write_text(json.dumps(info))
    with pytest.raises(StoreError, match="not a complete raylearn pool store"):
        PoolStore.open(copy)


def test_skip_bad_lists_skipped_cases(phantom_copy, tmp_path):
    (phantom_copy / "imagesTr" / "phantom_001.nii.gz").write_bytes(b"\x1f\x8b garbage")
    (phantom_copy / "labelsTr" / "phantom_003.nii.gz").unlink()
    lbl_path = phantom_copy / "labelsTr" / "phantom_005.nii.gz"
    lbl = sitk.ReadImage(str(lbl_path))
    arr = sitk.GetArrayFromImage(lbl)
    arr[0, 0, 0] = 9
    fixed = sitk.GetImageFromArray(arr)
    fixed.CopyInformation(lbl)
    sitk.WriteImage(fixed, str(lbl_path))
    report = ingest(phantom_copy, tmp_path / "s", skip_bad=True, progress=False)
    assert report.n_cases == 7
    reasons = dict(report.skipped)
    assert sorted(reasons) == ["phantom_001", "phantom_003", "phantom_005"]
    assert "unreadable or corrupt image file" in reasons["phantom_001"]
    assert "label file missing" in reasons["phantom_003"]
    assert "label values [9] not in dataset.json labels" in reasons["phantom_005"]
    assert "skipped:  3 bad case(s)" in report.summary()
    assert "phantom_003" not in PoolStore.open(tmp_path / "s")


def test_unlabeled_and_multichannel(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "Dataset007_Two"
    for cid, shape in (("a", (10, 12, 14)), ("b", (9, 16, 11))):
        img, lbl = blob_case(rng, shape=shape)
        write_image(root / "imagesTr" / f"{cid}_0000.mha", img)
        write_image(root / "imagesTr" / f"{cid}_0001.mha", img * 3)
        write_image(root / "labelsTr" / f"{cid}.mha", lbl)
    meta = {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "x": 1, "y": 2}, "file_ending": ".mha"}
    (root / "dataset.json").write_text(json.dumps(meta))
    store = PoolStore.open(ingest(root, tmp_path / "s", n_test=0, progress=False).out_dir)
    assert store.num_channels == 2 and store.case_ids("test") == []
    a, b = store.get("a"), store.get("b")
    assert a.image.shape == (2, 16, 16, 16) and b.image.shape == (2, 16, 16, 16)

    folder = tmp_path / "unlabeled"
    write_image(folder / "images" / "u1.nii.gz", blob_case(rng)[0])
    write_image(folder / "images" / "u2.nii.gz", blob_case(rng, shape=(20, 9, 9))[0])
    s2 = PoolStore.open(ingest(folder, tmp_path / "s2", n_test=0, progress=False).out_dir)
    case = s2.get("u2")
    assert case.label is None and case.image.shape == (1, 24, 16, 16)


def test_real_hippocampus_cases(hippocampus_dir, tmp_path):
    root = tmp_path / "hippo"
    meta = json.loads((hippocampus_dir / "dataset.json").read_text())
    meta["training"] = meta["training"][:6]
    for entry in meta["training"]:
        for key in ("image", "label"):
            dst = root / entry[key]
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(hippocampus_dir / entry[key], dst)
    meta["numTraining"] = 6
    (root / "dataset.json").write_text(json.dumps(meta))
    report = ingest(root, tmp_path / "s", n_test=2, progress=False)
    assert report.n_cases == 6 and report.n_test == 2
    store = PoolStore.open(tmp_path / "s")
    assert store.labels == {0: "background", 1: "Anterior", 2: "Posterior"}
    shapes = set()
    for cid in store.case_ids():
        case = store.get(cid)
        shapes.add(case.shape)
        assert all(n % 8 == 0 for n in case.shape) and set(np.unique(case.label)) == {0, 1, 2}
        src = sitk.ReadImage(str(root / "labelsTr" / f"{cid}.nii.gz"))
        back = store.restore(cid, case.label)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(src))
        assert back.GetOrigin() == src.GetOrigin() and back.GetDirection() == src.GetDirection()
    assert len(shapes) > 1  # variable shapes side by side


def test_concurrent_ingest_of_the_same_store(small_phantom, tmp_path, monkeypatch):
    """A second ingest that finishes after another one filled OUT returns that store instead of failing."""
    out = tmp_path / "s"
    ingest(small_phantom, out, progress=False)
    real = store_mod.check_existing
    calls = []

    def first_sees_nothing(*args):
        calls.append(1)
        return None if len(calls) == 1 else real(*args)

    monkeypatch.setattr(store_mod, "check_existing", first_sees_nothing)
    report = ingest(small_phantom, out, progress=False)
    assert report.reused and len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # the loser's temporary folder is gone
    assert len(PoolStore.open(out)) == 10


@pytest.mark.slow
def test_full_hippocampus_ingest(hippocampus_dir, tmp_path):
    """All 201 real cases through the CLI entry point (about 5-10 s on 2 cores)."""
    from raylearn.cli import main

    assert main(["ingest", str(hippocampus_dir), str(tmp_path / "s"), "--n-test", "41"]) == 0
    store = PoolStore.open(tmp_path / "s")
    assert len(store) == 201 and len(store.case_ids("test")) == 41
    assert store.manifest["class_voxels"].map(lambda v: v[1] > 0 and v[2] > 0).all()
