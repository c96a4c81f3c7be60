"""The feature-extractor stage on the sharded pool: CSAL-3D's pretext model trained with Ray Train, SUGFW's SAM
(random weights, small image size), both extracted by real shard actors and cached in the store."""

from __future__ import annotations

import numpy as np
import pytest

from raylearn.experiment import PoolConfig
from raylearn.extract import FeatureCache, extractor_records, split_features
from raylearn.models.extractors import parse_params
from tests.conftest import SAM_SMALL

CSAL = {"patch": 16, "channels": (4, 8, 8), "steps": 2, "batch_size": 1, "embed_dim": 8}
NAMES = ["csal3d_embedding", "csal3d_uncertainty", "sugfw_embedding", "sugfw_uncertainty"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from raylearn.data.phantom import make_phantom_dataset
    from raylearn.data.store import PoolStore, ingest

    root = tmp_path_factory.mktemp("extract")
    raw = make_phantom_dataset(root / "raw", n_cases=6, shape=(20, 20, 20), seed=0)
    ingest(raw, root / "store", n_test=2, seed=0, progress=False)
    return PoolStore.open(root / "store")


class _NoPool:
    def extract(self, *args, **kwargs):
        raise AssertionError("the cache should have answered")


def test_split_and_settings_errors():
    assert split_features(["entropy", "csal3d_embedding", "embedding"]) == (["embedding", "entropy"],
                                                                           ["csal3d_embedding"])
    with pytest.raises(ValueError, match=r"extractor\.patch"):
        parse_params("csal3d", {"patch": 20})
    with pytest.raises(ValueError, match=r"extractor\.pach"):
        parse_params("csal3d", {"pach": 16})
    with pytest.raises(ValueError, match="unknown extractor"):
        parse_params("nope", {})


def test_extractor_stage_on_the_pool_and_cache(ray_session, store, tmp_path):
    from raylearn.pool import ShardedPool

    ids = sorted(store.case_ids("pool"))
    settings = {"csal3d": CSAL, "sugfw": SAM_SMALL}
    pool = ShardedPool(store, n_shards=2, config=PoolConfig(num_cpus=0.5, torch_threads=1, progress=False))
    try:
        first = extractor_records(pool, store, NAMES, settings, ids[:2], str(tmp_path / "train"))
        recs = extractor_records(pool, store, NAMES, settings, ids, str(tmp_path / "train"))  # the rest
    finally:
        pool.shutdown()
    assert sorted(recs) == ids and all(set(r) == set(NAMES) for r in recs.values())
    assert recs[ids[0]]["csal3d_embedding"].shape == (8,)
    assert recs[ids[0]]["sugfw_embedding"].shape == (256,)
    u = np.array([float(recs[c]["csal3d_uncertainty"]) for c in ids])
    assert np.all(u > 0) and len(np.unique(u)) > 1
    for cid in ids[:2]:  # filled in two calls = filled at once (per-case seeds); equal to the first answer
        np.testing.assert_array_equal(first[cid]["csal3d_embedding"], recs[cid]["csal3d_embedding"])

    cache = FeatureCache(store.path, "csal3d", parse_params("csal3d", CSAL))
    assert (cache.dir / "pretext.pt").is_file() and (cache.dir / "features.npz").is_file()
    again = extractor_records(_NoPool(), store, ["csal3d_uncertainty"], {"csal3d": CSAL}, ids, "unused")
    assert [float(again[c]["csal3d_uncertainty"]) for c in ids] == u.tolist()
    # other settings, another cache entry (keyed by the settings hash)
    other = FeatureCache(store.path, "csal3d", parse_params("csal3d", {**CSAL, "steps": 3}))
    assert other.dir != cache.dir and not (other.dir / "features.npz").exists()
