"""Cluster launcher config and `ray job submit` against a local `ray start --head` cluster."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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
    assert "-r /home/ray/raylearn/requirements.lock" in setup and "--no-deps -e /home/ray/raylearn" in setup
    lock = (REPO / "requirements.lock").read_text()  # the pins the setup installs
    assert "\ntorch==2.14.1\n" in lock and f"\nray=={_pinned_ray()}\n" in lock


def test_runtime_env_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((REPO / "deployments" / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # raises on unknown fields
    assert ".venv/" in env["excludes"]


# --------------------------------------------------------------------------- a private `ray start --head`
PORT_FLAGS = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "metrics-export-port", "runtime-env-agent-port", "ray-client-server-port")


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _log_tail(temp_dir: str, pattern: str, n: int = 20) -> str:
    lines = []
    for f in sorted(Path(temp_dir).glob(f"session_*/logs/{pattern}")):
        lines += [f"--- {f.name}"] + f.read_text(errors="replace").splitlines()[-n:]
    return "\n".join(lines)


class PrivateHead:
    """One `ray start --head --block` on ports chosen free (every port Ray would otherwise take a default for,
    which a second Ray instance on the machine already holds) with its own ``--temp-dir``. :meth:`stop` ends
    exactly the processes it started: the head's process tree, plus any process naming its temp dir. Never
    `ray stop`, which kills every Ray instance on the machine, this pytest session's included."""

    def __init__(self, ray_bin: str, env: dict, ports: list[int]) -> None:
        self.ports = dict(zip(PORT_FLAGS, ports, strict=True))
        self.dashboard = f"http://127.0.0.1:{self.ports['dashboard-port']}"
        self.temp_dir = tempfile.mkdtemp(prefix="rlhead", dir="/tmp")  # short: Ray's socket paths fit 107 bytes
        cmd = [ray_bin, "start", "--head", "--block", "--num-cpus=2", f"--temp-dir={self.temp_dir}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--object-store-memory=1000000000",
               "--disable-usage-stats", *(f"--{flag}={port}" for flag, port in self.ports.items())]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        self._started: dict[int, Any] = {}

    def wait_up(self, timeout: float) -> str | None:
        """None once the dashboard answers and the job agent listens; else why not."""
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                return f"`ray start` exited with {self.proc.returncode}\n{_log_tail(self.temp_dir, '*.err')}"
            try:
                up = httpx.get(f"{self.dashboard}/api/version", timeout=2).status_code == 200
            except httpx.HTTPError:
                up = False
            if up and _listening(self.ports["dashboard-agent-listen-port"]):
                self.remember()
                return None
            time.sleep(1)
        return f"not up in {timeout:.0f} s on ports {self.ports}\n{_log_tail(self.temp_dir, 'dashboard*.log')}"

    def remember(self) -> None:
        """Note the head's process tree as it is now (a finished job's driver has left it by stop time)."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            for proc in [root, *root.children(recursive=True)]:
                self._started.setdefault(proc.pid, proc)
        except psutil.NoSuchProcess:
            pass

    def stop(self) -> None:
        import psutil

        self.remember()
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if self.temp_dir in " ".join(proc.info["cmdline"] or ()):
                self._started.setdefault(proc.pid, proc)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)  # `ray start --block` shuts its node down on SIGTERM
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        _, alive = psutil.wait_procs(list(self._started.values()), timeout=15)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=10)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@contextlib.contextmanager
def private_head(ray_bin: str, env: dict, free_ports, timeout: float = 180, attempts: int = 2):
    """A running :class:`PrivateHead`, stopped on exit. A head that does not come up (Ray gives its raylet a
    fixed 30 s to register, which a loaded machine can exceed) is stopped and started again on new ports."""
    failures = []
    for _ in range(attempts):
        head = PrivateHead(ray_bin, env, free_ports(len(PORT_FLAGS)))
        try:
            why = head.wait_up(timeout)
        except BaseException:
            head.stop()
            raise
        if why is None:
            break
        failures.append(why)
        head.stop()
    else:
        pytest.fail("ray head did not come up:\n" + "\n".join(failures))
    try:
        yield head
    finally:
        head.stop()


@pytest.mark.slow
def test_ray_job_submit_runs_an_experiment(ray_session, tmp_path, free_ports):
    """`ray start --head` + `ray job submit -- raylearn run ...` completes and writes the run's outputs.

    Runs beside this pytest session's own Ray instance (started first on purpose: it holds Ray's default
    agent ports), and any other on the machine: the head takes free ports of its own, and stopping it
    leaves every other Ray process alone."""

    def one() -> int:  # a closure, shipped by value to the session's workers
        return 1

    bin_dir = Path(sys.executable).parent
    ray_bin = str(bin_dir / "ray")
    out = tmp_path / "job_run"
    exp = {
        "name": "job-submit", "output_dir": str(out),
        "data": {"dataset": "phantom", "phantom": {"n_cases": 10, "shape": [24, 24, 24]}, "n_test": 3},
        "cold_start": {"size": 2}, "strategy": {"name": "entropy"}, "schedule": {"rounds": 1, "batch_size": 2},
        "model": {"channels": [4, 8], "strides": [2], "num_res_units": 0, "patch_size": [16, 16, 16]},
        "train": {"first_round_steps": 2, "steps": 2, "batch_size": 1},
        "pool": {"n_shards": 1, "num_cpus": 0.5, "progress": False},
    }
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(exp))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    try:
        with private_head(ray_bin, env, free_ports) as head:
            for _ in range(20):  # the head may not have seen the agent register yet
                proc = subprocess.run(
                    [ray_bin, "job", "submit", "--address", head.dashboard,
                     "--runtime-env", str(REPO / "deployments" / "runtime_env.yaml"), "--",
                     str(bin_dir / "raylearn"), "run", str(cfg)],
                    cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
                if "No available agent" not in proc.stderr + proc.stdout:
                    break
                time.sleep(3)
            head.remember()
            log = proc.stdout[-3000:] + proc.stderr[-3000:]
            assert proc.returncode == 0, log + "\n" + _log_tail(head.temp_dir, "dashboard_agent.log")
            assert "succeeded" in proc.stdout.lower(), log
        assert (out / "summary.json").is_file() and (out / "learning_curve.png").is_file()
        # the session's Ray instance still works: stopping the head stopped only the head
        assert ray_session.get(ray_session.remote(one).remote(), timeout=60) == 1
    finally:
        shutil.rmtree(out / "ray_train", ignore_errors=True)
