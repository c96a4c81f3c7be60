"""nnU-Net v2 backend: raw export (fast), and two real training rounds on hippocampus cases (slow)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from raylearn.config import ConfigError, parse_config
from raylearn.models.config import ModelConfig, NnUNetConfig, TrainConfig


def _subset_dataset(src, dst, n):
    """An MSD-layout dataset folder holding the first ``n`` cases of ``src`` (symlinks)."""
    meta = json.loads((src / "dataset.json").read_text())
    meta["training"] = meta["training"][:n]
    meta["numTraining"] = n
    for sub in ("imagesTr", "labelsTr"):
        (dst / sub).mkdir(parents=True)
    for entry in meta["training"]:
        for key in ("image", "label"):
            rel = entry[key].removeprefix("./")
            os.symlink(src / rel, dst / rel)
    (dst / "dataset.json").write_text(json.dumps(meta))
    return dst


@pytest.fixture(scope="module")
def phantom_store(tmp_path_factory):
    from raylearn.data.phantom import make_phantom_dataset
    from raylearn.data.store import PoolStore, ingest

    root = tmp_path_factory.mktemp("nnunet_phantoms")
    make_phantom_dataset(root / "raw", n_cases=4, shape=(24, 24, 24), seed=1, spacing=(2.0, 1.0, 1.0))
    ingest(root / "raw", root / "store", n_test=0, seed=0, progress=False)
    return PoolStore.open(root / "store")


def test_export_raw_dataset_writes_nnunet_layout(phantom_store, tmp_path, monkeypatch):
    from raylearn.models.nnunet import export_raw_dataset

    cfg = NnUNetConfig(dataset_id=7, dataset_name="Demo")
    ids = phantom_store.case_ids()
    assert export_raw_dataset(phantom_store, ids[:2], tmp_path, cfg) == ids[:2]
    assert export_raw_dataset(phantom_store, ids[:3], tmp_path, cfg) == ids[2:3]  # only new cases
    folder = tmp_path / "Dataset007_Demo"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
    assert meta["labels"] == {"background": 0, **{v: k for k, v in phantom_store.labels.items() if k}}
    case = phantom_store.get(ids[0])
    img = sitk.ReadImage(str(folder / "imagesTr" / f"{ids[0]}_0000.nii.gz"))
    np.testing.assert_allclose(sitk.GetArrayFromImage(img), case.image[0], atol=1e-6)
    assert img.GetSpacing() == pytest.approx(tuple(reversed(case.spacing)))
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / f"{ids[0]}.nii.gz")))
    np.testing.assert_array_equal(lab, case.label)
    # nnU-Net's own lookup reads the listed files and starts no process (its fallback, a fork-context Pool of 12,
    # hung inside a Ray worker)
    pytest.importorskip("nnunetv2")
    from nnunetv2.utilities import utils as nn_utils

    def no_pool(*_a, **_k):
        raise AssertionError("nnU-Net started a process pool to find the files")

    monkeypatch.setattr(nn_utils, "Pool", no_pool)
    found = nn_utils.get_filenames_of_train_images_and_targets(str(folder), meta)
    assert sorted(found) == ids[:3]
    assert found[ids[0]] == {"images": [str(folder / "imagesTr" / f"{ids[0]}_0000.nii.gz")],
                             "label": str(folder / "labelsTr" / f"{ids[0]}.nii.gz")}


def test_nnunet_config_validation():
    cfg = parse_config({"backend": "nnunet", "nnunet": {"configuration": "3d_lowres", "epochs": 5}}, ModelConfig)
    assert cfg.nnunet.epochs == 5 and cfg.nnunet.iterations_per_epoch == 100
    with pytest.raises(ConfigError, match="nnunet.dataset_id"):
        parse_config({"nnunet": {"dataset_id": 1000}}, ModelConfig)
    with pytest.raises(ConfigError, match="nnunet.epoch: unknown key"):
        parse_config({"nnunet": {"epoch": 5}}, ModelConfig)


@pytest.fixture(scope="module")
def two_rounds(ray_session, hippocampus_dir, tmp_path_factory):
    """Round 0 (plans made) and round 1 (warm start, same plans) on real hippocampus cases, tiny schedule."""
    from raylearn.data.store import PoolStore, ingest
    from raylearn.train import fit_round_nnunet as fit_round

    root = tmp_path_factory.mktemp("nnunet_hippo")
    ingest(_subset_dataset(hippocampus_dir, root / "raw", 9), root / "store", n_test=1, seed=0, progress=False)
    store = PoolStore.open(root / "store")
    ids = store.case_ids("pool")
    nn = {"epochs": 1, "iterations_per_epoch": 2, "val_iterations_per_epoch": 1, "batch_size": 2,
          "work_dir": str(root / "nnunet")}
    train = TrainConfig(storage_path=str(root / "runs"), val_fraction=0.25)
    r0 = fit_round(store, ids[:5], None, ModelConfig(backend="nnunet", nnunet=nn), train, round_index=0)
    # round 1: near-zero learning rate, so its weights must stay those it was warm-started from
    cfg1 = ModelConfig(backend="nnunet", nnunet={**nn, "initial_lr": 1e-9})
    r1 = fit_round(store, ids[:8], r0.checkpoint_path, cfg1, train, round_index=1)
    return store, r0, r1


@pytest.mark.slow
def test_plans_fixed_at_round_zero_and_reused(two_rounds):
    store, r0, r1 = two_rounds
    assert r0.extra["planned"] and not r1.extra["planned"]
    assert r0.extra["plans_sha256"] == r1.extra["plans_sha256"]
    assert len(r0.extra["preprocessed"]) == 5 and len(r1.extra["preprocessed"]) == 3  # only new cases
    assert [h["epoch"] for h in r1.history] == [1] and 0.0 <= r1.best_val_dice <= 1.0


@pytest.mark.slow
def test_second_round_warm_starts_from_first(two_rounds):
    from raylearn.models.nnunet import NnUNetSegmenter

    _, r0, r1 = two_rounds
    w0 = NnUNetSegmenter.read_bundle(r0.checkpoint_path)["network_weights"]
    w1 = NnUNetSegmenter.read_bundle(r1.checkpoint_path)["network_weights"]
    assert max(float((w1[k].float() - w0[k].float()).abs().max()) for k in w0) < 1e-4


@pytest.mark.slow
def test_nnunet_segmenter_contract(two_rounds, tmp_path):
    from raylearn.models.loading import load_segmenter
    from raylearn.models.nnunet import NnUNetSegmenter

    store, _, r1 = two_rounds
    seg = load_segmenter(r1.checkpoint_path, device="cpu")
    assert isinstance(seg, NnUNetSegmenter) and (seg.in_channels, seg.num_classes) == (1, 3)
    case = store.get(store.case_ids("test")[0])
    p = seg.predict_proba(case.image)
    assert p.shape == (3, *case.image.shape[1:]) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=0), 1.0, atol=1e-4)
    assert seg.predict_label(case.image).shape == case.label.shape
    back = NnUNetSegmenter.load(seg.save(tmp_path / "copy.pt"), device="cpu")
    np.testing.assert_array_equal(back.predict_proba(case.image), p)
    e = seg.embed(case.image)
    assert e.ndim == 1 and np.all(np.isfinite(e))
    assert not np.allclose(seg.embed(case.image, weights=(case.label > 0).astype(np.float32) + 1e-3), e)
    with pytest.raises(NotImplementedError):
        seg.predict_mc(case.image, 2)
    with pytest.raises(ValueError, match="image must be"):
        seg.predict_proba(case.image[0])
    assert torch.is_tensor(next(iter(seg.state_dict().values())))
