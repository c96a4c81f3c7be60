"""Shared pytest fixtures: one Ray session for the whole run, free ports, data locations."""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Ray starts workers at nice 15, which starves actors against other load on a shared 2-core machine
os.environ.setdefault("RAY_worker_niceness", "0")

REPO = Path(__file__).resolve().parents[1]
HIPPOCAMPUS = REPO.parent / "shared" / "data" / "msd_hippocampus"
#: SUGFW's SAM extractor at its smallest: random weights (nothing is downloaded), 64 px, one encoder block, one
#: slice per volume (the extractor, cold-start loop and sharded extraction tests)
SAM_SMALL = {"random_weights": True, "img_size": 64, "encoder_depth": 1, "points_per_side": 2, "max_slices": 1,
             "n_aug": 2}


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every Ray test (2 CPUs, 1 GB object store)."""
    import ray

    from raylearn.runtime import start_local_ray

    if not ray.is_initialized():
        start_local_ray(2, runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def pick_free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that are free now on every interface, for a server a test starts itself.

    Drawn at random between Ray's default worker port range (10002-19999) and the kernel's ephemeral range
    (``ip_local_port_range``, 32768 up by default), so neither Ray's workers nor outgoing connections take
    them in the moments before the server binds; all ``n`` are held bound together, so they are distinct.
    Never a fixed default port: a second Ray instance on the machine (this pytest session's, another
    user's) already holds those.
    """
    low, high = 20000, min(_ephemeral_low(), 65536) - 1
    rng = random.Random()  # OS-seeded: parallel test runs draw different ports
    held: list[socket.socket] = []
    try:
        for _ in range(50 * n):
            if len(held) == n:
                break
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind(("0.0.0.0", rng.randint(low, high)))
            except OSError:
                sock.close()
                continue
            held.append(sock)
        if len(held) < n:
            raise RuntimeError(f"found only {len(held)} of {n} free ports in {low}-{high}")
        return [s.getsockname()[1] for s in held]
    finally:
        for sock in held:
            sock.close()


@pytest.fixture
def free_ports() -> Callable[[int], list[int]]:
    """``free_ports(n)``: see :func:`pick_free_ports`."""
    return pick_free_ports


@pytest.fixture(scope="session")
def hippocampus_dir() -> Path:
    """The real MSD Task04 hippocampus data shipped beside the repo (skip when absent)."""
    if not (HIPPOCAMPUS / "dataset.json").is_file():
        pytest.skip(f"hippocampus data not found at {HIPPOCAMPUS}")
    return HIPPOCAMPUS
