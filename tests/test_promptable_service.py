"""The promptable model's phase of the persistent training service: the same worker fine-tunes SAM-Med3D after
each segmenter round, warm across rounds, and publishes a loadable checkpoint per round (real Ray Train)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from raylearn.models.config import ModelConfig, TrainConfig, resolve_model_config
from raylearn.models.promptable import PromptableConfig
from raylearn.models.promptable_train import load_promptable
from raylearn.train import TrainingService, TrainingServiceError

TINY = ModelConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
PROMPT = PromptableConfig(enabled=True, first_round_steps=6, steps=4, batch_size=1, clicks=2)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from raylearn.data.phantom import make_phantom_dataset
    from raylearn.data.store import PoolStore, ingest

    root = tmp_path_factory.mktemp("phantoms")
    make_phantom_dataset(root / "raw", n_cases=8, shape=(24, 24, 24), seed=0)
    ingest(root / "raw", root / "store", n_test=2, seed=0, progress=False)
    return PoolStore.open(root / "store")


def _state(blob: bytes) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)["model_state_dict"]


def test_promptable_phase_follows_each_round_on_the_same_worker(ray_session, store, tmp_path):
    ids = store.case_ids("pool")
    cfg = TrainConfig(first_round_steps=4, steps=2, batch_size=2, checkpoint_every=4, log_every=2)
    model = resolve_model_config(TINY, list(store.manifest["shape"]))
    with TrainingService(store, model, cfg, total_steps=6, storage_path=tmp_path, promptable=PROMPT) as svc:
        svc.submit_round(0, ids[:2])
        svc.wait_round(0)
        p0 = svc.wait_promptable(0)
        svc.submit_round(1, ids[:4])
        svc.wait_round(1)
        p1 = svc.wait_promptable(1)
        status = svc.status()
    # one worker process trained both models in both rounds; the promptable model continued warm
    assert len(status["workers"]) == 1 and status["promptable_finished"] == [0, 1]
    assert (p0.info["steps_done"], p1.info["steps_done"]) == (6, 10)
    assert (p0.info["n_train"], p1.info["n_train"]) == (2, 4)
    assert p0.info["version"] != p1.info["version"] and p1.info["version"].startswith("r01")
    w0, w1 = _state(p0.checkpoint), _state(p1.checkpoint)
    assert max(float((w0[k] - w1[k]).abs().max()) for k in w0) > 0
    sam = load_promptable(p1.save(tmp_path / "promptable_round_01.pt"))
    assert sam.cfg.preset == "small" and sam.cfg.target_spacing_mm == 1.5 and sam.checkpoint_sha256
    emb = sam.encode(np.zeros((1, sam.image_size, sam.image_size, sam.image_size), np.float32))
    assert np.isfinite(emb).all()


def test_wait_promptable_without_the_phase_is_a_clear_error(store, tmp_path):
    model = resolve_model_config(TINY, list(store.manifest["shape"]))
    svc = TrainingService(store, model, TrainConfig(), total_steps=1, storage_path=tmp_path)
    with pytest.raises(TrainingServiceError, match="promptable.enabled is false"):
        svc.wait_promptable(0)
