"""The AL loop end to end on tiny phantoms: rounds, outputs, refusal rules, kill -9 mid-training and resume,
and that the loop learns."""

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

from raylearn.config import ConfigError
from raylearn.experiment import load_experiment
from raylearn.ledger import Ledger

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "name": "tiny",
    "seed": 3,
    "data": {"dataset": "phantom", "phantom": {"n_cases": 14, "shape": [24, 24, 24], "seed": 1}, "n_test": 4},
    "cold_start": {"strategy": "random", "size": 2},
    "strategy": {"name": "least_confidence"},
    "schedule": {"rounds": 1, "batch_size": 2},
    "model": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
    "train": {"first_round_steps": 20, "steps": 4, "batch_size": 2, "checkpoint_every": 10, "log_every": 5,
              "num_workers": 1},
    "pool": {"n_shards": 2, "num_cpus": 0.25, "progress": False},
    "evaluate": {"hd95": True},
}


# the kill -9 test's round 0: long enough (and checkpointed often enough) for the kill to land mid-training
LONG_TRAIN = {**TINY["train"], "first_round_steps": 300, "checkpoint_every": 5}


def _config(tmp: Path, out: Path, store: Path, **over) -> Path:
    data = json.loads(json.dumps(TINY))
    data["output_dir"] = str(out)
    data["data"]["store"] = str(store)
    for k, v in over.items():
        data[k] = v
    p = tmp / f"{out.name}.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.fixture(scope="module")
def reference_run(ray_session, tmp_path_factory):
    from raylearn.loop import run_experiment

    tmp = tmp_path_factory.mktemp("loop")
    cfg_path = _config(tmp, tmp / "ref", tmp / "store")
    res = run_experiment(load_experiment(cfg_path), progress=False)
    return tmp, cfg_path, res


def test_loop_end_to_end(reference_run):
    tmp, _, res = reference_run
    assert [r["round"] for r in res.rounds] == [0, 1]
    assert [r["n_labeled"] for r in res.rounds] == [2, 4]
    chosen = [c for r in res.rounds for c in r["selected"]]
    assert len(chosen) == len(set(chosen)) == 4
    test_ids = set(Ledger(res.output_dir / "ledger.jsonl").header()["test_ids"])
    assert not test_ids & set(chosen)
    for r in res.rounds:
        m = r["metrics"]
        assert 0.0 <= m["dice_mean"] <= 1.0 and ("symdiff_pct_mean" in m or "nsd_mean" in m)
        assert Path(r["checkpoint"]).is_file()
        assert set(r["timings"]) >= {"train_s", "score_s", "select_s", "eval_s"}
    # round 0 is feature-free; round 1's scores were computed beside round 0's evaluation
    assert not res.rounds[0]["scores"] and res.rounds[1]["timings"]["score_s"] > 0
    # one training service for the run: round 1 continued round 0's steps, in the same worker process
    info0, info1 = res.rounds[0]["train_info"], res.rounds[1]["train_info"]
    assert (info0["global_step"], info1["global_step"]) == (20, 24)
    assert info1["resumed_at_step"] == 0 and info1["attempt"] == 0
    assert res.rounds[1]["scores"]["least_confidence"]
    out = res.output_dir
    assert (out / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    rows = (out / "rounds.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("round,n_labeled")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["n_labeled"] == 4 and 0 <= summary["alc"] <= 1


def test_existing_run_refused_without_resume_and_changed_config(reference_run, tmp_path):
    from raylearn.loop import run_experiment

    tmp, cfg_path, res = reference_run
    with pytest.raises(ConfigError, match="--resume"):
        run_experiment(load_experiment(cfg_path), progress=False)
    # resuming a finished run recomputes nothing and returns the same rounds
    again = run_experiment(load_experiment(cfg_path), resume=True, progress=False)
    assert [r["selected"] for r in again.rounds] == [r["selected"] for r in res.rounds]
    changed = load_experiment(cfg_path, {"schedule.batch_size": 3})
    with pytest.raises(ConfigError, match="schedule.batch_size"):
        run_experiment(changed, resume=True, progress=False)


#: `raylearn run` (raylearn.cli.main) with a training step hook that, at round 0's step ``KILL_AT``, drops a marker
#: and blocks: the test kills the process group at that known point, however fast or loaded the machine is
_KILLED_DRIVER = """
import sys, time
from pathlib import Path
import raylearn.loop
from raylearn.cli import main

marker, kill_at = sys.argv[1], int(sys.argv[2])

def hook(rank, rnd, step, attempt):
    if rnd == 0 and step == kill_at:
        Path(marker).write_text(str(step))
        time.sleep(3600)

run = raylearn.loop.run_experiment
raylearn.loop.run_experiment = lambda cfg, **kw: run(cfg, **{**kw, "step_hook": hook})
sys.exit(main(["run", sys.argv[3]]))
"""
KILL_AT = 50


@pytest.mark.slow  # a subprocess killed mid-training: about a minute
def test_kill_9_then_resume_reaches_identical_selections(ray_session, tmp_path):
    """`raylearn run` killed with SIGKILL at step 50 of round 0's 120 (checkpoints every 20 steps) resumes from
    the training service's last checkpoint (the round is not retrained from step 0) and reaches the uninterrupted
    run's selections and Dice."""
    from raylearn.loop import run_experiment

    tmp = tmp_path
    train = {**LONG_TRAIN, "first_round_steps": 120, "checkpoint_every": 20}
    ref = run_experiment(load_experiment(_config(tmp, tmp / "ref", tmp / "store", train=train)), progress=False)
    out = tmp / "killed"
    cfg_path = _config(tmp, out, tmp / "store", train=train)
    marker = tmp / "at_kill_step"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    log_path = tmp / "killed.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", _KILLED_DRIVER, str(marker), str(KILL_AT), str(cfg_path)],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        try:
            while not marker.exists():
                if proc.poll() is not None:
                    pytest.fail(f"run exited early with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                if time.time() > deadline:
                    pytest.fail(f"round 0 never reached step {KILL_AT}:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.1)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray cluster it started
            proc.wait()
    before = Ledger(out / "ledger.jsonl")
    assert before.selection(0) is not None and len(before.rounds()) == 0
    res = run_experiment(load_experiment(cfg_path), resume=True, progress=False)
    info0 = res.rounds[0]["train_info"]
    assert info0["resumed_at_step"] in (20, 40) and info0["trained_steps"] == 120 - info0["resumed_at_step"], info0
    assert [r["selected"] for r in res.rounds] == [r["selected"] for r in ref.rounds]
    assert res.rounds[-1]["metrics"]["dice_mean"] == pytest.approx(ref.rounds[-1]["metrics"]["dice_mean"],
                                                                   abs=1e-6)


def test_the_loop_learns_on_the_shipped_phantom_experiment(ray_session, tmp_path):
    """deployments/experiments/phantoms.yaml (3 -> 12 labelled phantoms): the last round's Dice clearly exceeds
    round 0's. Measured 0.306 -> 0.458 -> 0.447 -> 0.498 on a quiet 2-core machine; asserted with headroom."""
    from raylearn.loop import run_experiment

    cfg = load_experiment(REPO / "deployments" / "experiments" / "phantoms.yaml",
                          {"output_dir": str(tmp_path / "run"), "pool.progress": False})
    res = run_experiment(cfg, progress=False)
    dice = [r["metrics"]["dice_mean"] for r in res.rounds]
    assert len(dice) == 4 and dice[-1] >= dice[0] + 0.10, dice
    # one training service: every round continued the previous one's steps in the same worker
    steps = [r["train_info"]["global_step"] for r in res.rounds]
    assert steps == [150, 250, 350, 450] and all(r["train_info"]["attempt"] == 0 for r in res.rounds)
