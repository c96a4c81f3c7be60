"""SBC-AL end to end: ``strategy: sbc`` with ``model: {arch: sbc_unet}`` through ``raylearn run`` on tiny
phantoms (the pattern of tests/test_loop.py, with a short round 0)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from raylearn.experiment import load_experiment
from tests.test_loop import TINY


@pytest.mark.slow  # a Ray Train run + sharded scoring: about a minute on 2 loaded cores
def test_sbc_run_end_to_end(ray_session, tmp_path):
    from raylearn.loop import run_experiment

    data = json.loads(json.dumps(TINY))
    data.update(output_dir=str(tmp_path / "run"), strategy={"name": "sbc", "params": {"w_boundary": 0.3}})
    data["data"]["store"] = str(tmp_path / "store")
    data["model"] = {**data["model"], "arch": "sbc_unet", "sbc": {"alpha": 1.0, "beta": 0.5, "gamma": 1.0}}
    data["train"] = {**data["train"], "first_round_steps": 6, "steps": 4}
    data["evaluate"] = {"hd95": False}
    path = tmp_path / "sbc.yaml"
    path.write_text(yaml.safe_dump(data))
    res = run_experiment(load_experiment(path), progress=False)

    assert [r["n_labeled"] for r in res.rounds] == [2, 4]
    r1 = res.rounds[1]
    assert len(set(r1["selected"])) == 2 and not set(r1["selected"]) & set(res.rounds[0]["selected"])
    assert 0.0 <= r1["metrics"]["dice_mean"] <= 1.0
    # the shards scored the pool (the sbc_consistency vectors are not kept in the ledger, only scalar scores)
    assert r1["timings"]["score_s"] > 0 and res.rounds[0]["timings"]["score_s"] < 0.01
    assert Path(r1["checkpoint"]).is_file()


def test_compare_refuses_sbc_on_a_model_without_heads(tmp_path):
    from raylearn.compare import compare
    from raylearn.config import ConfigError, parse_config
    from raylearn.experiment import ExperimentConfig

    base = parse_config({"data": {"dataset": "phantom"}, "model": {"arch": "unet"}}, ExperimentConfig)
    with pytest.raises(ConfigError, match=r"compare --strategies sbc: .*model.arch is 'unet'.*arch: sbc_unet"):
        compare(base, ["random", "sbc"], [0], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before any run started
