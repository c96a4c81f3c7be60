"""Where a run executes: the Ray connection, the pool store, the seeds and resolved settings of a round."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from raylearn.config import ConfigError
from raylearn.experiment import ExperimentConfig

__all__ = ["ensure_ray", "ensure_store", "resolved_model", "round_seed"]

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
    for attempt in (1, 2):
        try:
            ray.init(
                address="local",
                num_cpus=num_cpus or min(os.cpu_count() or 2, 8),
                include_dashboard=False,
                object_store_memory=1024**3,
                log_to_driver=False,
            )
            return
        except Exception as err:  # Ray gives its raylet a fixed 30 s to register: too short on a loaded machine
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(err):
                raise
            log.warning("the local Ray instance timed out during start-up (machine loaded?); trying once more")


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
