"""The sharded pool: real Ray actors over a tiny phantom store, scored with a tiny random MONAI UNet."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from raylearn.config import ConfigError, parse_config
from raylearn.experiment import PoolConfig
from raylearn.pool_support import MAX_ELEMENTS_PER_CASE, PoolError, balance, compact_feature

ALL = [
    "least_confidence", "entropy", "margin", "mc_entropy", "bald", "mc_variance",
    "tta_variance", "embedding", "weighted_embedding", "fg_volume",
]
QUIET = {"progress": False, "prefault": True}


# --------------------------------------------------------------------------- pure helpers (no Ray)
def test_balance_largest_first_into_least_loaded():
    sizes = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    bins = balance(sizes, 3)
    assert sorted(i for b in bins for i in b) == list(range(10))  # every item exactly once
    loads = [sum(sizes[i] for i in b) for b in bins]
    assert max(loads) - min(loads) <= 1  # LPT on this input is (near) perfect: 55 -> 19/18/18
    assert bins == balance(sizes, 3)  # deterministic
    assert balance([5, 5, 5, 5], 2) == [[0, 2], [1, 3]]  # ties go to the lowest bin
    # greedy LPT never exceeds 4/3 of the optimum; here one big item dominates
    big = balance([100, 1, 1, 1, 1], 2)
    assert big == [[0], [1, 2, 3, 4]]


def test_balance_with_starting_loads_and_errors():
    # a survivor already holding 10 units gets the later items only after the empty bin catches up
    assert balance([4, 3, 2], 2, loads=[10, 0]) == [[], [0, 1, 2]]
    assert balance([], 3) == [[], [], []]
    with pytest.raises(ValueError, match="n must be >= 1"):
        balance([1], 0)
    with pytest.raises(ValueError, match="loads has length"):
        balance([1], 2, loads=[0])
    with pytest.raises(ValueError, match="negative"):
        balance([1, -1], 2)


def test_pool_config_validates():
    cfg = parse_config({"n_shards": 2, "num_cpus": 0.5, "max_restarts": 1}, PoolConfig, "exp.yaml")
    assert cfg.n_shards == 2 and cfg.num_gpus is None and cfg.max_task_retries == 3
    with pytest.raises(ConfigError, match="exp.yaml: n_shard: unknown key"):
        parse_config({"n_shard": 2}, PoolConfig, "exp.yaml")
    with pytest.raises(ConfigError, match="num_cpus"):
        parse_config({"num_cpus": -1}, PoolConfig, "exp.yaml")


def test_compact_feature_rejects_voxel_maps():
    assert compact_feature("x", np.float64(1.5), "c").dtype == np.float32
    with pytest.raises(PoolError, match=r"feature 'entropy_map' of case 'c7' has shape \(16, 16, 17\)"):
        compact_feature("entropy_map", np.zeros((16, 16, 17)), "c7")
    assert MAX_ELEMENTS_PER_CASE < 16 * 16 * 17


def test_checkpoint_digest_and_backend_detection(tmp_path):
    import torch

    from raylearn.pool_support import checkpoint_digest, detect_segmenter_cls

    bundle = {"format": "raylearn.nnunet_segmenter/1", "w": torch.arange(6.0)}
    torch.save(bundle, tmp_path / "a.pt")
    torch.save(bundle, tmp_path / "other_name.pt")  # torch names the zip's top folder after the file
    a, b = (tmp_path / "a.pt").read_bytes(), (tmp_path / "other_name.pt").read_bytes()
    assert a != b and checkpoint_digest(a) == checkpoint_digest(b)
    torch.save({**bundle, "w": torch.arange(6.0) + 1}, tmp_path / "c.pt")
    assert checkpoint_digest((tmp_path / "c.pt").read_bytes()) != checkpoint_digest(a)
    assert detect_segmenter_cls(a, "dflt") == "raylearn.models.nnunet_segmenter:NnUNetSegmenter"
    assert detect_segmenter_cls(b"not a zip", "dflt") == "dflt"


# --------------------------------------------------------------------------- fixtures
def _store(root, n_cases, shape, n_test=2, seed=0):
    from raylearn.data.phantom import make_phantom_dataset
    from raylearn.data.store import PoolStore, ingest

    raw = make_phantom_dataset(root / "raw", n_cases=n_cases, shape=shape, seed=seed)
    ingest(raw, root / "store", n_test=n_test, seed=0, progress=False)
    return PoolStore.open(root / "store")


def _checkpoint(store, path):
    from raylearn.models.config import ModelConfig
    from raylearn.models.unet import MonaiSegmenter

    cfg = ModelConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=0, dropout=0.2, patch_size=(24, 24, 24))
    seg = MonaiSegmenter(cfg, in_channels=store.num_channels, num_classes=store.num_classes, seed=0, device="cpu")
    seg.save(path)
    return seg, path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return _store(tmp_path_factory.mktemp("pool"), n_cases=12, shape=(24, 24, 24))


@pytest.fixture(scope="module")
def ckpt(store, tmp_path_factory):
    return _checkpoint(store, tmp_path_factory.mktemp("ckpt") / "model.pt")


@pytest.fixture(scope="module")
def params():
    from raylearn.scoring.features import FeatureParams

    return FeatureParams(mc_samples=2, tta_flips=[(), (3,)])


@pytest.fixture(scope="module")
def pool2(ray_session, store):
    from raylearn.pool import ShardedPool

    pool = ShardedPool(store, n_shards=2, config=PoolConfig(num_cpus=0.5, torch_threads=1, **QUIET))
    yield pool
    pool.shutdown()


# --------------------------------------------------------------------------- scoring
def test_every_feature_family_reaches_driver_compact_and_aligned(pool2, store, ckpt, params):
    from raylearn.scoring.features import compute_features

    seg, path = ckpt
    out = pool2.score(path, ALL, params)
    ids = store.case_ids("pool")
    assert list(out["ids"]) == sorted(ids) and set(out["features"]) == set(ALL)
    n, k = len(ids), store.num_classes
    for name in ALL:
        arr = out["features"][name]
        assert arr.shape[0] == n and np.all(np.isfinite(arr.astype(np.float32))), name
    assert out["features"]["embedding"].dtype == np.float16 and out["features"]["embedding"].shape == (n, 16)
    assert out["features"]["weighted_embedding"].shape == (n, 16)
    assert out["features"]["fg_volume"].shape == (n, k - 1)
    assert out["features"]["entropy"].shape == (n,) and out["features"]["entropy"].dtype == np.float32
    # rows are aligned with ids: the sharded result equals a serial computation case by case
    for row in (0, n // 2, n - 1):
        ref = compute_features(seg, store.get(out["ids"][row]).image, ALL, params)
        for name in ALL:
            np.testing.assert_allclose(out["features"][name][row].astype(np.float32),
                                       ref[name].astype(np.float32), rtol=2e-3, atol=2e-3, err_msg=name)
    # cases differ, so alignment is a real check (not every row the same)
    assert np.unique(out["features"]["entropy"]).size > 1
    stats = pool2.last_stats
    assert stats["n_cases"] == n and sum(s["n"] for s in stats["per_shard"]) == n and stats["redistributions"] == 0


@pytest.mark.parametrize("reduction", ["sum", "topk_mean", "foreground"])
def test_volume_reductions_reach_the_driver(pool2, store, ckpt, params, reduction):
    from raylearn.scoring.features import compute_features

    p = params.model_copy(update={"reduction": reduction, "topk": 0.1})
    names = ["entropy", "margin", "bald"]
    out, mean = pool2.score(ckpt[1], names, p), pool2.score(ckpt[1], names, params)
    assert not np.allclose(out["features"]["entropy"], mean["features"]["entropy"])  # the reduction was applied
    ref = compute_features(ckpt[0], store.get(out["ids"][1]).image, names, p)
    for name in names:
        np.testing.assert_allclose(out["features"][name][1], ref[name], rtol=2e-3, atol=2e-3, err_msg=name)


def test_checkpoint_cached_by_hash_and_instances_accepted(pool2, ckpt, params):
    seg, path = ckpt
    names = ["entropy", "fg_volume"]
    first = pool2.score(path, names, params)
    again = pool2.score(seg, names, params)  # the same weights given as an instance: same hash, no reload
    assert all(s["load_s"] == 0.0 for s in pool2.last_stats["per_shard"])
    for name in names:
        np.testing.assert_array_equal(first["features"][name], again["features"][name])
    hashes = {s["segmenter_hash"] for s in pool2.shards_state()}
    assert len(hashes) == 1 and None not in hashes


def test_shards_hold_balanced_disjoint_cases(pool2, store):
    states = pool2.shards_state()
    assert len(states) == 2 and all(s["alive"] and s["in_sync"] for s in states)
    held = [c for s in states for c in s["ids"]]
    assert sorted(held) == sorted(store.case_ids("pool")) and len(held) == len(set(held))
    assert abs(states[0]["n_cases"] - states[1]["n_cases"]) <= 1  # equal-size phantoms: balanced counts
    for s in states:
        assert s["bytes_resident"] == sum(store.get(c).image.nbytes for c in s["ids"]) and s["rss_bytes"] > 0
    assert len({s["pid"] for s in states}) == 2


def test_reset_rebalances_the_live_shards_onto_other_cases(pool2, store, ckpt, params):
    """``reset``: the same actors (same pids) hold another run's cases, balanced and in sync, and score them."""
    ids = sorted(store.case_ids("pool"))
    pids = sorted(s["pid"] for s in pool2.shards_state())
    try:
        pool2.mark_labeled(ids[:3])
        pool2.reset(ids[4:])
        states = pool2.shards_state()
        assert sorted(s["pid"] for s in states) == pids and all(s["in_sync"] for s in states)
        assert sorted(c for s in states for c in s["ids"]) == ids[4:] == pool2.unlabeled_ids()
        assert list(pool2.score(ckpt[1], ["entropy"], params)["ids"]) == ids[4:]
        with pytest.raises(PoolError, match="never in the pool"):
            pool2.mark_labeled([ids[0]])  # no longer part of this pool
        with pytest.raises(PoolError, match=r"not in the store .*'nope'"):
            pool2.reset(["nope"])
        with pytest.raises(PoolError, match="1 case\\(s\\) for 2 shards"):
            pool2.reset(ids[:1])
    finally:
        pool2.reset()  # the module's other tests expect the whole pool
    assert pool2.unlabeled_ids() == ids and all(s["in_sync"] for s in pool2.shards_state())


def test_pool_cache_reuses_matching_shards_only(ray_session, store):
    """compare's PoolCache: the same settings get the live shards back; other settings, a case hook or a failed run
    start (or leave) fresh ones."""
    import ray

    from raylearn.pool_cache import PoolCache

    ids = sorted(store.case_ids("pool"))
    cfg = PoolConfig(num_cpus=0.5, torch_threads=1, **QUIET)
    cache = PoolCache()
    try:
        a = cache.get(store, n_shards=1, resources_per_shard={"num_cpus": 0.5}, config=cfg, case_ids=ids[:5])
        pid = a.shards_state()[0]["pid"]
        cache.release()
        b = cache.get(store, n_shards=1, resources_per_shard={"num_cpus": 0.5}, config=cfg, case_ids=ids[2:])
        assert b is a and b.shards_state()[0]["pid"] == pid and b.unlabeled_ids() == ids[2:]
        assert (cache.started, cache.reused) == (1, 1)
        actor = next(iter(a._actors.values()))
        c = cache.get(store, n_shards=1, resources_per_shard={"num_cpus": 0.5},
                      config=cfg.model_copy(update={"torch_threads": 2}), case_ids=ids)
        assert c is not a and cache.started == 2 and a.n_shards == 0  # the old shards were shut down
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.ping.remote())
        cache.release(failed=True)  # a failed run's pool is not handed on
        assert c.n_shards == 0
        with pytest.raises(PoolError, match="no live shards"):
            c.reset(ids)
    finally:
        cache.close()


def test_bad_inputs_raise_clear_errors(pool2, store, params, tmp_path):
    from raylearn.pool import ShardedPool

    with pytest.raises(PoolError, match="checkpoint not found"):
        pool2.score(tmp_path / "nope.pt", ["entropy"], params)
    with pytest.raises(ValueError, match="unknown feature"):
        pool2.score(tmp_path / "nope.pt", ["entropie"], params)
    with pytest.raises(PoolError, match="not in the store"):
        ShardedPool(store, n_shards=1, case_ids=["no_such_case"], config=PoolConfig(**QUIET))
    with pytest.raises(PoolError, match="never in the pool"):
        pool2.mark_labeled(["no_such_case"])


# --------------------------------------------------------------------------- fault injection (case hooks)
# Hooks are built by factories so that they are closures: cloudpickle ships them to the shard by value (a
# module-level function of this test module would be pickled by name, and workers cannot import tests/).
def _crash_once(marker_dir):
    """Hook: a shard whose marker ``<marker_dir>/shard<index>`` exists removes it and exits after its first case."""

    def hook(shard: int, position: int, case_id: str) -> None:
        if position != 0:
            return
        try:
            (Path(marker_dir) / f"shard{shard}").unlink()
        except FileNotFoundError:
            return
        os._exit(1)

    return hook


def _stall_when_armed(shard_index, gate):
    """Hook: once ``gate`` is armed, the first case shard ``shard_index`` scores is reported to the gate and the
    shard blocks there until the gate opens (or the shard is killed); every other call passes straight through."""

    def hook(shard: int, position: int, case_id: str) -> None:
        import ray

        if shard == shard_index and ray.get(gate.arrive.remote()):
            ray.get(gate.opened.remote())

    return hook


def _gate(ray):
    """A small signal actor the test controls: ``arm``, then wait on ``arrived``, ``open`` to let the shard go."""
    import asyncio

    @ray.remote(num_cpus=0)
    class Gate:
        def __init__(self) -> None:
            self.armed = False
            self.arrivals = 0
            self._arrived, self._opened = asyncio.Event(), asyncio.Event()

        async def arm(self) -> None:
            self.armed = True

        async def arrive(self) -> bool:
            """True (stop here) for the first arrival after ``arm``."""
            self.arrivals += 1
            stop, self.armed = self.armed, False
            if stop:
                self._arrived.set()
            return stop

        async def arrived(self) -> int:
            await self._arrived.wait()
            return self.arrivals

        async def opened(self) -> None:
            await self._opened.wait()

        async def open(self) -> None:
            self._opened.set()

    return Gate.options(scheduling_strategy="DEFAULT").remote()


def _exactly_once(out, expected):
    ids = list(out["ids"])
    assert len(ids) == len(set(ids)) and ids == sorted(expected)
    assert all(len(v) == len(ids) for v in out["features"].values())


def test_removal_crash_restart_and_redistribution(ray_session, store, ckpt, params, tmp_path):
    """One pool's life: labelled cases leave; a shard crashes mid-scoring and is restarted (Ray retries the
    call); it crashes again with its restarts spent and its cases move to the survivor. Every round covers
    each unlabeled case exactly once, with the same scores as an undisturbed round."""
    from raylearn.pool import ShardedPool

    names = ["entropy", "embedding"]
    cfg = PoolConfig(num_cpus=0.5, max_restarts=1, max_task_retries=1, **QUIET)
    with ShardedPool(store, n_shards=2, config=cfg, case_hook=_crash_once(str(tmp_path))) as pool:
        # -- removal of labelled cases
        before = sum(s["bytes_resident"] for s in pool.shards_state())
        gone = store.case_ids("pool")[:3]
        pool.mark_labeled(gone)
        pool.mark_labeled(gone[:1])  # idempotent
        left = sorted(set(store.case_ids("pool")) - set(gone))
        assert pool.unlabeled_ids() == left
        states = pool.shards_state()
        assert all(s["in_sync"] for s in states) and not set(gone) & {c for s in states for c in s["ids"]}
        freed = sum(store.get(c).image.nbytes for c in gone)
        assert sum(s["bytes_resident"] for s in states) == before - freed
        reference = pool.score(ckpt[1], names, params)
        _exactly_once(reference, left)

        # -- crash mid-scoring: Ray restarts the actor (with its INITIAL cases) and retries the call
        (tmp_path / "shard0").touch()  # shard 0 exits after its first case of the next round
        out = pool.score(ckpt[1], names, params)
        assert not (tmp_path / "shard0").exists(), "crash hook did not fire"
        assert pool.last_stats["restarted_shards"] == [0] and pool.last_stats["redistributions"] == 0
        _exactly_once(out, left)
        for name in names:
            np.testing.assert_array_equal(out["features"][name], reference["features"][name])
        assert all(s["in_sync"] for s in pool.shards_state())  # the labelled cases were dropped again

        # -- crash again, restarts spent: the dead shard's cases are redistributed to the survivor
        (tmp_path / "shard0").touch()
        out = pool.score(ckpt[1], names, params)
        assert pool.last_stats["redistributions"] == 1 and pool.n_shards == 1
        assert pool.assignment() == {1: left}
        _exactly_once(out, left)
        for name in names:
            np.testing.assert_array_equal(out["features"][name], reference["features"][name])
        _exactly_once(pool.score(ckpt[1], ["margin"], params), left)  # and the next round too


@pytest.mark.slow
def test_ray_kill_during_scoring(ray_session, store, ckpt, params):
    """``ray.kill(actor, no_restart=False)`` while a round is in flight: the round still covers every case once.

    The kill lands at a known point whatever the machine's speed: shard 1 stalls in its case hook after its
    first case until the test has killed it; Ray restarts it and retries the call, which then runs through."""
    import threading

    from raylearn.pool import ShardedPool

    names = ["bald", "tta_variance"]
    gate = _gate(ray_session)
    try:
        with ShardedPool(store, n_shards=2, config=PoolConfig(num_cpus=0.5, **QUIET),
                         case_hook=_stall_when_armed(1, gate)) as pool:
            reference = pool.score(ckpt[1], names, params)  # gate not armed: an undisturbed round
            ray_session.get(gate.arm.remote())
            box = {}

            def run():
                try:
                    box["out"] = pool.score(ckpt[1], names, params)
                except BaseException as err:  # re-raised in the test's thread below
                    box["err"] = err

            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            ray_session.get(gate.arrived.remote(), timeout=300)  # shard 1 has scored a case and waits in the hook
            assert worker.is_alive() and not box
            ray_session.kill(pool._actors[1], no_restart=False)
            worker.join(timeout=300)
            assert not worker.is_alive(), "the round did not finish after the kill"
            if "err" in box:
                raise box["err"]
            _exactly_once(box["out"], store.case_ids("pool"))
            assert pool.last_stats["restarted_shards"] == [1] and pool.last_stats["redistributions"] == 0
            for name in names:
                np.testing.assert_array_equal(box["out"]["features"][name], reference["features"][name])
    finally:
        ray_session.get(gate.open.remote())
        ray_session.kill(gate)


# --------------------------------------------------------------------------- driver memory
def _result_bytes(out) -> int:
    return len(pickle.dumps(out, protocol=5))


def test_driver_result_size_is_per_case_constant(ray_session, pool2, store, ckpt, params, tmp_path):
    """Bytes reaching the driver grow with the number of cases only, not with the volume size."""
    from raylearn.pool import ShardedPool

    names = ["entropy", "bald", "embedding", "fg_volume"]
    big = _store(tmp_path / "big", n_cases=5, shape=(40, 40, 40), n_test=1)
    with ShardedPool(big, n_shards=1, config=PoolConfig(num_cpus=0.5, **QUIET)) as pool:
        out_big = pool.score(_checkpoint(big, tmp_path / "big.pt")[1], names, params)
    out_small = pool2.score(ckpt[1], names, params)
    assert big.get(big.case_ids()[0]).image.size > 4 * store.get(store.case_ids()[0]).image.size
    per_case = {}
    for label, out in (("small", out_small), ("big", out_big)):
        n = len(out["ids"])
        per_case[label] = sum(a.nbytes for a in out["features"].values()) / n
        assert _result_bytes(out) < 200 * n + 2000, label  # a few hundred bytes per case at most
    assert per_case["small"] == per_case["big"] == 4 + 4 + 16 * 2 + 4 * (store.num_classes - 1)
