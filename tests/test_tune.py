"""Ray Tune sweeps: a real sweep on tiny phantoms, ASHA, best YAML that runs, resume after a kill."""

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

from raylearn.config import load_config

REPO = Path(__file__).resolve().parents[1]

BASE = {
    "name": "tiny-sweep", "seed": 0,
    "data": {"dataset": "phantom", "phantom": {"n_cases": 12, "shape": [24, 24, 24], "seed": 4}, "n_test": 3},
    "cold_start": {"size": 2}, "strategy": {"name": "random"}, "schedule": {"rounds": 1, "batch_size": 2},
    "model": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
    "train": {"first_round_steps": 3, "steps": 2, "batch_size": 2},
    "pool": {"progress": False}, "evaluate": {"hd95": False},
}


def _sweep(tmp: Path, space: dict, rounds: int = 1, **extra) -> Path:
    base = json.loads(json.dumps(BASE))
    base["schedule"]["rounds"] = rounds
    (tmp / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {"experiment": "base.yaml", "output_dir": str(tmp / "sweep"), "name": "t", "metric": "alc",
             "max_concurrent_trials": 2, "resources_per_trial": {"cpu": 1},
             "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2}, "search_space": space, **extra}
    p = tmp / "sweep.yaml"
    p.write_text(yaml.safe_dump(sweep))
    return p


def _live_groups() -> set[str]:
    from ray.util.placement_group import placement_group_table

    return {k for k, v in placement_group_table().items() if v["state"] != "REMOVED"}


def test_trial_shares_fit_the_trial_resources():
    """The trial function's own CPU share, its training workers' and its shards' add up to the trial's CPUs,
    so two 1-CPU trials fit a 2-CPU node together (they asked for 2.02 CPUs before)."""
    from raylearn.tune import TRIAL_CPU, TrialResources, _fit_inside

    for cpu, workers, shards in [(1, 1, None), (1, 2, 3), (3, 1, None), (0.5, 1, 1)]:
        exp = _fit_inside({"train": {"num_workers": workers}, "pool": {"n_shards": shards}},
                          TrialResources(cpu=cpu))
        used = TRIAL_CPU + workers * exp["train"]["resources_per_worker"]["CPU"] + \
            exp["pool"]["n_shards"] * exp["pool"]["num_cpus"]
        assert cpu - 0.01 < used <= cpu + 1e-9


def test_sweep_runs_reports_per_round_and_writes_best_yaml(ray_session, tmp_path):
    from raylearn.experiment import load_experiment
    from raylearn.tune import SweepConfig, run_sweep

    path = _sweep(tmp_path, {"strategy.name": {"grid": ["random", "entropy"]}})
    before = _live_groups()
    res = run_sweep(load_config(path, SweepConfig), str(path))
    # Tune ends each trial at its last report (max_t) with its training service up: the sweep's driver releases
    # the worker group's placement group, else it stays reserved and later trials never get their workers
    assert _live_groups() <= before
    rows = res["rows"]
    assert len(rows) == 2 and {r["strategy.name"] for r in rows} == {"random", "entropy"}
    assert all(r["status"] == "ok" and r["rounds"] == 2 and 0 <= r["alc"] <= 1 for r in rows)
    assert rows[0]["alc"] >= rows[1]["alc"]  # sorted best first
    out = tmp_path / "sweep"
    assert (out / "trials.csv").read_text().count("\n") == 3
    assert (out / "top_curves.png").read_bytes()[:4] == b"\x89PNG"
    best = load_experiment(out / "best_experiment.yaml")  # a runnable experiment
    assert best.strategy.name == rows[0]["strategy.name"]
    assert best.data.store and Path(best.data.store).is_dir()
    # Ray Tune's own MLflowLoggerCallback (tracking.mlflow: auto): one MLflow run per trial, a metric per round;
    # the trials' own run trackers are off (no store in a trial's run folder)
    pytest.importorskip("mlflow")
    from raylearn.tracking import resolve_uri, tracking_client

    client = tracking_client(resolve_uri(None, out))
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert len(runs) == 2 and {r.data.params["strategy.name"] for r in runs} == {"random", "entropy"}
    for run in runs:
        alc = client.get_metric_history(run.info.run_id, "alc")
        assert len(alc) == 2 and run.data.tags["raylearn.sweep"] == "t"
        row = next(r for r in rows if r["strategy.name"] == run.data.params["strategy.name"])
        assert alc[-1].value == pytest.approx(row["alc"])
    assert not any((Path(r["run_dir"]) / "mlruns").exists() for r in rows)


def test_resume_without_a_sweep_is_a_clear_error(tmp_path):
    from raylearn.config import ConfigError
    from raylearn.tune import SweepConfig, run_sweep

    path = _sweep(tmp_path, {"strategy.name": {"grid": ["random"]}})
    with pytest.raises(ConfigError, match="no sweep to resume"):
        run_sweep(load_config(path, SweepConfig), str(path), resume=True)


@pytest.mark.slow
def test_asha_stops_trials_and_killed_sweep_resumes(tmp_path):
    """4 trials x 3 rounds: ASHA stops some early; a sweep killed mid-way resumes without repeating finished
    trials, and the best YAML then runs with `raylearn run`."""
    path = _sweep(tmp_path, {"strategy.name": {"grid": ["random", "entropy"]},
                             "schedule.batch_size": {"grid": [1, 2]}}, rounds=2)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "raylearn.cli", "tune", str(path)]
    log_path = tmp_path / "tune-first.log"  # the interrupted sweep's output, shown when it fails early
    log_file = log_path.open("wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True)
    trials = tmp_path / "sweep" / "trials"

    def tail() -> str:
        if not log_file.closed:
            log_file.flush()
        return log_path.read_text(errors="replace")[-4000:]

    def complete() -> list[Path]:  # trials whose ledgers hold all 3 rounds: finished for good
        from raylearn.ledger import Ledger

        out = []
        for d in trials.glob("*") if trials.exists() else []:
            if (d / "ledger.jsonl").is_file() and len(Ledger(d / "ledger.jsonl", readonly=True).rounds()) == 3:
                out.append(d)
        return out

    deadline = time.time() + 900
    try:
        while time.time() < deadline and proc.poll() is None and not complete():
            time.sleep(1)
        assert proc.poll() is None, f"the sweep ended (rc {proc.returncode}) before it could be interrupted:\n{tail()}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        log_file.close()
    finished = {d.name: (d / "ledger.jsonl").read_bytes() for d in complete()}
    assert finished, f"no trial finished in 900 s before the kill:\n{tail()}"
    before = {d.name: (d / "ledger.jsonl").read_bytes() for d in trials.glob("*") if (d / "ledger.jsonl").is_file()}
    rc = subprocess.run([*cmd, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert rc.returncode == 0, rc.stderr[-3000:]
    from raylearn.ledger import Ledger

    for name, data in finished.items():  # finished trials were not run again
        assert (trials / name / "ledger.jsonl").read_bytes() == data
    for name, data in before.items():  # interrupted ones continued their ledgers: nothing redone
        led = Ledger(trials / name / "ledger.jsonl", readonly=True)
        assert (trials / name / "ledger.jsonl").read_bytes().startswith(data.rsplit(b"\n", 1)[0])
        idx = [r["round"] for r in led.rounds()]
        assert idx == sorted(set(idx))
    rows = list((tmp_path / "sweep" / "trials.csv").read_text().splitlines())
    assert len(rows) == 5
    rounds = [int(float(r.split(",")[-5])) for r in rows[1:] if r.split(",")[-5]]
    assert min(rounds) < 3, "ASHA should stop at least one trial before the last round"
    best = tmp_path / "sweep" / "best_experiment.yaml"
    run = subprocess.run([sys.executable, "-m", "raylearn.cli", "run", str(best)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
