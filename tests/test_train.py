"""fit_round with Ray Train on phantom cases: DDP on 2 CPU workers, recovery from a killed worker, warm start."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raylearn.models.config import ModelConfig, TrainConfig
from raylearn.models.training import dice_sums
from raylearn.models.unet import MonaiSegmenter
from raylearn.train import FAIL_ENV, fit_round

MODEL = ModelConfig(channels=(8, 16, 32), strides=(2, 2), num_res_units=1, patch_size=(16, 16, 16))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from raylearn.data.phantom import make_phantom_dataset
    from raylearn.data.store import PoolStore, ingest

    root = tmp_path_factory.mktemp("phantoms")
    make_phantom_dataset(root / "raw", n_cases=8, shape=(32, 32, 32), seed=0)
    ingest(root / "raw", root / "store", n_test=2, seed=0, progress=False)
    return PoolStore.open(root / "store")


def test_ddp_two_workers_survive_a_killed_worker(ray_session, store, tmp_path, monkeypatch):
    ids = store.case_ids("pool")
    marker = tmp_path / "killed.txt"
    monkeypatch.setenv(FAIL_ENV, f"{marker}:1")  # rank 0 dies during the second epoch, once
    cfg = TrainConfig(
        epochs=3, iterations_per_epoch=3, batch_size=2, num_workers=2, max_failures=1, val_fraction=0.34,
        storage_path=str(tmp_path / "runs"), seed=0,
    )
    res = fit_round(store, ids, None, MODEL, cfg, round_index=0)

    assert marker.is_file(), "fault injection did not fire"
    assert res.restarts == 1
    assert [h["epoch"] for h in res.history] == [1, 2, 3]
    assert [h["attempt"] for h in res.history] == [0, 1, 1]  # epochs 2-3 ran after the restart from epoch 1
    assert all(h["ddp_param_spread"] == 0.0 for h in res.history), "DDP replicas diverged"
    assert len(res.val_ids) == 2 and not set(res.val_ids) & set(res.train_ids) and not res.val_on_train
    assert res.checkpoint_path == tmp_path / "runs" / "round_000" / "best.pt" and res.checkpoint_path.is_file()
    assert res.best_val_dice == max(h["val_dice"] for h in res.history)

    # the saved best model really is the one that scored best_val_dice on the validation cases
    seg = MonaiSegmenter.load(res.checkpoint_path, device="cpu")
    sums, counts = np.zeros(2), np.zeros(2)
    for cid in res.val_ids:
        case = store.get(cid)
        s, c = dice_sums(torch.from_numpy(seg.predict_label(case.image).astype(np.int64)),
                         torch.from_numpy(case.label.astype(np.int64)), 3)
        sums, counts = sums + s, counts + c
    assert sums.sum() / counts.sum() == pytest.approx(res.best_val_dice, abs=1e-4)


def test_warm_start_loads_the_given_weights(ray_session, store, tmp_path):
    init = MonaiSegmenter(MODEL, in_channels=1, num_classes=3, seed=123, device="cpu")
    init_path = init.save(tmp_path / "init.pt")
    cfg = TrainConfig(epochs=1, iterations_per_epoch=2, batch_size=1, lr=1e-10, storage_path=str(tmp_path / "runs"))
    ids = store.case_ids("pool")[:3]
    stale = tmp_path / "runs" / "round_004" / "stale.txt"  # an old run of the same name is not resumed
    stale.parent.mkdir(parents=True)
    stale.write_text("old")
    res = fit_round(store, ids, init_path, MODEL, cfg, round_index=4)
    assert res.val_on_train and res.checkpoint_path.parent.name == "round_004"
    assert not stale.exists() and len(res.history) == 1

    trained = MonaiSegmenter.load(res.checkpoint_path, device="cpu").state_dict()
    start = init.state_dict()
    cold = MonaiSegmenter(MODEL, 1, 3, seed=cfg.seed, device="cpu").state_dict()  # what a cold start begins from
    diff_init = max(float((trained[k] - start[k]).abs().max()) for k in start)
    diff_cold = max(float((trained[k] - cold[k]).abs().max()) for k in cold)
    assert diff_init < 1e-6 < 1e-2 < diff_cold


def test_bad_requests_fail_before_training(ray_session, store, tmp_path):
    cfg = TrainConfig(storage_path=str(tmp_path))
    with pytest.raises(ValueError, match="not in the pool store: \\['nope'\\]"):
        fit_round(store, ["nope"], None, MODEL, cfg)
    other = MonaiSegmenter(ModelConfig(channels=(8, 16, 64), strides=(2, 2), patch_size=(16, 16, 16)), 1, 3)
    path = other.save(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="model.channels"):
        fit_round(store, store.case_ids("pool")[:2], path, MODEL, cfg)
    two_class = MonaiSegmenter(MODEL, 1, 2).save(tmp_path / "two.pt")
    with pytest.raises(ValueError, match="num_classes=2"):
        fit_round(store, store.case_ids("pool")[:2], two_class, MODEL, cfg)
