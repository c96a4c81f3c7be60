"""Pool scoring benchmark: sharded (Ray actors) vs serial scoring of the hippocampus pool, in one run.

Measures, on the same cases, model (random MONAI UNet with the default ``ModelConfig``) and features:

- throughput of ``ShardedPool.score`` with 1 shard and with 2 shards, each shard's torch on 1 thread and
  1 logical CPU, and the ratio (goal >= 1.6x on 2 cores);
- overhead of the 1-shard path (checkpoint put + actor call + model load + gather) vs a plain serial loop
  in this process with torch on 1 thread (goal <= 10 %);
- per-shard resident memory (RSS) vs the bytes of the cases it holds, against an empty shard's RSS;
- the time per MC-dropout pass (serial, 1 thread) next to one plain ``predict_proba``.

Usage (the store is ingested into a temporary folder unless ``--store`` names an existing one)::

    .venv/bin/python benchmarks/pool_scoring.py
    .venv/bin/python benchmarks/pool_scoring.py --max-cases 40 --out /tmp/quick.json   # a quick look
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["OMP_NUM_THREADS"] = "1"

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "msd_hippocampus"
FEATURES = ["least_confidence", "entropy", "margin", "embedding", "fg_volume"]


def _mb(n: float) -> float:
    return round(n / 2**20, 1)


def serial_scoring(ckpt: Path, store, ids: list[str], names: list[str], params) -> dict:
    """A plain loop in this process: load the model, compute the features of every case."""
    from raylearn.models.unet import MonaiSegmenter
    from raylearn.scoring.features import compute_features

    t0, c0 = time.perf_counter(), time.process_time()
    seg = MonaiSegmenter.load(ckpt, device="cpu")
    for cid in ids:
        compute_features(seg, store.get(cid).image, names, params)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "cases_per_s": round(len(ids) / wall, 3),
            "cpu_per_case_s": round(cpu / len(ids), 4)}


def sharded_scoring(ckpt: Path, store, ids: list[str], names: list[str], params, n_shards: int, threads: int) -> dict:
    """``ShardedPool.score`` over the same cases: actor start-up reported apart from the scoring round."""
    import ray

    from raylearn.pool import PoolConfig, PoolShard, ShardedPool

    cfg = PoolConfig(num_cpus=1.0, torch_threads=threads, progress=False, prefault=True)
    with ShardedPool(store, n_shards=n_shards, case_ids=ids, config=cfg) as pool:
        before = {s["shard"]: s for s in pool.shards_state()}
        t0 = time.perf_counter()
        pool.score(ckpt, names, params)
        wall = time.perf_counter() - t0
        stats = pool.last_stats
        after = pool.shards_state()
    out = {
        "n_shards": n_shards, "torch_threads": threads, "startup_s": round(pool.startup_s, 2),
        "wall_s": round(wall, 3), "cases_per_s": round(len(ids) / wall, 3), "put_s": round(stats["put_s"], 4),
        "per_shard": [{"shard": s["shard"], "n_cases": s["n"], "load_s": round(s["load_s"], 3),
                       "score_s": round(s["score_s"], 3), "cpu_s": round(s["cpu_s"], 3),
                       "cpu_share": round(s["cpu_s"] / s["score_s"], 3)} for s in stats["per_shard"]],
        "memory": [{"shard": s["shard"], "n_cases": s["n_cases"], "data_mb": _mb(s["bytes_resident"]),
                    "rss_loaded_mb": _mb(before[s["shard"]]["rss_bytes"]), "rss_after_scoring_mb": _mb(s["rss_bytes"])}
                   for s in after],
    }
    if n_shards == 1:  # an empty shard: the same imports, no cases, no model -> the RSS baseline
        empty = PoolShard.options(num_cpus=0).remote(store, [], 99, threads, True, ShardedPool.PRELOAD)
        out["rss_empty_shard_mb"] = _mb(ray.get(empty.state.remote())["rss_bytes"])
        ray.kill(empty)
    return out


def mc_pass_time(ckpt: Path, store, ids: list[str], n_samples: int) -> dict:
    """Seconds per MC-dropout forward pass vs one ``predict_proba``, serial on 1 thread."""
    from raylearn.models.unet import MonaiSegmenter

    seg = MonaiSegmenter.load(ckpt, device="cpu")
    images = [store.get(c).image for c in ids]
    seg.predict_proba(images[0])  # warm-up
    t0 = time.perf_counter()
    for im in images:
        seg.predict_proba(im)
    proba = (time.perf_counter() - t0) / len(images)
    t0 = time.perf_counter()
    for im in images:
        seg.predict_mc(im, n_samples, seed=0)
    mc = (time.perf_counter() - t0) / len(images)
    return {"n_cases": len(ids), "mc_samples": n_samples, "predict_proba_s": round(proba, 4),
            "mc_per_case_s": round(mc, 4), "mc_per_pass_s": round(mc / n_samples, 4),
            "mc_pass_vs_proba": round(mc / n_samples / proba, 3)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default=str(DEFAULT_DATA), help="dataset folder to ingest (MSD layout)")
    ap.add_argument("--store", default=None, help="an existing pool store (skips ingest)")
    ap.add_argument("--n-test", type=int, default=40, help="test cases held out at ingest (default 40)")
    ap.add_argument("--max-cases", type=int, default=None, help="score only the first N pool cases")
    ap.add_argument("--features", default=",".join(FEATURES), help="comma-separated feature names")
    ap.add_argument("--mc-samples", type=int, default=8)
    ap.add_argument("--mc-cases", type=int, default=10, help="cases for the MC-dropout timing")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "pool_scoring.json"))
    args = ap.parse_args(argv)

    import ray
    import torch

    from raylearn.data.store import PoolStore, ingest
    from raylearn.models.config import ModelConfig
    from raylearn.models.unet import MonaiSegmenter
    from raylearn.scoring.features import FeatureParams

    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory(prefix="pool-bench-")
    t0 = time.perf_counter()
    if args.store is None:
        ingest(args.dataset, Path(tmp.name) / "store", n_test=args.n_test, seed=0, progress=False)
        store_path = Path(tmp.name) / "store"
    else:
        store_path = Path(args.store)
    ingest_s = time.perf_counter() - t0
    store = PoolStore.open(store_path)
    ids = store.case_ids("pool")[: args.max_cases]
    names = [n.strip() for n in args.features.split(",") if n.strip()]
    params = FeatureParams()
    model_cfg = ModelConfig()
    ckpt = MonaiSegmenter(model_cfg, store.num_channels, store.num_classes, seed=0, device="cpu").save(
        Path(tmp.name) / "model.pt")
    voxels = [store.get(c).image[0].size for c in ids]
    print(f"pool: {len(ids)} cases, {min(voxels)}-{max(voxels)} voxels, features {names}; ingest {ingest_s:.1f} s")

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=1024**3, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}})
    load_before = os.getloadavg()
    serial = serial_scoring(ckpt, store, ids, names, params)
    print(f"serial loop (1 thread):  {serial['wall_s']:.1f} s  {serial['cases_per_s']:.2f} cases/s")
    one = sharded_scoring(ckpt, store, ids, names, params, n_shards=1, threads=1)
    print(f"1 shard  (1 thread):     {one['wall_s']:.1f} s  {one['cases_per_s']:.2f} cases/s "
          f"(actor start-up {one['startup_s']:.1f} s, not counted)")
    two = sharded_scoring(ckpt, store, ids, names, params, n_shards=2, threads=1)
    print(f"2 shards (1 thread each): {two['wall_s']:.1f} s  {two['cases_per_s']:.2f} cases/s")
    serial2 = serial_scoring(ckpt, store, ids, names, params)  # again, to see drift from other load
    mc = mc_pass_time(ckpt, store, ids[: args.mc_cases], args.mc_samples)
    load_after = os.getloadavg()
    ray.shutdown()

    serial_best = min(serial["wall_s"], serial2["wall_s"])
    speedup = one["wall_s"] / two["wall_s"]
    overhead = one["wall_s"] / serial_best - 1
    print(f"speed-up 2 vs 1 shard: {speedup:.2f}x (goal >= 1.6)")
    print(f"overhead 1 shard vs serial loop: {100 * overhead:+.1f} % (goal <= 10 %); serial runs "
          f"{serial['wall_s']:.1f} / {serial2['wall_s']:.1f} s")
    for m in one["memory"] + two["memory"]:
        print(f"shard {m['shard']}: {m['n_cases']} cases, data {m['data_mb']} MB, RSS loaded {m['rss_loaded_mb']} MB, "
              f"after scoring {m['rss_after_scoring_mb']} MB (empty shard {one['rss_empty_shard_mb']} MB)")
    print(f"MC dropout: {mc['mc_per_pass_s']:.3f} s per pass ({mc['mc_pass_vs_proba']:.2f}x a predict_proba "
          f"of {mc['predict_proba_s']:.3f} s), {mc['mc_per_case_s']:.2f} s per case at T={mc['mc_samples']}")

    result = {
        "command": " ".join([sys.executable, *sys.argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "ray": ray.__version__,
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in load_after]},
        "n_cases": len(ids), "voxels_min_max": [min(voxels), max(voxels)], "features": names,
        "feature_params": params.model_dump(mode="json"), "model": model_cfg.model_dump(mode="json"),
        "ingest_s": round(ingest_s, 1),
        "serial": serial, "serial_repeat": serial2, "one_shard": one, "two_shards": two, "mc_dropout": mc,
        "speedup_2_vs_1": round(speedup, 3), "overhead_vs_serial": round(overhead, 4),
        "goals": {"speedup_ge_1.6": speedup >= 1.6, "overhead_le_10pct": overhead <= 0.10},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
