"""Configuration of the sharded pool (ray-free, so ``raylearn.config`` users can import it without Ray).

YAML section (all keys optional)::

    pool:
      n_shards: null          # null: one shard per GPU in the cluster, else one per CPU
      num_cpus: 0.25          # logical CPUs reserved per shard actor (fractional on a laptop)
      num_gpus: null          # null: 1 when the cluster has GPUs, else 0
      torch_threads: null     # null: max(1, floor(num_cpus)) threads per shard
      max_restarts: 3         # Ray restarts of a dead shard actor
      max_task_retries: 3     # Ray retries of a scoring call interrupted by an actor death
      max_redistributions: 4  # per round: how often a permanently dead shard's cases may move
      prefault: true          # read each held case once at load so it is resident before scoring
      progress: true          # tqdm progress bar while a round is scored
"""

from __future__ import annotations

from pydantic import Field

from raylearn.config import StrictModel

__all__ = ["PoolConfig"]


class PoolConfig(StrictModel):
    """How the unlabeled pool is sharded over Ray actors.

    Attributes:
        n_shards: number of ``PoolShard`` actors; ``None`` = GPUs in the cluster, else CPUs.
        num_cpus: logical CPUs reserved per shard (a Ray scheduling hint; may be fractional).
        num_gpus: GPUs per shard; ``None`` = 1 on a cluster with GPUs, else 0.
        torch_threads: intra-op threads of torch inside a shard; ``None`` = ``max(1, floor(num_cpus))``.
        max_restarts: Ray ``max_restarts`` of each shard actor (-1 = unlimited).
        max_task_retries: Ray ``max_task_retries`` of each shard actor (-1 = unlimited).
        max_redistributions: per scoring round, how many permanently dead shards may have their
            cases moved to the surviving shards (or to a replacement actor) before giving up.
        prefault: touch every held case once at load so its pages are resident before scoring.
        progress: show a tqdm progress bar (cases scored) on the driver.
    """

    n_shards: int | None = Field(default=None, ge=1)
    num_cpus: float = Field(default=0.25, ge=0)
    num_gpus: float | None = Field(default=None, ge=0)
    torch_threads: int | None = Field(default=None, ge=1)
    max_restarts: int = Field(default=3, ge=-1)
    max_task_retries: int = Field(default=3, ge=-1)
    max_redistributions: int = Field(default=4, ge=0)
    prefault: bool = True
    progress: bool = True
