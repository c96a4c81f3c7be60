"""Cluster launcher config and `ray job submit` against a local `ray start --head` cluster."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _pinned_ray() -> str:
    text = (REPO / "pyproject.toml").read_text()
    return re.search(r"ray\[train,tune,serve\]==([\d.]+)", text).group(1)


def test_cluster_yaml_has_the_launcher_keys_and_matching_ray():
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types", "head_node_type",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands", "docker"):
        assert key in cfg, key
    nodes = cfg["available_node_types"]
    assert cfg["head_node_type"] in nodes
    gpu_nodes = [n for n in nodes.values() if n.get("resources", {}).get("GPU", 0) > 0]
    assert gpu_nodes, "needs a GPU worker node type"
    for n in nodes.values():
        assert "node_config" in n and "resources" in n
    assert cfg["docker"]["image"].split(":")[1].startswith(_pinned_ray())
    setup = " ".join(cfg["setup_commands"])
    assert "torch==2.14.1" in setup and f"ray[train,tune,serve]=={_pinned_ray()}" in setup and "raylearn" in setup


def test_runtime_env_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((REPO / "deployments" / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # raises on unknown fields
    assert ".venv/" in env["excludes"]


@pytest.mark.slow
def test_ray_job_submit_runs_an_experiment(tmp_path):
    """`ray start --head` + `ray job submit -- raylearn run ...` completes and writes the run's outputs."""
    bin_dir = Path(sys.executable).parent
    ray_bin = str(bin_dir / "ray")
    out = tmp_path / "job_run"
    exp = {
        "name": "job-submit", "output_dir": str(out),
        "data": {"dataset": "phantom", "phantom": {"n_cases": 10, "shape": [24, 24, 24]}, "n_test": 3},
        "cold_start": {"size": 2}, "strategy": {"name": "entropy"}, "schedule": {"rounds": 1, "batch_size": 2},
        "model": {"channels": [4, 8], "strides": [2], "num_res_units": 0, "patch_size": [16, 16, 16]},
        "train": {"epochs": 1, "iterations_per_epoch": 2, "batch_size": 1},
        "pool": {"n_shards": 1, "num_cpus": 0.5, "progress": False},
    }
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(exp))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    port = 6390
    # --block keeps `ray start` in the foreground, so stopping it stops only this cluster (never `ray stop`,
    # which would kill every Ray instance on the machine, this test session's included)
    temp_dir = tempfile.mkdtemp(prefix="rljob", dir="/tmp")  # keeps its address file away from other sessions
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             f"--temp-dir={temp_dir}",
                             "--include-dashboard=true", "--dashboard-port=8275",
                             "--object-store-memory=1000000000", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        import httpx

        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get("http://127.0.0.1:8275/api/version", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            pytest.fail("ray head did not come up")
        for _ in range(30):  # the job agent starts a little after the dashboard answers
            proc = subprocess.run(
                [ray_bin, "job", "submit", "--address", "http://127.0.0.1:8275",
                 "--runtime-env", str(REPO / "deployments" / "runtime_env.yaml"), "--",
                 str(bin_dir / "raylearn"), "run", str(cfg)],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
            if "No available agent" not in proc.stderr + proc.stdout:
                break
            time.sleep(3)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "succeeded" in proc.stdout.lower()
        assert (out / "summary.json").is_file() and (out / "learning_curve.png").is_file()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(out / "ray_train", ignore_errors=True)
