"""Multi-node runs on one machine: a ``ray.cluster_utils.Cluster`` with a CPU-less head and worker nodes that declare
logical ``GPU`` resources, and a driver that is the only process able to see its ``output_dir``.

Test switch: ``RAYLEARN_GPU_FALLBACK=cpu`` (set on every node here) makes a ``use_gpu`` training run use gloo
instead of NCCL; torch sees no CUDA device, so the models run on the CPU while Ray schedules by the logical GPUs.

Process layout. A Cluster cannot share a process with a connected driver, and this pytest process may hold the
session's Ray, so the test starts ``unshare -m python this_file nodes SPEC`` (its own mount namespace: an empty,
read-only tmpfs over PRIVATE), which starts the Cluster (every node and worker process inherits that view), then the
driver as ``unshare -m sh -c 'mount -t tmpfs none PRIVATE; exec python this_file driver SPEC ADDRESS'``: a writable
PRIVATE only the driver sees. ``output_dir`` is under PRIVATE, so any task or actor that reads or writes a
driver-local path fails (on main before issue 13 the Ray Train storage under ``output_dir`` did), while the pool
store and Ray Train's storage live in SHARED, which every process sees. Nodes are removed from the Cluster by the
``nodes`` process when a shard or a training worker drops a marker file in SHARED (from the run's hooks).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]

TINY = {
    "data": {"dataset": "phantom", "phantom": {"n_cases": 14, "shape": [24, 24, 24]}, "n_test": 3},
    "cold_start": {"size": 2}, "strategy": {"name": "entropy"}, "schedule": {"rounds": 1, "batch_size": 2},
    "model": {"channels": [4, 8], "strides": [2], "num_res_units": 0, "patch_size": [16, 16, 16]},
    "train": {"first_round_steps": 2, "steps": 2, "batch_size": 1, "torch_threads": 1, "checkpoint_every": 1},
    "pool": {"num_cpus": 0.25, "progress": False, "node_check_s": 2.0},
    "evaluate": {"hd95": False, "surface_dice_tolerance_mm": None},
}


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _run(tmp_path: Path, scenario: str, gpu_nodes: int, timeout: float, env: dict | None = None) -> dict:
    if not _unshare_works():
        pytest.skip("needs `unshare -m` (a mount namespace) to hide the driver's output_dir from the nodes")
    private, shared = Path("/tmp") / f"rl13p-{os.getpid()}-{scenario}", tmp_path / "shared"
    private.mkdir(parents=True, exist_ok=True)
    shared.mkdir()
    spec = {"scenario": scenario, "private": str(private), "shared": str(shared), "gpu_nodes": gpu_nodes}
    spec_path = shared / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_worker_niceness": "0",
           "RAYLEARN_GPU_FALLBACK": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run(["unshare", "-m", sys.executable, str(HERE), "nodes", str(spec_path)], env=env,
                              cwd=shared, capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    log = (proc.stdout[-6000:] + "\n" + proc.stderr[-6000:])
    result_path = shared / "result.json"
    assert proc.returncode == 0 and result_path.is_file(), log
    result = json.loads(result_path.read_text())
    result["log"] = log
    return result


def test_bad_requests_and_driver_local_paths_fail_at_start_naming_the_key(tmp_path):
    """Head (0 CPU) + 2 nodes with 1 logical GPU each, output_dir visible to the driver only: more GPUs than exist,
    and a pool store, Ray Train storage or label store under output_dir, each fail before any work with the key,
    the nodes and the path; with everything on shared storage the per-node probe passes and the plan holds."""
    res = _run(tmp_path, "errors", gpu_nodes=2, timeout=400)
    _check_errors(res["errors"])
    assert res["probed_nodes"] == 3, res
    assert res["plan"] == {"use_gpu": True, "gpus": 2, "n_shards": 2, "train_workers": 2,
                           "shard": {"num_cpus": 0.25, "num_gpus": 0.5}, "train_resources": {"CPU": 1.0, "GPU": 0.5}}
    assert res["private_seen_by_nodes"] == [], res


def _check_errors(errors: dict) -> None:
    assert "cluster.gpus: 3 GPU(s) requested but the cluster has 2" in errors["too_many_gpus"], errors
    assert "cluster.storage: 3 of 3 node(s) cannot read" in errors["storage_under_output_dir"], errors
    assert "cluster.label_store: 3 of 3 node(s) cannot read" in errors["labels_under_output_dir"], errors
    assert "data.store: 3 of 3 node(s) cannot read" in errors["store_under_output_dir"], errors


@pytest.mark.slow
def test_two_gpu_nodes_run_two_rounds_with_the_planned_gpus(tmp_path):
    """A 2-round run on the 2 "GPU" nodes: one shard and one DDP worker hold each GPU, evaluation runs on the
    shards, Ray Train's checkpoints land in the shared storage, and no task touches the driver's output_dir."""
    res = _run(tmp_path, "basic", gpu_nodes=2, timeout=900)
    # while the run is up, both GPU nodes are fully held: 0.5 by a shard + 0.5 by a training worker each
    seen = res["gpu_free_per_node"]
    assert len(seen) == 2 and all(v == 0.0 for v in seen.values()), seen
    assert res["rounds"] == 2 and all(0.0 <= d <= 1.0 for d in res["dice"]), res
    assert res["storage_checkpoints"] >= 1 and res["private_seen_by_nodes"] == [], res


@pytest.mark.slow
def test_worker_node_lost_mid_scoring_and_mid_training(tmp_path):
    """3 GPU nodes; one is removed while its shard scores, another while rank 0 trains round 1: scoring stays
    exactly once (cases moved to the live shards) and training, re-planned on the GPUs left, resumes the round from
    its last checkpoint (``cluster.min_train_workers``)."""
    res = _run(tmp_path, "node_loss", gpu_nodes=3, timeout=1500,
               env={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20",
                    # the GCS declares a killed node dead after 3 missed 1 s health checks (it took 1-2 min
                    # with the defaults, and each re-plan meanwhile still counted it)
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"})
    assert res["removed"] == ["score", "train"], res
    assert res["rounds"] == 2, res
    sel = res["selected"]
    assert len(sel) == len(set(sel)) == 4, sel  # 2 cold start + 2 chosen from a complete, exactly-once scoring
    info = res["train_info"][-1]
    assert info["resumed_at_step"] >= 1 and info["replans"] >= 1, info


# =========================================================================== subprocess side
def _experiment(spec: dict, name: str, **over) -> dict:
    exp = json.loads(json.dumps(TINY))
    exp.update({"name": name, "output_dir": f"{spec['private']}/{name}"})
    exp["data"]["store"] = f"{spec['shared']}/store"
    exp["cluster"] = {"storage": f"{spec['shared']}/ray_train", "label_store": f"{spec['shared']}/labels/{name}"}
    for key, value in over.items():
        node = exp
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return exp


def _marker_hook(shared: str, what: str, when):
    """A hook that, the first time ``when(*args)`` holds anywhere in the cluster, asks the ``nodes`` process to
    remove the node it runs on, and waits there to be killed with it."""

    def hook(*args) -> None:
        if not when(*args):
            return
        try:
            fd = os.open(f"{shared}/fired_{what}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        import ray

        node = ray.get_runtime_context().get_node_id()
        Path(f"{shared}/kill_{what}_{node}").write_text(node)
        time.sleep(600)

    return hook


def _driver(spec_path: str, address: str) -> None:
    import ray

    from raylearn.config import ConfigError
    from raylearn.experiment import ExperimentConfig
    from raylearn.loop import run_experiment

    spec = json.loads(Path(spec_path).read_text())
    shared = spec["shared"]
    ray.init(address=address, log_to_driver=False)
    out: dict = {"errors": {}}

    def expect_error(key: str, exp: dict) -> None:
        try:
            run_experiment(ExperimentConfig.model_validate(exp), progress=False)
        except ConfigError as err:
            out["errors"][key] = str(err)
        else:
            out["errors"][key] = "no error"

    if spec["scenario"] == "errors":
        from raylearn.runtime import check_nodes, ensure_store, plan_cluster

        expect_error("too_many_gpus", _experiment(spec, "gpus3", **{"cluster.gpus": 3}))
        expect_error("storage_under_output_dir", _experiment(spec, "nostorage", cluster={}))
        expect_error("labels_under_output_dir", _experiment(spec, "nolabels", **{"cluster.label_store": None}))
        expect_error("store_under_output_dir", _experiment(spec, "privstore", **{
            "data.store": f"{spec['private']}/privstore/store"}))
        cfg = ExperimentConfig.model_validate(_experiment(spec, "good"))
        out["probed_nodes"] = check_nodes(ensure_store(cfg, progress=False), {
            "cluster.storage": cfg.cluster.storage, "cluster.label_store": cfg.cluster.label_store})
        plan = plan_cluster(cfg, 11)
        out["plan"] = {"use_gpu": plan.use_gpu, "gpus": plan.gpus, "n_shards": plan.n_shards,
                       "train_workers": plan.train_workers, "shard": plan.shard,
                       "train_resources": plan.train_resources}
        Path(f"{shared}/driver.json").write_text(json.dumps(out))
        ray.shutdown()
        return
    if spec["scenario"] == "basic":
        seen: dict = {}

        def on_round(rec, rounds) -> None:  # shards and the training service are up between rounds
            from ray._private.state import available_resources_per_node

            gpu_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")}
            free = available_resources_per_node()
            seen.update({k[:8]: float(v.get("GPU", 0.0)) for k, v in free.items() if k in gpu_nodes})

        res = run_experiment(ExperimentConfig.model_validate(_experiment(spec, "run")), progress=False,
                             on_round=on_round)
        out["gpu_free_per_node"] = seen
    else:
        # max_failures 0: a lost worker fails the group at once and raylearn re-plans on what is left (Ray Train's
        # own retries would each wait RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S for a group that no longer fits)
        exp = _experiment(spec, "run", **{"cluster.min_train_workers": 1, "train.max_failures": 0,
                                          "train.steps": 6})
        score_hook = _marker_hook(shared, "score", lambda shard, pos, cid: True)
        train_hook = _marker_hook(shared, "train", lambda rank, r, step, attempt: r == 1 and step == 2 and rank == 0)
        res = run_experiment(ExperimentConfig.model_validate(exp), progress=False, step_hook=train_hook,
                             case_hook=score_hook)
        out["removed"] = sorted(p.name.split("_")[1] for p in Path(shared).glob("done_*"))
        out["removed"].sort(key=["score", "train"].index)
    out["rounds"] = len(res.rounds)
    out["dice"] = [r["metrics"].get("dice_mean", float("nan")) for r in res.rounds]
    out["selected"] = [c for r in res.rounds for c in r["selected"]]
    out["train_info"] = [r["train_info"] for r in res.rounds]
    out["storage_checkpoints"] = len(list(Path(f"{shared}/ray_train/service").glob("checkpoint_*")))
    Path(f"{shared}/driver.json").write_text(json.dumps(out))
    ray.shutdown()


def _nodes(spec_path: str) -> int:
    from ray.cluster_utils import Cluster

    spec = json.loads(Path(spec_path).read_text())
    private, shared = spec["private"], spec["shared"]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "none", private], check=True)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": 150 * 1024**2, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=2, num_gpus=1, object_store_memory=150 * 1024**2)
             for _ in range(spec["gpu_nodes"])]
    cluster.wait_for_nodes()
    try:
        cmd = (f"mount -t tmpfs -o size=512m none {private} && exec {sys.executable} {HERE} driver "
               f"{spec_path} {cluster.address}")
        driver = subprocess.Popen(["unshare", "-m", "sh", "-c", cmd])
        while driver.poll() is None:
            for marker in Path(shared).glob("kill_*"):
                what, node_id = marker.name.split("_")[1], marker.read_text()
                victim = next(n for n in nodes if n.node_id == node_id)
                print(f"removing node {node_id[:8]} ({what})", flush=True)
                cluster.remove_node(victim, allow_graceful=False)  # a lost node: no drain, as when a VM dies
                nodes.remove(victim)
                marker.rename(Path(shared) / f"done_{what}")
            time.sleep(0.5)
        if driver.returncode != 0:
            return driver.returncode
        result = json.loads(Path(f"{shared}/driver.json").read_text())
        result["private_seen_by_nodes"] = sorted(os.listdir(private))  # this namespace is the nodes' view
        Path(f"{shared}/result.json").write_text(json.dumps(result))
        return 0
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if sys.argv[1] == "nodes":
        sys.exit(_nodes(sys.argv[2]))
    _driver(sys.argv[2], sys.argv[3])
