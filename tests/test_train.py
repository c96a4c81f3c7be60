"""The persistent training service on phantoms: one worker group for many rounds, warm rounds, labels that
grow mid-round, a worker killed mid-round that resumes exactly, and errors before any training."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from raylearn.models.config import ModelConfig, TrainConfig, resolve_model_config
from raylearn.models.unet import MonaiSegmenter
from raylearn.train import TrainingService

TINY = ModelConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=1)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from raylearn.data.phantom import make_phantom_dataset
    from raylearn.data.store import PoolStore, ingest

    root = tmp_path_factory.mktemp("phantoms")
    make_phantom_dataset(root / "raw", n_cases=10, shape=(24, 24, 24), seed=0)
    ingest(root / "raw", root / "store", n_test=2, seed=0, progress=False)
    return PoolStore.open(root / "store")


def _model(store) -> ModelConfig:
    return resolve_model_config(TINY, list(store.manifest["shape"]))


def _weights(blob: bytes) -> dict[str, torch.Tensor]:
    import io

    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)["state_dict"]


def _kill_once(rank, round_index, step, attempt):
    """Step hook: rank 0 dies at step 6 of round 1 on the first attempt (after the step-4 checkpoint)."""
    if rank == 0 and round_index == 1 and step == 5 and attempt == 0:
        time.sleep(3.0)  # let Ray Train collect the step-4 report before the process disappears
        os._exit(1)


def test_rounds_share_one_worker_group_and_continue_warm(ray_session, store, tmp_path):
    ids = store.case_ids("pool")
    cfg = TrainConfig(first_round_steps=6, steps=4, batch_size=2, warmup_steps=8, checkpoint_every=4, log_every=2)
    with TrainingService(store, _model(store), cfg, total_steps=14, storage_path=tmp_path) as svc:
        r0 = svc.fit_round(0, ids[:3])
        r1 = svc.fit_round(1, ids[:5])
        status = svc.status()
    # exactly one worker process served both rounds (no per-round worker group)
    assert len(status["workers"]) == 1 and status["finished"] == [0, 1]
    assert (r0.info["global_step"], r1.info["global_step"]) == (6, 10)
    assert (r0.info["n_train"], r1.info["n_train"], r1.info["cached_cases"]) == (3, 5, 5)
    # the warm-up spans rounds: round 1 starts where round 0's schedule stopped, it does not restart
    assert r0.info["lr"] < r1.info["lr"] == pytest.approx(cfg.lr)
    w0, w1 = _weights(r0.checkpoint), _weights(r1.checkpoint)
    assert max(float((w0[k] - w1[k]).abs().max()) for k in w0) > 0
    seg = MonaiSegmenter.load(r1.save(tmp_path / "r1.pt"), device="cpu")
    assert seg.predict_label(store.get(ids[0]).image).shape == store.get(ids[0]).image.shape[1:]


def test_labels_added_while_a_round_is_queued_are_trained(ray_session, store, tmp_path):
    ids = store.case_ids("pool")
    cfg = TrainConfig(first_round_steps=4, steps=4, batch_size=2, log_every=2)
    with TrainingService(store, _model(store), cfg, total_steps=4, storage_path=tmp_path) as svc:
        svc.submit_round(0, ids[:2])
        assert svc.extend_round(0, ids[2:4]) == 1
        res = svc.wait_round(0)
    assert res.info["labels_version"] == 1 and res.info["n_train"] == 4


def test_a_held_round_trains_past_its_budget_until_released(ray_session, store, tmp_path):
    """``hold``: the workers keep training on the labels they have (asynchronous labelling: the trainer does not
    idle while people label); released, the round ends a few polls later, at a multiple of the poll interval."""
    ids = store.case_ids("pool")
    cfg = TrainConfig(first_round_steps=4, steps=4, batch_size=2, log_every=2)
    with TrainingService(store, _model(store), cfg, total_steps=8, storage_path=tmp_path) as svc:
        svc.submit_round(0, ids[:2], hold=True)
        deadline = time.monotonic() + 120
        while (svc.status()["progress"].get("step") or 0) < 12 and time.monotonic() < deadline:
            with pytest.raises(TimeoutError):
                svc.wait_round(0, timeout_s=0.5)  # not done at its 4-step budget: held
        svc.extend_round(0, ids[2:3])
        svc.release_round(0)
        res = svc.wait_round(0, timeout_s=120)
        # a later round without hold stops at its budget
        r1 = svc.fit_round(1, ids[:4])
    n = res.info["trained_steps"]
    assert n >= 12 + 4 * cfg.label_poll_steps() and n % cfg.label_poll_steps() == 0
    assert res.info["steps"] == n and res.info["n_train"] == 3  # the label that came while it was held
    assert r1.info["trained_steps"] == 4


@pytest.mark.slow
def test_worker_killed_mid_round_resumes_from_its_checkpoint_exactly(ray_session, store, tmp_path):
    """Ray Train restarts the group; the round continues at step 4 and ends with the uninterrupted weights."""
    ids = store.case_ids("pool")
    cfg = TrainConfig(first_round_steps=4, steps=8, batch_size=2, checkpoint_every=4, log_every=4, max_failures=1)
    model = _model(store)
    results = {}
    for name, hook in (("plain", None), ("killed", _kill_once)):
        with TrainingService(store, model, cfg, total_steps=12, storage_path=tmp_path, name=name,
                             step_hook=hook) as svc:
            svc.fit_round(0, ids[:3])
            results[name] = (svc.fit_round(1, ids[:5]), svc.status())
    (plain, _), (killed, status) = results["plain"], results["killed"]
    assert len(status["workers"]) == 2, "the killed worker's group was restarted once"
    assert killed.info["attempt"] == 1 and killed.info["resumed_at_step"] == 4 and killed.info["trained_steps"] == 4
    assert plain.info["resumed_at_step"] == 0 and plain.info["global_step"] == killed.info["global_step"] == 12
    wp, wk = _weights(plain.checkpoint), _weights(killed.checkpoint)
    assert max(float((wp[k] - wk[k]).abs().max()) for k in wp) < 1e-5


def test_bad_requests_fail_before_training(ray_session, store, tmp_path):
    cfg = TrainConfig(steps=2)
    with pytest.raises(ValueError, match="resolved model config"):
        TrainingService(store, TINY, cfg, total_steps=2, storage_path=tmp_path)
    svc = TrainingService(store, _model(store), cfg, total_steps=2, storage_path=tmp_path)
    with pytest.raises(Exception, match="not running"):
        svc.submit_round(0, store.case_ids("pool")[:2])
    other = MonaiSegmenter(ModelConfig(channels=(4, 8, 32), strides=(2, 2), patch_size=(24, 24, 24)), 1, 3)
    path = other.save(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="model.channels"):
        TrainingService(store, _model(store), cfg, total_steps=2, storage_path=tmp_path, init_checkpoint=path).start()
    with pytest.raises(ValueError, match="not in the pool store: \\['nope'\\]"):
        svc.submit_round(0, ["nope"])  # checked before anything reaches the workers


def test_resolve_model_config_whole_volume_and_patches():
    shapes = [(35, 51, 35), (36, 47, 40)]
    m = resolve_model_config(ModelConfig(), shapes)
    assert m.patch_size == (40, 56, 40) and m.dropout == 0.0
    assert resolve_model_config(ModelConfig(), shapes, mc_dropout_needed=True).dropout == 0.1
    big = resolve_model_config(ModelConfig(whole_volume_max_voxels=1000, auto_patch_max=32), shapes)
    assert big.patch_size == (32, 32, 32)
    assert resolve_model_config(ModelConfig(dropout=0.2, patch_size=(16, 16, 16)), shapes).dropout == 0.2
    assert np.prod(m.patch_size) % 8 == 0
