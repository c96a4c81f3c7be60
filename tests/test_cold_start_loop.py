"""``cold_start: {strategy: urds}`` end to end: the extractor stage runs before round 0 inside ``raylearn run``."""

from __future__ import annotations

import json

import pytest
import yaml

from raylearn.experiment import load_experiment

CFG = {
    "name": "coldstart", "seed": 1,
    "data": {"dataset": "phantom", "phantom": {"n_cases": 10, "shape": [20, 20, 20], "seed": 2}, "n_test": 2},
    "cold_start": {"strategy": "urds", "size": 2,
                   "params": {"extractor": {"patch": 16, "channels": [4, 8, 8], "steps": 2, "batch_size": 1}}},
    "strategy": {"name": "urds"},
    "schedule": {"rounds": 1, "batch_size": 2},
    "model": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
    "train": {"first_round_steps": 2, "steps": 2, "batch_size": 2, "num_workers": 1},
    "pool": {"n_shards": 2, "num_cpus": 0.25, "progress": False},
    "evaluate": {"hd95": False},
}


@pytest.mark.slow  # two Ray Train runs (pretext + segmenter): about 1-2 min quiet, 6 min at load 25 on 2 cores
def test_urds_cold_start_in_run(ray_session, tmp_path):
    from raylearn.loop import run_experiment

    data = {**CFG, "output_dir": str(tmp_path / "run"), "data": {**CFG["data"], "store": str(tmp_path / "store")}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(data))
    res = run_experiment(load_experiment(tmp_path / "exp.yaml"), progress=False)
    assert [r["round"] for r in res.rounds] == [0, 1]
    assert len(res.rounds[0]["selected"]) == 2
    # round 0 chose on the extractor's features (recorded scores), round 1 on the segmenter's
    assert set(res.rounds[0]["scores"]) == {"csal3d_uncertainty"}
    assert set(res.rounds[1]["scores"]) == {"entropy"}
    caches = list((tmp_path / "store" / "extractors").glob("csal3d-*"))
    assert len(caches) == 1 and (caches[0] / "pretext.pt").is_file()
    meta = json.loads((caches[0] / "settings.json").read_text())
    assert meta["n_cases"] == 8 and meta["settings"]["steps"] == 2
