"""One live :class:`~raylearn.pool.ShardedPool` handed from run to run: ``compare``'s strategies and seeds.

Starting pool shards is import-bound (torch + MONAI in every actor, 25-40 s on 2 cores), so consecutive runs over
one store re-balance the live shards onto their own cases (:meth:`ShardedPool.reset`) instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from raylearn.experiment import PoolConfig
from raylearn.pool import ShardedPool
from raylearn.pool_shard import CaseHook
from raylearn.pool_support import PoolError, open_store

__all__ = ["PoolCache"]

log = logging.getLogger(__name__)


class PoolCache:
    """Holds the last pool a run got from :meth:`get`.

    :meth:`get` resets the held pool to the run's cases when it was started with the same store, shard count,
    resources, pool config and node pins, and neither it nor the new run has a case hook; otherwise it shuts the
    held pool down and starts a new one. A run hands the pool back with :meth:`release`; :meth:`close` shuts down
    the held one.
    """

    def __init__(self) -> None:
        self._pool: ShardedPool | None = None
        self._key: tuple | None = None
        self.started = 0  #: pools started (the rest of the :meth:`get` calls re-used one)
        self.reused = 0

    def get(self, store: Any, *, n_shards: int, resources_per_shard: Mapping[str, float], config: PoolConfig,
            case_ids: Sequence[str], shard_nodes: Sequence[str] | None = None,
            case_hook: CaseHook | None = None) -> ShardedPool:
        # a case hook is never shared: such a pool's key matches no other (not even another hooked run's)
        key = None if case_hook is not None else (
            str(getattr(open_store(store), "path", store)), int(n_shards),
            tuple(sorted((k, float(v)) for k, v in resources_per_shard.items())),
            config.model_dump_json(), tuple(shard_nodes or ()))
        if self._pool is not None and key is not None and key == self._key and \
                self._pool.n_shards == min(int(n_shards), len(set(case_ids))):
            try:
                self._pool.reset(case_ids)
                self.reused += 1
                log.info("pool: re-using %d live shards for %d cases", self._pool.n_shards, len(set(case_ids)))
                return self._pool
            except PoolError as err:
                log.warning("pool: cannot re-use the live shards (%s); starting new ones", err)
        self.close()
        self._pool = ShardedPool(store, n_shards=n_shards, resources_per_shard=resources_per_shard, config=config,
                                 case_ids=case_ids, case_hook=case_hook, shard_nodes=shard_nodes)
        self._key = key
        self.started += 1
        return self._pool

    def release(self, failed: bool = False) -> None:
        """The run is done with the held pool: it stays live for the next :meth:`get`, unless the run failed while
        holding it (its shards may be half-way through a call)."""
        if failed:
            self.close()

    def close(self) -> None:
        """Shut the held pool down (idempotent)."""
        if self._pool is not None:
            self._pool.shutdown()
        self._pool = self._key = None
