"""The unlabeled pool, sharded over Ray actors: parallel, fault-tolerant feature scoring.

Each :class:`PoolShard` actor memory-maps only its own cases from the :class:`~raylearn.data.store.PoolStore`
and keeps them resident; per round the driver ``ray.put``s the checkpoint once, every shard loads the
segmenter (cached by checkpoint hash), runs :func:`raylearn.scoring.features.compute_features` on each of
its cases and returns compact per-case results (scalars, small vectors, float16 embeddings), never voxel
maps. :class:`ShardedPool` is the driver side::

    pool = ShardedPool(store, config=PoolConfig(num_cpus=0.5))
    scores = pool.score(segmenter_or_checkpoint, ["least_confidence", "embedding"], FeatureParams())
    PoolView(ids=scores["ids"], labeled_mask=..., features=scores["features"])
    pool.mark_labeled(selected_ids)

Fault tolerance: shard actors run with Ray ``max_restarts`` / ``max_task_retries``. A restarted actor
re-opens the store from its constructor arguments, and every scoring call carries the ids the shard is
responsible for *now* (the driver remembers removals), so an interrupted call that Ray retries on the
restarted actor re-loads exactly the right cases. A shard that stays dead has its cases balanced onto the
survivors (or a replacement actor): :mod:`raylearn.pool_recovery`. The driver checks that a round covers every
pool case exactly once.

Case hook: ``ShardedPool(..., case_hook=fn)`` runs ``fn(shard_index, position, case_id)`` inside the shard
process after each case is scored. It is the one place to observe a round from within (progress, timing)
and to inject faults: the tests register hooks that exit the process or stall a shard at a known case.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import ray
from tqdm.auto import tqdm

from raylearn.experiment import PoolConfig
from raylearn.pool_recovery import ACTOR_ERRORS, NodeLost, ShardRecovery
from raylearn.pool_shard import CaseHook, PoolShard
from raylearn.pool_support import (
    MAX_ELEMENTS_PER_CASE,
    PoolError,
    balance,
    checkpoint_bytes,
    checkpoint_digest,
    merge_results,
    open_store,
    voxel_counts,
)

__all__ = ["PoolConfig", "PoolError", "PoolShard", "ShardedPool", "balance", "MAX_ELEMENTS_PER_CASE"]

log = logging.getLogger(__name__)

class ShardedPool(ShardRecovery):
    """Driver side of the sharded pool: creates the shard actors, scores rounds, tracks labelled cases.

    Args:
        store: a :class:`~raylearn.data.store.PoolStore` or its path.
        n_shards: number of shard actors; default ``config.n_shards``, else the GPUs in the Ray cluster,
            else its CPUs (never more than the number of cases).
        resources_per_shard: ``{"num_cpus": x, "num_gpus": y}`` overriding ``config``.
        case_ids: the pool (default ``store.case_ids("pool")``).
        config: a :class:`PoolConfig` (restarts, retries, threads, progress).
        case_hook: ``hook(shard_index, position, case_id)`` run in each shard after every scored case
            (monitoring, fault injection in tests); see :class:`PoolShard`.
        shard_nodes: node id per shard (the resource plan's); shard i is pinned there. Replacement shards and
            shards beyond the list are placed with ``SPREAD``.

    Raises:
        PoolError: Ray is not initialised, the pool is empty, or ``case_ids`` names cases not in the store.
    """

    DEFAULT_SEGMENTER = "raylearn.models.unet:MonaiSegmenter"
    #: modules each shard imports at start-up, so the first round does not pay for them
    PRELOAD = ("raylearn.scoring.features", "raylearn.models.unet", "monai.inferers")

    def __init__(self, store: Any, n_shards: int | None = None, resources_per_shard: Mapping[str, float] | None = None,
                 case_ids: Sequence[str] | None = None, config: PoolConfig | None = None,
                 case_hook: CaseHook | None = None, shard_nodes: Sequence[str] | None = None) -> None:
        if not ray.is_initialized():
            raise PoolError("ShardedPool needs a running Ray instance: call ray.init() first")
        self.config = cfg = config or PoolConfig()
        self.store = open_store(store)
        ids = self._checked_ids(case_ids)
        res = ray.cluster_resources()
        n = n_shards or cfg.n_shards or int(res.get("GPU", 0)) or max(1, int(res.get("CPU", 1)))
        n = min(n, len(ids))
        rps = dict(resources_per_shard or {})
        unknown = set(rps) - {"num_cpus", "num_gpus"}
        if unknown:
            raise PoolError(f"resources_per_shard: unknown key(s) {sorted(unknown)} (allowed: num_cpus, num_gpus)")
        num_gpus = rps.get("num_gpus", cfg.num_gpus)
        if num_gpus is None:  # a share of a GPU: training workers take the rest (raylearn.resource_plan)
            from raylearn.experiment import ClusterConfig

            num_gpus = ClusterConfig().gpus_per_shard if res.get("GPU", 0) else 0
        self._resources = {"num_cpus": float(rps.get("num_cpus", cfg.num_cpus)), "num_gpus": float(num_gpus)}
        self._threads = cfg.torch_threads or max(1, int(self._resources["num_cpus"]))
        self._case_hook = case_hook
        self._shard_nodes = list(shard_nodes or [])
        self._actors: dict[int, Any] = {}
        self._assign: dict[int, list[str]] = {}
        self._pids: dict[int, int] = {}
        self._nodes: dict[int, str] = {}
        self._lost_refs: set[Any] = set()
        self._next_index = 0
        self._ckpt: tuple[str, Any] | None = None
        self.last_stats: dict[str, Any] = {}
        t0 = time.perf_counter()
        for group in self._take(ids, n):
            self._spawn(group)
        where = dict(zip(self._actors, ray.get([a.where.remote() for a in self._actors.values()]), strict=True))
        self._pids = {i: w[0] for i, w in where.items()}
        self._nodes = {i: w[1] for i, w in where.items()}
        self.startup_s = time.perf_counter() - t0
        log.info("pool: %d cases on %d shards (%s each), up in %.1f s", len(ids), n, self._resources, self.startup_s)

    def _checked_ids(self, case_ids: Sequence[str] | None) -> list[str]:
        known = set(self.store.case_ids())
        ids = sorted(self.store.case_ids("pool") if case_ids is None else dict.fromkeys(case_ids))
        missing = [c for c in ids if c not in known]
        if missing:
            where = getattr(self.store, "path", "")
            raise PoolError(f"{len(missing)} case id(s) not in the store {where}: {missing[:5]}")
        if not ids:
            raise PoolError("the pool is empty: no case ids to shard")
        return ids

    def _take(self, ids: list[str], n: int) -> list[list[str]]:
        """Make ``ids`` the pool (the ids :meth:`mark_labeled` accepts, their voxel counts) -> ``n`` groups of
        them balanced by size, one per shard."""
        self._all_ids = set(ids)
        self._sizes = dict(zip(ids, voxel_counts(self.store, ids), strict=True))
        return [[ids[k] for k in members] for members in balance([self._sizes[c] for c in ids], n)]

    def reset(self, case_ids: Sequence[str] | None = None) -> None:
        """Re-use the live shards for another run over the same store: the pool becomes ``case_ids`` (default the
        store's pool split), balanced by size over the shards as at start-up; each shard loads the cases it lacks
        and releases the rest. Starting shards is import-bound (torch + MONAI in every actor, 20-30 s on 2 cores),
        so ``compare`` resets one pool between its runs instead.

        Raises:
            PoolError: the pool was shut down, an id is not in the store, the pool would be empty or smaller than
                the shard count, or a shard is dead (start a new pool then).
        """
        if not self._actors:
            raise PoolError("reset: the pool has no live shards (shut down); start a new pool")
        ids = self._checked_ids(case_ids)
        if len(ids) < len(self._actors):
            raise PoolError(f"reset: {len(ids)} case(s) for {len(self._actors)} shards; start a smaller pool")
        index = sorted(self._actors)
        self._assign = dict(zip(index, self._take(ids, len(index)), strict=True))
        try:
            ray.get([self._actors[i].hold.remote(self._assign[i]) for i in index])
        except ACTOR_ERRORS as err:
            raise PoolError(f"reset: a shard is unavailable ({str(err).splitlines()[0]})") from None
        self.last_stats = {}

    def _spawn(self, ids: list[str]) -> int:
        i, self._next_index = self._next_index, self._next_index + 1
        # pinned to the resource plan's node when given (hard: a shard whose node is lost dies, and its cases move
        # to live shards, instead of being restarted elsewhere onto the GPU share the plan gave training); else
        # "SPREAD", one shard per node first. Neither is captured into an enclosing placement group (Tune's).
        strategy: Any = "SPREAD"
        if i < len(self._shard_nodes):
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            strategy = NodeAffinitySchedulingStrategy(self._shard_nodes[i], soft=False)
        opts = dict(self._resources, max_restarts=self.config.max_restarts,
                    max_task_retries=self.config.max_task_retries, scheduling_strategy=strategy)
        self._actors[i] = PoolShard.options(**opts).remote(
            self.store, ids, i, self._threads, self.config.prefault, self.PRELOAD, self._case_hook)
        self._assign[i] = list(ids)
        return i

    # -- public API -------------------------------------------------------------------------------
    @property
    def n_shards(self) -> int:
        return len(self._actors)

    def unlabeled_ids(self) -> list[str]:
        """The case ids still in the pool, sorted."""
        return sorted(c for ids in self._assign.values() for c in ids)

    def assignment(self) -> dict[int, list[str]]:
        """Driver-side record: shard index -> case ids it is responsible for."""
        return {i: sorted(ids) for i, ids in self._assign.items()}

    def mark_labeled(self, ids: Iterable[str]) -> None:
        """Remove labelled cases from the pool and from their shards (already-removed ids are ignored).

        Raises:
            PoolError: an id was never part of this pool.
        """
        ids = set(ids)
        unknown = sorted(ids - self._all_ids)
        if unknown:
            raise PoolError(f"mark_labeled: {len(unknown)} id(s) were never in the pool: {unknown[:5]}")
        calls = []
        for i, held in self._assign.items():
            gone = [c for c in held if c in ids]
            if gone:
                self._assign[i] = [c for c in held if c not in ids]
                calls.append(self._actors[i].remove.remote(gone))
        # bounded: a shard whose node left waits on a restart that may never find room
        ready, _ = ray.wait(calls, num_returns=len(calls), timeout=3 * self.config.node_check_s)
        try:
            ray.get(ready)
        except ACTOR_ERRORS as err:  # the driver's record wins; the next score call re-syncs the shard
            log.warning("pool: a shard was unavailable during removal (%s); it re-syncs on the next score", err)

    def shards_state(self) -> list[dict[str, Any]]:
        """Per shard: the actor's :meth:`PoolShard.state` plus ``assigned`` (driver record), ``in_sync``, ``alive``."""
        refs = {i: a.state.remote() for i, a in self._actors.items()}
        try:
            got = dict(zip(refs, ray.get(list(refs.values())), strict=True))
        except ACTOR_ERRORS:  # some shard is down: ask each one separately to tell which
            got = {}
            for i, ref in refs.items():
                try:
                    got[i] = ray.get(ref)
                except ACTOR_ERRORS as err:
                    got[i] = {"shard": i, "alive": False, "error": str(err).splitlines()[0], "ids": []}
        out = []
        for i in refs:
            st = {"alive": True, **got[i]}
            st["assigned"] = sorted(self._assign[i])
            st["in_sync"] = st["alive"] and st["ids"] == st["assigned"]
            out.append(st)
        return out

    def score(self, segmenter: Any, feature_names: Sequence[str], params: Any = None,
              segmenter_cls: str | type | None = None, slice_axis: int | None = None,
              unit_grid: Any = None) -> dict[str, Any]:
        """Score every pool case in parallel: one call per shard, gathered as they finish.

        Args:
            segmenter: a :class:`~raylearn.models.base.Segmenter`, a checkpoint path, or checkpoint bytes.
                Its bytes are ``ray.put`` once per distinct checkpoint; shards cache the loaded model by hash.
            feature_names: features to compute (names of ``raylearn.scoring.features.FEATURES``).
            params: a ``FeatureParams`` (default ``FeatureParams()``).
            segmenter_cls: class (or ``"module:QualName"``) that loads a checkpoint path/bytes; default the
                instance's own class, else ``MonaiSegmenter``.
            slice_axis: slice units: every feature per slice along this axis of ``[D, H, W]`` (shorthand of
                ``unit_grid=UnitGrid("slice", axis)``).
            unit_grid: units below a volume (:class:`raylearn.units.UnitGrid`: slices or patches): every feature
                per unit.

        Returns:
            ``{"ids": np.ndarray[str] (N,), "features": {name: np.ndarray [N, ...]}}``, rows aligned with the
            sorted unlabeled ids; each case exactly once. With units below a volume, each feature is an object
            array ``[N]`` of per-case ``float32 [S]`` vectors (one score per unit; ``[S, K]`` for vectors).
            Timings are in :attr:`last_stats`.

        Raises:
            PoolError: shards stayed dead beyond ``config.max_redistributions``, or coverage is not exactly once.
        """
        from raylearn.scoring.features import FeatureParams, validate_feature_names

        names = validate_feature_names(feature_names)  # ValueError naming unknown features, before any work
        params = FeatureParams() if params is None else params
        if unit_grid is None and slice_axis is not None:
            from raylearn.units import UnitGrid

            unit_grid = UnitGrid("slice", int(slice_axis))
        t0 = time.perf_counter()
        ref, digest, cls = self._checkpoint_ref(segmenter, segmenter_cls)
        put_s = time.perf_counter() - t0
        args = (ref, digest, cls, names, params)
        pending = {self._actors[i].score.remote(*args, ids, True, unit_grid): (i, ids)
                   for i, ids in self._assign.items() if ids}
        expected = self.unlabeled_ids()
        results: list[dict[str, Any]] = []
        moved = 0
        with tqdm(total=len(expected), unit="case", desc="scoring pool", disable=not self.config.progress,
                  leave=False) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=self.config.node_check_s)
                if not done:  # nothing finished for a while: are the busy shards' nodes still there?
                    lost = self._on_lost_nodes({ref: i for ref, (i, _) in pending.items()})
                    if not lost:
                        continue
                    done = lost
                i, ids = pending.pop(done[0])
                try:
                    if done[0] in self._lost_refs:
                        self._lost_refs.discard(done[0])
                        self._raise_lost(i)
                    res = ray.get(done[0])
                except ACTOR_ERRORS + (NodeLost,) as err:
                    moved += 1
                    if moved > self.config.max_redistributions:
                        raise PoolError(f"shard {i} lost for good and {moved - 1} redistribution(s) already "
                                        f"used this round (pool.max_redistributions): {err}") from err
                    log.warning("pool: shard %d is dead (%s); moving %d case(s)", i, type(err).__name__, len(ids))
                    for j, sub in self._replace(i, ids).items():
                        pending[self._actors[j].score.remote(*args, sub, False, unit_grid)] = (j, sub)
                    continue
                results.append(res)
                bar.update(len(res["ids"]))
        out = merge_results(results, expected)
        restarted = sorted({r["shard"] for r in results if r["pid"] != self._pids.get(r["shard"], r["pid"])})
        self._pids.update({r["shard"]: r["pid"] for r in results})
        self._nodes.update({r["shard"]: r["node_id"] for r in results})
        self.last_stats = {
            "wall_s": time.perf_counter() - t0, "put_s": put_s, "n_cases": len(expected),
            "n_shards": self.n_shards, "redistributions": moved, "restarted_shards": restarted,
            "per_shard": [{k: r[k] for k in ("shard", "load_s", "score_s", "cpu_s", "pid")} | {"n": len(r["ids"])}
                          for r in results],
        }
        return out

    # -- evaluation and labelled-case features on the warm shards ---------------------------------
    def _checkpoint_ref(self, segmenter: Any, segmenter_cls: str | type | None) -> tuple[list, str, str]:
        blob, cls = checkpoint_bytes(segmenter, segmenter_cls, self.DEFAULT_SEGMENTER)
        digest = checkpoint_digest(blob)
        if self._ckpt is None or self._ckpt[0] != digest:
            self._ckpt = (digest, ray.put(blob))  # once per checkpoint, shared by every shard and every job
        return [self._ckpt[1]], digest, cls

    def _spread(self, ids: Sequence[str]) -> list[tuple[int, list[str]]]:
        """``ids`` split over the live shards by voxel count (the test split, labelled cases): ``(shard, ids)``."""
        index = sorted(self._actors)
        sizes = voxel_counts(self.store, list(ids))
        return [(index[j], [ids[k] for k in members])
                for j, members in enumerate(balance(sizes, len(index))) if members]

    def submit_evaluate(self, segmenter: Any, ids: Sequence[str], metric_kw: Mapping[str, Any] | None = None,
                        segmenter_cls: str | type | None = None) -> list[Any]:
        """Queue test-split evaluation on the shards (non-blocking); pass the refs to :meth:`collect_evaluate`.

        Submitted before :meth:`score` with the same checkpoint, evaluation of round r and scoring for round
        r+1 share the loaded model and run back to back on every shard (each on its share of a GPU) with no
        barrier in between.
        """
        ref, digest, cls = self._checkpoint_ref(segmenter, segmenter_cls)
        return [(self._actors[i].evaluate.remote(ref, digest, cls, chunk, dict(metric_kw or {})), chunk, i)
                for i, chunk in self._spread(list(ids))]

    def collect_evaluate(self, pending: list[Any], segmenter: Any = None, metric_kw: Mapping[str, Any] | None = None,
                         segmenter_cls: str | type | None = None) -> list[dict[str, Any]]:
        """Rows of :meth:`submit_evaluate`; a chunk whose shard died (or whose node left) is re-run on live ones."""
        rows: list[dict[str, Any]] = []
        for ref, chunk, i in pending:
            try:
                rows.extend(self._get_watching_nodes(ref, i))
            except ACTOR_ERRORS + (NodeLost,) as err:
                if segmenter is None:
                    raise
                log.warning("pool: shard %d lost during evaluation (%s); re-running %d case(s)", i,
                            str(err).splitlines()[0], len(chunk))
                if i in self._actors:
                    self._replace(i, [])
                ref_, digest, cls = self._checkpoint_ref(segmenter, segmenter_cls)
                for part in self._run_spread("evaluate", (ref_, digest, cls), chunk):
                    rows.extend(part)
        return rows

    def extract(self, extractor: str, params: Any, blob: bytes, ids: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
        """Cold-start extractor features of ``ids`` on the shards (split by voxel count; a dead shard's share is
        re-run on the live ones): ``{id: {name: value}}``. ``blob`` (the extractor's weights) is ``ray.put`` once."""
        if not ids:
            return {}
        ref = [ray.put(blob)]
        digest = checkpoint_digest(blob)
        out: dict[str, dict[str, np.ndarray]] = {}
        for res in self._run_spread("extract", (ref, digest, extractor, params), list(ids)):
            for k, cid in enumerate(res["ids"]):
                out[cid] = {name: col[k] for name, col in res["features"].items()}
        return out

    def score_cases(self, segmenter: Any, ids: Sequence[str], feature_names: Sequence[str], params: Any = None,
                    segmenter_cls: str | type | None = None) -> dict[str, dict[str, np.ndarray]]:
        """Features of cases outside the pool (e.g. labelled ones) on the warm shards: ``{id: {name: value}}``."""
        from raylearn.scoring.features import FeatureParams

        if not ids:
            return {}
        params = FeatureParams() if params is None else params
        ref, digest, cls = self._checkpoint_ref(segmenter, segmenter_cls)
        out: dict[str, dict[str, np.ndarray]] = {}
        for res in self._run_spread("score_extra", (ref, digest, cls, list(feature_names), params), list(ids)):
            for k, cid in enumerate(res["ids"]):
                out[cid] = {name: col[k] for name, col in res["features"].items()}
        return out

    def shutdown(self) -> None:
        """Kill the shard actors (idempotent)."""
        for a in self._actors.values():
            ray.kill(a, no_restart=True)
        self._actors.clear()
        self._assign.clear()
        self._ckpt = None

    def __enter__(self) -> ShardedPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

