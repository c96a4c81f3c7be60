"""The resource plan of a run: which phase holds how much of which node, checked before round 0 (no Ray import).

Scoring, training and evaluation take the cluster's GPUs in turn. With G GPUs (``cluster.gpus``, default all):

- ``pool.n_shards`` (default G) :class:`~raylearn.pool.PoolShard` actors each hold ``cluster.gpus_per_shard`` of a
  GPU (and ``pool.num_cpus``) for the whole run: their cases stay resident, they score the pool and evaluate the
  test split on that GPU share;
- ``cluster.train_workers`` (default G) Ray Train workers (DDP) each hold the rest of a GPU
  (``1 - gpus_per_shard``, and 1 CPU unless ``train.resources_per_worker`` says otherwise).

Both are fractional requests, so Ray places one shard and one training worker on each GPU and the phases, which
the loop runs one after the other, never wait for a device another phase holds idle. Ray's fractional GPUs do
not cap memory: each process sees the whole device and the phases are sequential, so they do not compete.

:func:`plan_resources` simulates the placement on the live nodes (a greedy fit, the way Ray's SPREAD and PACK
strategies place these bundles) and raises :class:`ResourcePlanError` naming the config key to change when the
plan cannot fit, instead of letting an actor or a training worker pend forever.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["NodeInfo", "ResourcePlan", "ResourcePlanError", "nodes_from_ray", "plan_resources"]

_EPS = 1e-9


class ResourcePlanError(ValueError):
    """The run's resource requests cannot fit the cluster; the message names the keys to change."""


@dataclass(frozen=True)
class NodeInfo:
    """One alive Ray node: its id, address and logical ``CPU`` / ``GPU`` totals."""

    node_id: str
    address: str
    cpus: float
    gpus: float

    def label(self) -> str:
        return f"{self.address or self.node_id[:8]} ({self.cpus:g} CPU, {self.gpus:g} GPU)"


@dataclass(frozen=True)
class ResourcePlan:
    """What each phase requests (Ray option names), and where the simulation placed it.

    Attributes:
        use_gpu: training and scoring run on GPUs.
        gpus: GPUs the plan uses (0 on a CPU-only run).
        n_shards: pool shard actors; evaluation and labelled-case features spread over them too.
        shard: ``{"num_cpus": c, "num_gpus": g}`` of each shard actor.
        train_workers: Ray Train ``ScalingConfig.num_workers``.
        min_train_workers: after a node is lost the driver re-plans training down to this many workers (None = no
            re-plan: the run fails when its worker group cannot start again).
        train_resources: Ray Train ``resources_per_worker`` (``{"CPU": c, "GPU": g}``).
        placement: ``"address/node-id prefix"`` -> what the simulation put there (for logs).
        shard_nodes: the node id of each shard in the simulation; the pool pins shard i there, so a shard whose
            node is lost dies instead of being restarted elsewhere onto the GPU share training needs.
    """

    use_gpu: bool
    gpus: int
    n_shards: int
    shard: dict[str, float]
    train_workers: int
    train_resources: dict[str, float]
    min_train_workers: int | None = None
    placement: dict[str, list[str]] = field(default_factory=dict)
    shard_nodes: list[str] = field(default_factory=list)

    def scaling(self) -> dict:
        """What :class:`~raylearn.train.service.TrainingService` takes as ``scaling``."""
        return {"num_workers": self.train_workers, "use_gpu": self.use_gpu,
                "resources_per_worker": dict(self.train_resources)}

    def describe(self) -> str:
        return (f"{self.n_shards} shard(s) x {self.shard}, {self.train_workers} train worker(s) x "
                f"{self.train_resources}, {'GPU' if self.use_gpu else 'CPU'} run on {self.gpus} GPU(s)")


def nodes_from_ray(ray_nodes: Iterable[Mapping[str, Any]]) -> list[NodeInfo]:
    """``ray.nodes()`` -> alive :class:`NodeInfo` s."""
    out = []
    for n in ray_nodes:
        if not n.get("Alive", n.get("alive", False)):
            continue
        res = n.get("Resources", {}) or {}
        out.append(NodeInfo(str(n.get("NodeID", "")), str(n.get("NodeManagerAddress", "")),
                            float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))))
    return out


class _Node:
    """Free capacity of one node during the simulation: CPUs and one free share per GPU device."""

    def __init__(self, info: NodeInfo) -> None:
        self.info = info
        self.cpu = info.cpus
        whole = int(info.gpus + _EPS)
        self.devices = [1.0] * whole + ([info.gpus - whole] if info.gpus - whole > _EPS else [])
        self.items: list[str] = []

    def device_for(self, gpu: float) -> int | None:
        if gpu <= _EPS:
            return -1
        fits = [(free, k) for k, free in enumerate(self.devices) if free + _EPS >= gpu]
        return min(fits)[1] if fits else None  # best fit: fractional requests pair up on one device

    def take(self, name: str, cpu: float, gpu: float) -> bool:
        """Place ``name`` here if it fits."""
        k = self.device_for(gpu)
        if k is None or self.cpu + _EPS < cpu:
            return False
        self.cpu -= cpu
        if k >= 0:
            self.devices[k] -= gpu
        self.items.append(name)
        return True


def _place(nodes: list[_Node], name: str, cpu: float, gpu: float, spread: bool) -> str | None:
    order = sorted(nodes, key=lambda n: (len(n.items), -n.cpu)) if spread else nodes
    return next((n.info.node_id for n in order if n.take(name, cpu, gpu)), None)


def plan_resources(nodes: list[NodeInfo], cluster: Any, pool: Any, train: Any, n_cases: int) -> ResourcePlan:
    """Plan shards and training workers for the alive ``nodes``; raise if the plan cannot fit.

    Args:
        nodes: the cluster's alive nodes (:func:`nodes_from_ray`).
        cluster: a :class:`~raylearn.experiment.ClusterConfig`.
        pool: a :class:`~raylearn.experiment.PoolConfig` (``n_shards``, ``num_cpus``, ``num_gpus``).
        train: a :class:`~raylearn.models.config.TrainConfig` (``num_workers``, ``use_gpu``,
            ``resources_per_worker``).
        n_cases: unlabeled pool cases (never more shards than cases).

    Raises:
        ResourcePlanError: more GPUs requested than exist, GPU training without GPUs, or the requests do not fit
            the nodes' CPUs and GPUs together.
    """
    if not nodes:
        raise ResourcePlanError("the Ray cluster has no alive node")
    total_gpu = sum(n.gpus for n in nodes)
    total_cpu = sum(n.cpus for n in nodes)
    per_node = ", ".join(n.label() for n in nodes)
    if cluster.gpus == "auto":
        gpus = int(total_gpu + _EPS)
    else:
        gpus = int(cluster.gpus)
        if gpus > total_gpu + _EPS:
            raise ResourcePlanError(
                f"cluster.gpus: {gpus} GPU(s) requested but the cluster has {total_gpu:g} on {len(nodes)} node(s) "
                f"[{per_node}]; set cluster.gpus to at most {int(total_gpu + _EPS)} (or 'auto'), or add GPU nodes")
    if train.use_gpu and gpus == 0:
        raise ResourcePlanError(
            f"train.use_gpu: true but the plan has no GPU (cluster.gpus: {cluster.gpus!r}; the cluster has "
            f"{total_gpu:g} GPU(s) [{per_node}]); set train.use_gpu: false or run on a cluster with GPUs")
    use_gpu = gpus > 0
    n_shards = int(pool.n_shards or gpus or max(1, int(total_cpu)))
    n_shards = max(1, min(n_shards, n_cases))
    shard_gpu = float(pool.num_gpus) if pool.num_gpus is not None else (cluster.gpus_per_shard if use_gpu else 0.0)
    shard = {"num_cpus": float(pool.num_cpus), "num_gpus": shard_gpu}
    if cluster.train_workers == "auto":
        workers = gpus if use_gpu else int(train.num_workers)
    else:
        workers = int(cluster.train_workers)
    res = dict(train.resources_per_worker or {})
    res.setdefault("CPU", 1.0)
    if use_gpu:
        res.setdefault("GPU", round(1.0 - shard_gpu, 6) if shard_gpu < 1 else 1.0)
    train_res = {k: float(v) for k, v in res.items() if float(v) > 0 or k == "CPU"}
    min_workers = cluster.min_train_workers
    if min_workers is not None and min_workers > workers:
        raise ResourcePlanError(f"cluster.min_train_workers: {min_workers} exceeds the {workers} training "
                                "worker(s) of the plan (cluster.train_workers)")

    sim = [_Node(n) for n in sorted(nodes, key=lambda n: n.node_id)]
    needs = (f"{n_shards} pool shard(s) x {shard_gpu:g} GPU + {pool.num_cpus:g} CPU (pool.n_shards, "
             f"cluster.gpus_per_shard / pool.num_gpus, pool.num_cpus) and {workers} training worker(s) x "
             f"{train_res.get('GPU', 0):g} GPU + {train_res['CPU']:g} CPU (cluster.train_workers, "
             f"train.resources_per_worker)")
    shard_nodes = []
    for i in range(n_shards):  # shards spread over the nodes (Ray's SPREAD), one per GPU first
        shard_nodes.append(_place(sim, f"shard {i}", shard["num_cpus"], shard_gpu, spread=True))
        if shard_nodes[-1] is None:
            raise ResourcePlanError(f"the resource plan does not fit the cluster: shard {i} finds no node with "
                                    f"{pool.num_cpus:g} CPU and {shard_gpu:g} GPU free. Needs: {needs}. "
                                    f"Cluster: {total_cpu:g} CPU, {total_gpu:g} GPU [{per_node}]")
    for w in range(workers):  # Ray Train packs its workers (placement group, PACK)
        if _place(sim, f"train worker {w}", train_res["CPU"], train_res.get("GPU", 0.0), spread=False) is None:
            raise ResourcePlanError(f"the resource plan does not fit the cluster: training worker {w} finds no "
                                    f"node with {train_res['CPU']:g} CPU and {train_res.get('GPU', 0):g} GPU free "
                                    f"beside the shards. Needs: {needs}. Cluster: {total_cpu:g} CPU, "
                                    f"{total_gpu:g} GPU [{per_node}]")
    return ResourcePlan(use_gpu=use_gpu, gpus=gpus, n_shards=n_shards, shard=shard,
                        train_workers=workers, train_resources=train_res, min_train_workers=min_workers,
                        placement={f"{n.info.address}/{n.info.node_id[:8]}": n.items for n in sim if n.items},
                        shard_nodes=[str(n) for n in shard_nodes])
