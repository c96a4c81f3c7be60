"""Where a run executes: the Ray connection, the pool store, the seeds and resolved settings of a round."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from raylearn.config import ConfigError
from raylearn.experiment import ExperimentConfig

__all__ = ["check_nodes", "ensure_ray", "ensure_store", "label_root", "plan_cluster", "replan_training",
           "resolved_model", "round_seed", "storage_uri"]

log = logging.getLogger(__name__)

#: data and experiment files shipped inside the package (``data.dataset: demo:<name>``)
DEMO_DATA = Path(__file__).resolve().parent / "demo_data"

#: strategies whose features sample MC dropout (``model.dropout: auto`` trains them with ``mc_dropout``)
MC_FEATURES = frozenset({"mc_entropy", "bald"})


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to a running cluster (``RAY_ADDRESS``, e.g. under ``ray job submit``) or start a local one."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        return
    start_local_ray(num_cpus or min(os.cpu_count() or 2, 8))


def start_local_ray(num_cpus: int, runtime_env: dict | None = None) -> None:
    """Start a local Ray instance (never attaching to another), once more if its start-up timed out."""
    import ray

    for attempt in (1, 2):
        before = _child_pids()
        try:
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=False,
                object_store_memory=1024**3,
                log_to_driver=False,
                runtime_env=runtime_env,
            )
            return
        except Exception as err:  # Ray gives its raylet a fixed 30 s to register: too short on a loaded machine
            ray.shutdown()
            # a start-up that failed half way leaves its GCS server and raylet running (ray.shutdown does not know
            # them): stop what this attempt started, or the retry competes with it for the CPUs and ports
            _kill_children_except(before)
            if attempt == 2 or "timed out during startup" not in str(err):
                raise
            log.warning("the local Ray instance timed out during start-up (machine loaded?); trying once more")


def _child_pids() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _kill_children_except(keep: set[int]) -> None:
    """Kill this process's descendants not in ``keep`` (what a failed ``ray.init`` started)."""
    import psutil

    procs = [p for p in psutil.Process().children(recursive=True) if p.pid not in keep]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def round_seed(seed: int, round_index: int) -> int:
    """Seed of a round's strategy and training, derived from the experiment seed (resume-stable)."""
    return int(np.random.SeedSequence([int(seed), int(round_index)]).generate_state(1)[0])


def ensure_store(cfg: ExperimentConfig, progress: bool = True):
    """Ingest the configured dataset into the pool store (a no-op when already ingested) and open it."""
    from raylearn.data.phantom import make_phantom_dataset
    from raylearn.data.store import PoolStore, ingest

    out = Path(cfg.output_dir)
    store_dir = Path(cfg.data.store) if cfg.data.store else out / "store"
    if cfg.data.dataset == "phantom":
        ph = cfg.data.phantom
        dataset = store_dir.with_name(store_dir.name + "_phantom_src")
        if not (dataset / "dataset.json").is_file():
            log.info("generating %d phantom cases of %s voxels in %s", ph.n_cases, ph.shape, dataset)
            make_phantom_dataset(dataset, n_cases=ph.n_cases, shape=tuple(ph.shape), seed=ph.seed)
    elif cfg.data.dataset.startswith("demo:"):  # data shipped inside the package (the embedded default)
        dataset = DEMO_DATA / cfg.data.dataset.removeprefix("demo:")
        if not (dataset / "dataset.json").is_file():
            shipped = sorted(p.name for p in DEMO_DATA.iterdir() if p.is_dir())
            raise ConfigError(f"data.dataset: no shipped dataset {cfg.data.dataset!r} (shipped: {shipped})")
    else:
        dataset = Path(cfg.data.dataset)
        if not dataset.exists():
            raise ConfigError(f"data.dataset: {dataset} does not exist")
    ingest(dataset, store_dir, cfg.data.preprocess, n_test=cfg.data.n_test, test_fraction=cfg.data.test_fraction,
           seed=cfg.data.split_seed, progress=progress)
    return PoolStore.open(store_dir)


def resolved_model(cfg: ExperimentConfig, store):
    """The experiment's model config with ``auto`` settings resolved for this store and strategy."""
    from raylearn.models.config import resolve_model_config
    from raylearn.strategies import build_strategy

    try:
        requires = set(build_strategy(cfg.strategy.name, **cfg.strategy.params).requires)
    except (TypeError, ValueError, KeyError) as err:
        raise ConfigError(f"strategy: {err}") from None
    shapes = [tuple(s) for s in store.manifest["shape"]]  # from the manifest: no volume is read
    return resolve_model_config(cfg.model, shapes, mc_dropout_needed=bool(requires & MC_FEATURES))


# -- the cluster: resource plan, storage every node resolves, a probe per node ----------------------------------
def storage_uri(cfg: ExperimentConfig) -> str:
    """Ray Train's ``storage_path``: ``cluster.storage`` (a URI pyarrow resolves: local/NFS path, ``s3://``,
    ``gs://``), else ``<output_dir>/ray_train`` made absolute (readable by other nodes only on a shared
    filesystem, which :func:`check_nodes` verifies)."""
    if cfg.cluster.storage:
        uri = cfg.cluster.storage
        return uri if "://" in uri else str(Path(uri).expanduser().resolve())
    return str((Path(cfg.output_dir) / "ray_train").expanduser().resolve())


def plan_cluster(cfg: ExperimentConfig, n_cases: int):
    """The run's :class:`~raylearn.resource_plan.ResourcePlan` on the connected cluster (raises
    :class:`ConfigError` naming the keys when it cannot fit)."""
    import ray

    from raylearn.resource_plan import ResourcePlanError, nodes_from_ray, plan_resources

    try:
        plan = plan_resources(nodes_from_ray(ray.nodes()), cfg.cluster, cfg.pool, cfg.train, n_cases)
    except ResourcePlanError as err:
        raise ConfigError(str(err)) from None
    log.info("resource plan: %s; placement %s", plan.describe(), plan.placement)
    return plan


def label_root(cfg: ExperimentConfig) -> Path:
    """Folder of the run's versioned label store: ``cluster.label_store``, else ``<output_dir>/labels``. Training
    workers read labels from it, so on several nodes it must be on a filesystem they all mount."""
    return Path(cfg.cluster.label_store or Path(cfg.output_dir) / "labels").expanduser().resolve()


def replan_training(cfg: ExperimentConfig, n_cases: int):
    """A callable for :class:`~raylearn.train.backends.MonaiRounds`: the training ``scaling`` planned on the cluster
    as it is now (after lost nodes), or :class:`ConfigError` when fewer than ``cluster.min_train_workers`` fit.
    None when ``cluster.min_train_workers`` is unset (no re-plan)."""
    floor = cfg.cluster.min_train_workers
    if floor is None:
        return None

    def replan() -> dict:
        plan = plan_cluster(cfg.model_copy(update={"cluster": cfg.cluster.model_copy(
            update={"train_workers": "auto", "min_train_workers": None})}), n_cases)
        if plan.train_workers < floor:
            raise ConfigError(f"cluster.min_train_workers: only {plan.train_workers} training worker(s) fit the "
                              f"cluster left after losing nodes ({plan.describe()}); {floor} required")
        return plan.scaling()

    return replan


def _probe(store_path: str, case_id: str, shared: dict[str, str], marker: str, token: str) -> dict:
    """On one node: open the pool store and read a case; read the marker the driver wrote into each shared
    location (``{config key: URI}``). Returns ``{"node_id", "data.store": error | None, key: error | None, ...}``."""
    import pyarrow.fs as pafs
    import ray

    from raylearn.data.store import PoolStore

    out: dict = {"node_id": ray.get_runtime_context().get_node_id(), "data.store": None}
    try:
        store = PoolStore.open(store_path)
        float(np.asarray(store.get(case_id).image).sum())
    except Exception as err:  # noqa: BLE001 - reported back per node
        out["data.store"] = f"{type(err).__name__}: {err}"
    for key, uri in shared.items():
        out[key] = None
        try:
            fs, path = pafs.FileSystem.from_uri(uri)
            with fs.open_input_stream(f"{path}/{marker}") as f:
                if f.read().decode() != token:
                    out[key] = "the marker file holds another run's token"
        except Exception as err:  # noqa: BLE001
            out[key] = f"{type(err).__name__}: {err}"
    return out


_FIX = {
    "data.store": "Put data.store on storage every node mounts at the same path (NFS/EFS), or run on one node",
    "cluster.storage": "Set cluster.storage to a path every node mounts (NFS/EFS) or an object-store URI "
                       "(s3://..., gs://...)",
    "cluster.label_store": "Set cluster.label_store to a folder every node mounts at the same path (NFS/EFS)",
}


def check_nodes(store, shared: dict[str, str], timeout_s: float = 300.0) -> int:
    """One probe task pinned to every alive node (``NodeAffinitySchedulingStrategy``, 0 CPUs): it must read the
    pool store and a marker the driver writes into each of ``shared`` (``{config key: path or URI}``, e.g. Ray
    Train's storage and the label store). Raises :class:`ConfigError` naming the key, the nodes that failed and
    what to change. Returns the number of nodes probed.

    The pool store is read in place, so it must be on storage every node mounts at the same path (NFS/EFS): it
    is not copied to nodes. On a one-node cluster (the driver's) there is nothing to probe."""
    import uuid

    import pyarrow.fs as pafs
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if [n["NodeID"] for n in nodes] == [ray.get_runtime_context().get_node_id()]:
        return 1  # a single node, the driver's own: what the driver reads, every task reads
    marker, token = f".raylearn-probe-{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
    written = []
    try:
        for uri in shared.values():
            fs, path = pafs.FileSystem.from_uri(uri)
            fs.create_dir(path, recursive=True)
            with fs.open_output_stream(f"{path}/{marker}") as f:
                f.write(token.encode())
            written.append((fs, f"{path}/{marker}"))
        probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
        case_id = sorted(store.case_ids())[0]
        refs = {n["NodeManagerAddress"] + " " + n["NodeID"][:8]: probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            str(store.path), case_id, dict(shared), marker, token) for n in nodes}
        got = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s), strict=True))
    finally:
        for fs, path in written:
            fs.delete_file(path)
    where = {"data.store": str(store.path), **shared}
    for key in ("data.store", *shared):
        bad = {node: res[key] for node, res in got.items() if res[key]}
        if bad:
            raise ConfigError(f"{key}: {len(bad)} of {len(got)} node(s) cannot read {where[key]} "
                              f"({'; '.join(f'{k}: {v}' for k, v in bad.items())}). {_FIX[key]}")
    return len(got)
