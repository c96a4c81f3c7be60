"""``cold_start: {strategy: urds}`` end to end: the extractor stage runs before round 0 inside ``raylearn run``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from raylearn.experiment import load_experiment
from tests.conftest import SAM_SMALL

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


def _tiny(tmp_path, cold_start: dict, strategy: dict) -> dict:
    """:data:`CFG` with its outputs under ``tmp_path`` and the given cold start and strategy."""
    return {**CFG, "output_dir": str(tmp_path / "run"), "data": {**CFG["data"], "store": str(tmp_path / "store")},
            "cold_start": cold_start, "strategy": strategy}


@pytest.mark.slow  # two Ray Train runs (pretext + segmenter): about 1-2 min quiet, 6 min at load 25 on 2 cores
def test_urds_cold_start_in_run(ray_session, tmp_path):
    from raylearn.loop import run_experiment

    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(_tiny(tmp_path, CFG["cold_start"], CFG["strategy"])))
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


CSAL_SMALL = CFG["cold_start"]["params"]["extractor"]


@pytest.mark.slow  # SAM (random weights, 64 px) over the pool, then 2 strategies x 2 rounds: about 2 min quiet
def test_gscu_cold_start_in_compare(ray_session, tmp_path):
    """``cold_start: gscu`` at round 0 of ``raylearn compare``: SUGFW's extractor runs on the pool before round 0,
    every strategy starts from the same GSCU selection, and gscu's later rounds use the segmenter's features."""
    from raylearn.compare import compare
    from raylearn.config import parse_config
    from raylearn.experiment import ExperimentConfig
    from raylearn.ledger import Ledger

    cold = {"strategy": "gscu", "size": 2, "params": {"extractor": SAM_SMALL}}
    base = parse_config(_tiny(tmp_path, cold, {"name": "gscu"}), ExperimentConfig, source="test")
    res = compare(base, ["gscu", "random"], [0], tmp_path / "cmp")
    assert {r["strategy"] for r in res["rows"]} == {"gscu", "random"}
    runs = {s: Ledger(tmp_path / "cmp" / s / "seed_0" / "ledger.jsonl", readonly=True).rounds()
            for s in ("gscu", "random")}
    assert all([r["round"] for r in rounds] == [0, 1] for rounds in runs.values())
    assert runs["gscu"][0]["selected"] == runs["random"][0]["selected"]  # the shared GSCU cold start
    assert set(runs["gscu"][0]["scores"]) == {"sugfw_uncertainty"}
    assert set(runs["gscu"][1]["scores"]) == {"entropy"}  # source auto: the segmenter's after round 0
    assert len(list((tmp_path / "store" / "extractors").glob("sugfw-*"))) == 1


@pytest.mark.slow  # 2 Tune trials, one with a CSAL-3D pretext run, one with SAM: about 3 min quiet
def test_urds_and_gscu_cold_starts_in_a_tune_sweep(ray_session, tmp_path):
    """Both cold starts as the grid of a real Ray Tune sweep: each trial runs its extractor stage (CSAL-3D's
    pretext model is a Ray Train run inside the trial) and its round 0 chooses on it."""
    from raylearn.config import load_config
    from raylearn.ledger import Ledger
    from raylearn.tune import SweepConfig, run_sweep

    base = _tiny(tmp_path, {"strategy": "random", "size": 2}, {"name": "random"})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    grid = [{"strategy": "urds", "size": 2, "params": {"extractor": CSAL_SMALL}},
            {"strategy": "gscu", "size": 2, "params": {"extractor": SAM_SMALL}}]
    sweep = {"experiment": "base.yaml", "output_dir": str(tmp_path / "sweep"), "name": "cold", "metric": "alc",
             "max_concurrent_trials": 2, "resources_per_trial": {"cpu": 1},
             "search_space": {"cold_start": {"grid": grid}}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    res = run_sweep(load_config(tmp_path / "sweep.yaml", SweepConfig), str(tmp_path / "sweep.yaml"))
    rows = res["rows"]
    assert len(rows) == 2 and all(r["status"] == "ok" and r["rounds"] == 2 for r in rows), rows
    first = {r["cold_start"]["strategy"]: Ledger(Path(r["run_dir"]) / "ledger.jsonl", readonly=True).rounds()[0]
             for r in rows}
    assert set(first["urds"]["scores"]) == {"csal3d_uncertainty"}
    assert set(first["gscu"]["scores"]) == {"sugfw_uncertainty"}
