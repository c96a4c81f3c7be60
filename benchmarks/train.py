"""Training-engine benchmark: per-round overhead of the persistent service and step throughput vs plain torch.

One experiment's :class:`raylearn.train.TrainingService` (one ``TorchTrainer.fit()``, 1 worker) trains
``--rounds`` consecutive rounds on MSD hippocampus (labelled set growing by 4 cases per round, whole
volumes, batch 4, the default recipe). Per round:

* overhead = round wall time at the driver (submit -> published weights back) minus the worker's pure step
  time (batch sampling + forward/backward/step), i.e. coordination, checkpoint report, weight publication,
  case loading. Goal <= 2 s per round. The first round also pays the service's start-up (reported apart).
* throughput = optimiser steps per second of pure step time, against the same recipe in a plain
  single-process loop (``raylearn.models.training`` without Ray, same threads), run before and after the
  Ray run and averaged (cancels drift in load). Goal >= 0.95. The plain loop also runs once in the driver
  while Ray and the idle service are up, which shows what Ray's own processes take from 2 cores.

Run it alone on the machine. Writes ``benchmarks/results/train.json``::

    .venv/bin/python benchmarks/train.py [--rounds 5] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from _provenance import provenance

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "msd_hippocampus"


def plain_loop(store, ids, model_cfg, cfg, steps: int) -> float:
    """Steps per second of the recipe in this process, no Ray."""
    from raylearn.models import training as T
    from raylearn.models.unet import MonaiSegmenter

    seg = MonaiSegmenter(model_cfg, store.num_channels, store.num_classes, seed=0, device="cpu")
    opt = T.make_optimizer(seg.network.parameters(), cfg)
    sched = T.make_scheduler(opt, cfg, steps)
    cache = T.CaseCache(model_cfg.patch_size, lambda c: (store.get(c).image, store.get(c).label))
    cache.ensure(ids)
    tf = T.train_transforms(model_cfg, cfg, crop=not cache.whole_volume())
    loss_fn = T.make_loss()
    T.train_step(seg.network, *T.sample_batch(cache, ids, tf, cfg.batch_size, 0, [0]), opt, sched, loss_fn,
                 torch.device("cpu"))  # warm-up step, not timed
    t0 = time.perf_counter()
    for s in range(1, steps + 1):
        T.train_step(seg.network, *T.sample_batch(cache, ids, tf, cfg.batch_size, s, [0]), opt, sched, loss_fn,
                     torch.device("cpu"))
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40, help="optimiser steps per round")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    load_before = os.getloadavg()

    import ray

    from raylearn.data.store import PoolStore, ingest
    from raylearn.models.config import ModelConfig, TrainConfig, resolve_model_config
    from raylearn.train import TrainingService

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="raylearn-bench-train-"))
    ingest(args.data, work / "store", n_test=40, seed=0, progress=False)
    store = PoolStore.open(work / "store")
    pool = store.case_ids("pool")
    model_cfg = resolve_model_config(ModelConfig(), list(store.manifest["shape"]))
    cfg = TrainConfig(steps=args.steps, torch_threads=threads, checkpoint_every=10**6)
    n_plain = args.steps * 2
    plain_before = plain_loop(store, pool[:16], model_cfg, cfg, n_plain)

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=1024**3,
             log_to_driver=False)
    rounds = []
    t_start = time.perf_counter()
    svc = TrainingService(store, model_cfg, cfg, total_steps=args.rounds * args.steps,
                          storage_path=work / "runs").start()
    startup_s = svc.startup_s
    for r in range(args.rounds):
        ids = pool[: 8 + 4 * r]
        t0 = time.perf_counter()
        res = svc.fit_round(r, ids)
        wall = time.perf_counter() - t0
        info = res.info
        rounds.append({"round": r, "n_labelled": len(ids), "wall_s": round(wall, 3),
                       "step_s": round(info["train_s"], 3), "overhead_s": round(wall - info["train_s"], 3),
                       "steps_per_s": round(info["trained_steps"] / info["train_s"], 3),
                       "load_s": round(info["load_s"], 3)})
        print(f"round {r}: {len(ids)} labelled, wall {wall:.2f} s, pure steps {info['train_s']:.2f} s, "
              f"overhead {wall - info['train_s']:.2f} s", flush=True)
    status = svc.status()
    # the same plain loop in the driver while Ray (and the idle service) is up: what Ray's own processes take
    plain_beside_ray = plain_loop(store, pool[:16], model_cfg, cfg, n_plain)
    svc.stop()
    total_wall = time.perf_counter() - t_start
    ray.shutdown()
    plain_after = plain_loop(store, pool[:16], model_cfg, cfg, n_plain)

    plain = (plain_before + plain_after) / 2
    later = rounds[1:]
    ray_rate = sum(args.steps for _ in later) / sum(r["step_s"] for r in later)
    result = {
        **provenance(load_before),
        "setup": {"data": "MSD Task04 hippocampus", "model": model_cfg.model_dump(mode="json"),
                  "train": {"batch_size": cfg.batch_size, "steps_per_round": args.steps, "threads": threads},
                  "rounds": args.rounds},
        "service_startup_s": round(startup_s, 2),
        "first_round_wall_s": rounds[0]["wall_s"],
        "rounds": rounds,
        "overhead_per_round_s_mean_after_first": round(sum(r["overhead_s"] for r in later) / len(later), 3),
        "overhead_per_round_s_max_after_first": max(r["overhead_s"] for r in later),
        "worker_processes_started": len(status["workers"]),
        "plain_steps_per_s": {"before": round(plain_before, 3), "after": round(plain_after, 3),
                              "beside_idle_ray": round(plain_beside_ray, 3)},
        "plain_beside_idle_ray_over_plain": round(plain_beside_ray / ((plain_before + plain_after) / 2), 3),
        "ray_steps_per_s": round(ray_rate, 3),
        "throughput_ratio_ray_over_plain": round(ray_rate / plain, 3),
        "total_wall_s": round(total_wall, 1),
        "goals": {"overhead_per_round_s": "<= 2", "throughput_ratio": ">= 0.95"},
    }
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("service_startup_s", "first_round_wall_s",
                                              "overhead_per_round_s_mean_after_first",
                                              "overhead_per_round_s_max_after_first", "worker_processes_started",
                                              "plain_steps_per_s", "plain_beside_idle_ray_over_plain",
                                              "ray_steps_per_s",
                                              "throughput_ratio_ray_over_plain")}, indent=1))
    print(f"wrote {out / 'train.json'}")


if __name__ == "__main__":
    main()
