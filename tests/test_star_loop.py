"""STAR end to end: ``raylearn run`` with ``unit: slice``, ``cold_start: even_slices`` and ``strategy: star`` on
tiny phantoms (the pattern of tests/test_loop.py), then a resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raylearn.experiment import load_experiment
from raylearn.ledger import Ledger
from raylearn.units import parse_unit
from tests.test_loop import REPO, TINY

STAR_PARAMS = {"spacing": 10, "n_pseudo": 6, "width": 2, "stage1_steps": 3, "stage2_steps": 3, "lr1": 1e-3,
               "lr2": 1e-3}


def star_config(tmp_path: Path, name: str = "run") -> Path:
    data = json.loads(json.dumps(TINY))
    data.update(output_dir=str(tmp_path / name), unit={"kind": "slice", "axis": 0},
                cold_start={"strategy": "even_slices", "size": 6},
                strategy={"name": "star", "params": STAR_PARAMS}, schedule={"rounds": 1, "batch_size": 4})
    data["data"]["store"] = str(tmp_path / "store")
    data["train"] = {**data["train"], "first_round_steps": 6, "steps": 4}
    data["evaluate"] = {"hd95": False}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def star_run(ray_session, tmp_path_factory):
    from raylearn.loop import run_experiment

    tmp = tmp_path_factory.mktemp("star")
    path = star_config(tmp)
    return tmp, path, run_experiment(load_experiment(path), progress=False)


@pytest.mark.slow  # Ray Train + the shards + two pseudo-labelling stages in Ray tasks: about 2 minutes on 2 cores
def test_star_run_end_to_end_and_resume(star_run):
    from raylearn.loop import run_experiment

    _, path, res = star_run
    r0, r1 = res.rounds
    assert [r["n_labeled"] for r in res.rounds] == [6, 10]
    # the cold start: grid slices (every 10th along axis 0 of the 24^3 phantoms), one case after another
    assert all(parse_unit(u).index in (0, 10, 20) for u in r0["selected"])
    chosen = r0["selected"] + r1["selected"]
    assert len(set(chosen)) == 10 and all(parse_unit(u).axis == 0 for u in chosen)
    # both rounds ran STAR's stage: pseudo-labels (at most n_pseudo slices of 24 x 24 voxels) and scores
    ledger = Ledger(res.output_dir / "ledger.jsonl")
    for k, r in enumerate(res.rounds):
        prop = ledger.propagation(k)
        assert r["propagation"]["pseudo_voxels"] == prop["pseudo_voxels"]
        assert 0 < prop["pseudo_voxels"] <= STAR_PARAMS["n_pseudo"] * 24 * 24 and prop["n_scores"] > 0
        assert prop["info"]["kept"] <= STAR_PARAMS["n_pseudo"]
    # round 1 queried by propagation_score: every pick off the grid had a score
    scores = json.loads(Path(ledger.propagation(0)["scores_path"]).read_text())["unit_scores"]
    assert all(u in scores or parse_unit(u).index % 10 == 0 for u in r1["selected"])
    ckpts = sorted((res.output_dir / "propagation").glob("round_*/star_round*.pt"))
    assert [p.parent.name for p in ckpts] == ["round_00", "round_01"]
    assert 0.0 <= r1["metrics"]["dice_mean"] <= 1.0

    # resuming the finished run recomputes nothing (the stages are re-used from the ledger)
    again = run_experiment(load_experiment(path), resume=True, progress=False)
    assert [r["selected"] for r in again.rounds] == [r["selected"] for r in res.rounds]


@pytest.mark.slow  # a subprocess killed after round 0's pseudo-labelling stage started: minutes
def test_star_run_killed_then_resumed_reaches_the_same_selections(star_run):
    """`raylearn run` killed with SIGKILL once round 0's STAR checkpoint exists (mid-stage or just after) resumes,
    re-runs or re-uses the stage from the same starting weights, and selects what the uninterrupted run selected."""
    from raylearn.loop import run_experiment

    tmp, _, ref = star_run
    path = star_config(tmp, "killed")
    out = tmp / "killed"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "raylearn.cli", "run", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 400
    try:
        while time.time() < deadline:
            if list((out / "propagation").glob("round_00/star_round0000.pt")):
                break
            if proc.poll() is not None:
                pytest.fail(f"run exited early with {proc.returncode}")
            time.sleep(0.1)
        else:
            pytest.fail("round 0's pseudo-labelling stage never wrote its checkpoint")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray cluster it started
        proc.wait()
    assert len(Ledger(out / "ledger.jsonl").rounds()) == 0, "the kill should land before round 0 finished"
    res = run_experiment(load_experiment(path), resume=True, progress=False)
    assert [r["selected"] for r in res.rounds] == [r["selected"] for r in ref.rounds]


def test_the_example_config_validates():
    """deployments/star_hippocampus.yaml: slice units on axis 0, STAR with its parameters, even_slices cold start
    of the whole grid (666 = sum of ceil(n / 10) over the 161 pool cases' 32-48 stored slices on axis 0)."""
    from raylearn.strategies import build_strategy

    cfg = load_experiment(REPO / "deployments" / "star_hippocampus.yaml")
    assert (cfg.unit.kind, cfg.unit.axis) == ("slice", 0)
    star = build_strategy(cfg.strategy.name, **cfg.strategy.params)
    cold = build_strategy(cfg.cold_start.strategy, **cfg.cold_start.params)
    assert star.spacing == cold.spacing == 10 and cfg.cold_start.size == 666
