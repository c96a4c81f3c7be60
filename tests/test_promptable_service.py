"""The promptable model's phase of the persistent training service: the same worker fine-tunes SAM-Med3D after
each segmenter round, warm across rounds, and publishes a loadable checkpoint per round (real Ray Train)."""

from __future__ import annotations

import io
from pathlib import Path

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


@pytest.mark.slow
def test_a_run_fine_tunes_the_promptable_model_each_round_and_measures_it(ray_session, tmp_path):
    """``raylearn run`` with ``promptable.enabled``: per-round promptable checkpoints beside the segmenter's, in the
    ledger, and the (a)/(b)/(c) table, CSV and PNG in the run's folder."""
    import csv

    from raylearn.config import parse_config
    from raylearn.experiment import ExperimentConfig
    from raylearn.loop import run_experiment

    cfg = parse_config({
        "name": "tiny-promptable", "seed": 1, "output_dir": str(tmp_path / "run"),
        "data": {"dataset": "phantom", "phantom": {"n_cases": 10, "shape": [24, 24, 24], "seed": 1}, "n_test": 2,
                 "store": str(tmp_path / "store")},
        "cold_start": {"strategy": "random", "size": 2}, "strategy": {"name": "random"},
        "schedule": {"rounds": 1, "batch_size": 2},
        "model": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
        "train": {"first_round_steps": 4, "steps": 2, "batch_size": 2, "log_every": 2, "checkpoint_every": 4},
        "pool": {"n_shards": 1, "num_cpus": 0.25, "progress": False},
        "evaluate": {"hd95": False},
        "promptable": {"enabled": True, "first_round_steps": 4, "steps": 2, "batch_size": 1, "clicks": 2,
                       "eval_clicks": 2},
    }, ExperimentConfig, source="test")
    res = run_experiment(cfg, progress=False)
    out = res.output_dir
    infos = [r["train_info"]["promptable"] for r in res.rounds]
    assert [i["steps_done"] for i in infos] == [4, 6]
    assert [Path(i["checkpoint"]).name for i in infos] == ["promptable_round_00.pt", "promptable_round_01.pt"]
    assert all(Path(i["checkpoint"]).parent == Path(r["checkpoint"]).parent
               for i, r in zip(infos, res.rounds, strict=True))
    rows = list(csv.DictReader((out / "p2p_rounds.csv").open()))
    assert [(int(r["round"]), r["method"]) for r in rows] == [(0, "a"), (0, "b"), (0, "c"), (1, "a"), (1, "b"),
                                                              (1, "c")]
    assert all(0.0 <= float(r["nsd_overall"]) <= 100.0 and 0.0 <= float(r["dice_mean"]) <= 1.0 for r in rows)
    assert (out / "p2p_rounds.png").stat().st_size > 0 and "(b) segmenter -> clicks" in (out / "p2p_rounds.md"
                                                                                           ).read_text()
    goals = res.summary["promptable"]["goals"]
    assert set(goals) >= {"b_beats_a_from_round_2", "c_at_most_20pct_last_round"}
