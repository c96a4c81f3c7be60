"""Shard recovery of the sharded pool (:class:`raylearn.pool.ShardedPool`'s driver side): a shard that stays dead, or
whose node leaves the cluster, has its cases moved onto the live shards (or a fresh actor) and the call re-run there.

Ray restarts a crashed shard actor by itself (``max_restarts``, ``max_task_retries``); what is here handles what Ray
does not: a shard dead for good, and a node that is gone while no other node has room for the shard (Ray would
wait on that restart). :class:`ShardRecovery` is a mixin over the pool's own state (shard actors, case assignment,
nodes, voxel counts), which both the normal path and recovery read and change.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import ray

from raylearn.pool_support import balance

log = logging.getLogger("raylearn.pool")

#: what a call on a dead shard raises (ActorUnschedulableError: a shard pinned to a node that is gone cannot be
#: restarted, so its cases move)
ACTOR_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                ray.exceptions.ActorUnschedulableError)


class NodeLost(RuntimeError):
    """A shard's node left the cluster while the driver waited on the shard."""


class ShardRecovery:
    """Moving a lost shard's cases to live shards and re-running its calls (mixed into ``ShardedPool``).

    Uses the pool's ``config`` (``node_check_s``), ``_actors`` / ``_assign`` (shard -> actor / pool case ids),
    ``_nodes`` (shard -> node id), ``_pids``, ``_sizes`` (case -> voxel count), ``_lost_refs`` (calls whose node
    left: their late results are never read), ``_spread`` and ``_spawn``.
    """

    config: Any
    _actors: dict[int, Any]
    _assign: dict[int, list[str]]
    _nodes: dict[int, str]
    _pids: dict[int, int]
    _sizes: dict[str, int]
    _lost_refs: set[Any]
    # and ShardedPool's methods _spread(ids) -> [(shard, ids)] and _spawn(ids) -> shard

    def _run_spread(self, method: str, args: tuple, ids: Sequence[str]) -> list[Any]:
        """Call ``method(*args, chunk)`` on the shards over ``ids`` and gather the results; a chunk whose shard
        dies (or whose node leaves) is re-run on the live shards, the dead shard's pool cases moved to them."""
        out: list[Any] = []
        todo = [(i, getattr(self._actors[i], method).remote(*args, chunk), chunk) for i, chunk in self._spread(ids)]
        for i, ref, chunk in todo:
            try:
                out.append(self._get_watching_nodes(ref, i))
            except ACTOR_ERRORS + (NodeLost,) as err:
                log.warning("pool: shard %d lost during %s (%s); re-running %d case(s)", i, method,
                            str(err).splitlines()[0], len(chunk))
                if i in self._actors:
                    self._replace(i, [])
                out.extend(self._run_spread(method, args, chunk))
        return out

    def _on_lost_nodes(self, busy: Mapping[Any, int]) -> list[Any]:
        """Refs in ``busy`` (ref -> shard) whose shard sits on a node that left the cluster. Ray would restart
        such a shard elsewhere only if some node has room, and a call waits on that restart; the driver moves
        those cases to live shards instead (a late result of the lost call is never read: exactly once)."""
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        lost = [ref for ref, i in busy.items() if self._nodes.get(i) and self._nodes[i] not in alive]
        for ref in lost:
            log.warning("pool: shard %d's node %s left the cluster", busy[ref], self._nodes[busy[ref]][:8])
            self._lost_refs.add(ref)
        return lost

    def _raise_lost(self, i: int) -> Any:
        raise NodeLost(f"shard {i}'s node {self._nodes.get(i, '?')[:8]} left the cluster")

    def _get_watching_nodes(self, ref: Any, owner: int) -> Any:
        """``ray.get(ref)`` of shard ``owner``'s call, raising :class:`NodeLost` when its node leaves meanwhile."""
        while True:
            done, _ = ray.wait([ref], timeout=self.config.node_check_s)
            if done:
                return ray.get(ref)
            if self._on_lost_nodes({ref: owner}):
                self._lost_refs.discard(ref)
                self._raise_lost(owner)

    def _replace(self, dead: int, ids: Sequence[str]) -> dict[int, list[str]]:
        """Move a dead shard's cases onto the survivors (or a fresh actor); return who re-scores ``ids``."""
        if dead in self._actors:
            lost = self._assign.pop(dead)
            ray.kill(self._actors.pop(dead), no_restart=True)
            survivors = sorted(self._actors)
            if survivors:
                loads = [sum(self._sizes[c] for c in self._assign[j]) for j in survivors]
                for j, members in zip(survivors, balance([self._sizes[c] for c in lost], len(survivors), loads),
                                      strict=True):
                    self._assign[j].extend(lost[k] for k in members)
            else:
                j = self._spawn(lost)
                self._pids[j] = -1
        owner = {c: j for j, held in self._assign.items() for c in held}
        groups: dict[int, list[str]] = {}
        for c in ids:
            if c in owner:  # a case labelled meanwhile is no longer owned and needs no score
                groups.setdefault(owner[c], []).append(c)
        return groups
