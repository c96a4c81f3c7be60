"""The resource plan (no Ray), the cluster config section, and the cluster files checked by Ray's own validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raylearn.config import ConfigError
from raylearn.experiment import ClusterConfig, ExperimentConfig, PoolConfig, load_experiment
from raylearn.models.config import TrainConfig
from raylearn.resource_plan import NodeInfo, ResourcePlanError, nodes_from_ray, plan_resources

REPO = Path(__file__).resolve().parents[1]


def _nodes(*spec: tuple[float, float]) -> list[NodeInfo]:
    return [NodeInfo(f"node{i}", f"10.0.0.{i}", cpus, gpus) for i, (cpus, gpus) in enumerate(spec)]


HEAD_AND_TWO_GPU_NODES = _nodes((0, 0), (4, 1), (4, 1))


def test_gpu_plan_puts_one_shard_and_one_training_worker_on_every_gpu():
    plan = plan_resources(HEAD_AND_TWO_GPU_NODES, ClusterConfig(), PoolConfig(), TrainConfig(), n_cases=50)
    assert plan.use_gpu and plan.gpus == 2 and plan.n_shards == 2
    assert plan.shard == {"num_cpus": 0.25, "num_gpus": 0.5}
    assert plan.train_workers == 2 and plan.train_resources == {"CPU": 1.0, "GPU": 0.5}
    # the simulation places one shard and one training worker per GPU node, nothing on the CPU-less head
    assert plan.placement == {"10.0.0.1/node1": ["shard 0", "train worker 0"],
                              "10.0.0.2/node2": ["shard 1", "train worker 1"]}
    assert plan.shard_nodes == ["node1", "node2"]  # the pool pins each shard to its planned node


def test_gpu_plan_on_four_gpu_nodes_and_the_training_scaling():
    plan = plan_resources(_nodes((0, 0), (48, 4), (48, 4)), ClusterConfig(min_train_workers=2), PoolConfig(),
                          TrainConfig(), n_cases=100)
    assert plan.n_shards == 8 and plan.train_workers == 8 and plan.min_train_workers == 2
    assert plan.scaling() == {"num_workers": 8, "use_gpu": True, "resources_per_worker": {"CPU": 1.0, "GPU": 0.5}}
    assert sum(len(v) for v in plan.placement.values()) == 16


def test_cpu_plan_keeps_the_local_defaults():
    plan = plan_resources(_nodes((2, 0)), ClusterConfig(), PoolConfig(), TrainConfig(), n_cases=40)
    assert not plan.use_gpu and plan.gpus == 0
    assert plan.n_shards == 2 and plan.shard == {"num_cpus": 0.25, "num_gpus": 0.0}
    assert plan.train_workers == 1 and plan.train_resources == {"CPU": 1.0}
    assert plan_resources(_nodes((8, 0)), ClusterConfig(), PoolConfig(n_shards=3), TrainConfig(), 2).n_shards == 2
    # cluster.gpus: 0 runs a GPU cluster on its CPUs
    assert not plan_resources(HEAD_AND_TWO_GPU_NODES, ClusterConfig(gpus=0), PoolConfig(), TrainConfig(), 9).use_gpu


def test_more_gpus_than_the_cluster_has_names_the_key_and_the_count():
    with pytest.raises(ResourcePlanError, match=r"cluster\.gpus: 3 GPU\(s\) requested but the cluster has 2 on 3"):
        plan_resources(HEAD_AND_TWO_GPU_NODES, ClusterConfig(gpus=3), PoolConfig(), TrainConfig(), 10)
    with pytest.raises(ResourcePlanError, match=r"train\.use_gpu: true but the plan has no GPU"):
        plan_resources(_nodes((4, 0)), ClusterConfig(), PoolConfig(), TrainConfig(use_gpu=True), 10)


def test_requests_that_cannot_fit_are_refused_naming_the_keys():
    # three whole-GPU training workers beside two half-GPU shards on two GPUs
    with pytest.raises(ResourcePlanError, match=r"training worker \d finds no node.*cluster\.train_workers"):
        plan_resources(HEAD_AND_TWO_GPU_NODES, ClusterConfig(train_workers=3), PoolConfig(), TrainConfig(), 10)
    # shards of a whole GPU leave nothing for training (the old default: one GPU per shard for the whole run)
    with pytest.raises(ResourcePlanError, match=r"training worker 0 finds no node with 1 CPU and 1 GPU"):
        plan_resources(HEAD_AND_TWO_GPU_NODES, ClusterConfig(), PoolConfig(num_gpus=1), TrainConfig(), 10)
    # CPUs: the head has none, so 4 shards x 2 CPU cannot fit on 2 x 4 CPUs beside the training workers
    with pytest.raises(ResourcePlanError, match=r"pool\.num_cpus"):
        plan_resources(HEAD_AND_TWO_GPU_NODES, ClusterConfig(), PoolConfig(n_shards=4, num_cpus=2), TrainConfig(), 9)
    with pytest.raises(ResourcePlanError, match="min_train_workers"):
        plan_resources(HEAD_AND_TWO_GPU_NODES, ClusterConfig(min_train_workers=3), PoolConfig(), TrainConfig(), 9)
    with pytest.raises(ResourcePlanError, match="no alive node"):
        plan_resources([], ClusterConfig(), PoolConfig(), TrainConfig(), 9)


def test_nodes_from_ray_keeps_alive_nodes():
    raw = [{"NodeID": "a" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.5", "Resources": {"CPU": 4.0, "GPU": 1.0}},
           {"NodeID": "b" * 56, "Alive": False, "NodeManagerAddress": "10.0.0.6", "Resources": {"CPU": 4.0}}]
    assert nodes_from_ray(raw) == [NodeInfo("a" * 56, "10.0.0.5", 4.0, 1.0)]


def test_cluster_section_validates():
    with pytest.raises(ValueError, match="gpus"):
        ExperimentConfig(cluster={"gpus": -1})
    with pytest.raises(ValueError, match="gpus_per_shard"):
        ExperimentConfig(cluster={"gpus_per_shard": 1.0})
    with pytest.raises(ValueError, match="min_train_workers"):
        ExperimentConfig(cluster={"train_workers": 2, "min_train_workers": 3})
    with pytest.raises(ValueError, match="extra"):
        ExperimentConfig(cluster={"gpu": 2})


def test_storage_uri_resolution(tmp_path):
    from raylearn.runtime import storage_uri

    cfg = ExperimentConfig(output_dir=str(tmp_path / "run"))
    assert storage_uri(cfg) == str(tmp_path / "run" / "ray_train")
    assert storage_uri(cfg.model_copy(update={"cluster": ClusterConfig(storage="s3://b/p")})) == "s3://b/p"


# --------------------------------------------------------------------------- cluster files
def test_cluster_yaml_passes_rays_own_cluster_config_validation():
    """``prepare_config`` + ``validate_config``: what ``ray up`` runs on the file before it touches the cloud."""
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    cfg = prepare_config(raw)
    validate_config(cfg)
    nodes = cfg["available_node_types"]
    assert nodes[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert any(n["resources"].get("GPU", 0) > 0 for n in nodes.values())
    assert "--num-cpus=0" in " ".join(cfg["head_start_ray_commands"])
    # shared storage: the NFS export is mounted into every container at /mnt/shared, which the experiment uses
    assert "-v /mnt/raylearn-shared:/mnt/shared" in cfg["docker"]["run_options"]
    init = " ".join(cfg["initialization_commands"])
    assert "exportfs" in init and "mount -t nfs4" in init and "$RAY_HEAD_IP" in init
    exp = load_experiment(REPO / "deployments" / "experiments" / "cluster_gpu.yaml")
    assert exp.cluster.storage.startswith("/mnt/shared/") and exp.data.store.startswith("/mnt/shared/")
    assert "cluster_gpu.yaml" in (REPO / "cluster.yaml").read_text()


def test_rayjob_manifest_has_the_crds_required_keys():
    """No KubeRay CRD schema is available offline: the keys the ray.io/v1 CRD requires, and the shared volume."""
    docs = list(yaml.safe_load_all((REPO / "deployments" / "kuberay" / "rayjob.yaml").read_text()))
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    spec = job["spec"]
    assert spec["entrypoint"].startswith("raylearn run deployments/experiments/")
    entry_cfg = REPO / spec["entrypoint"].split()[-1]
    assert entry_cfg.is_file()
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["template"]["spec"]["containers"][0]["image"]
    for group in cluster["workerGroupSpecs"]:
        for key in ("groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"):
            assert key in group, key
        container = group["template"]["spec"]["containers"][0]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    for pod in [head, *cluster["workerGroupSpecs"]]:
        mounts = {m["mountPath"]: m["name"] for m in pod["template"]["spec"]["containers"][0]["volumeMounts"]}
        vols = {v["name"]: v for v in pod["template"]["spec"]["volumes"]}
        assert vols[mounts["/mnt/shared"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]


def test_bad_cluster_request_is_a_config_error_before_any_work(ray_session, tmp_path):
    """On the live (CPU-only) test cluster: asking for a GPU fails at start, naming the key and the count."""
    from raylearn.runtime import plan_cluster

    cfg = ExperimentConfig(output_dir=str(tmp_path), cluster={"gpus": 2})
    with pytest.raises(ConfigError, match=r"cluster\.gpus: 2 GPU\(s\) requested but the cluster has 0"):
        plan_cluster(cfg, 10)
    assert plan_cluster(ExperimentConfig(output_dir=str(tmp_path)), 10).n_shards == 2
