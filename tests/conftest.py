"""Shared pytest fixtures: one Ray session for the whole run, data locations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Ray starts workers at nice 15, which starves actors against other load on a shared 2-core machine
os.environ.setdefault("RAY_worker_niceness", "0")

REPO = Path(__file__).resolve().parents[1]
HIPPOCAMPUS = REPO.parent / "shared" / "data" / "msd_hippocampus"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every Ray test (2 CPUs, 1 GB object store)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # never attach to another cluster a `ray start` left on this machine
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=1024**3,
            log_to_driver=False,
            runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def hippocampus_dir() -> Path:
    """The real MSD Task04 hippocampus data shipped beside the repo (skip when absent)."""
    if not (HIPPOCAMPUS / "dataset.json").is_file():
        pytest.skip(f"hippocampus data not found at {HIPPOCAMPUS}")
    return HIPPOCAMPUS
