"""Training benchmark: Ray Train overhead vs a plain torch loop, and MONAI quality on hippocampus, in one run.

(1) Overhead. The same model (``ModelConfig()`` defaults), data (labelled pool cases), patches, steps
    and per-epoch validation, run (a) as a plain single-process torch loop and (b) through
    :func:`raylearn.train.fit_round` (``TorchTrainer``, 1 worker, checkpoint + report every epoch), both
    with 1 torch thread. Steady-state throughput = optimiser steps per second between the start of the
    first and the start of the last epoch (so it includes each epoch's validation, checkpoint and
    report, but not the one-time start-up). The plain loop runs before and after the Ray run and its
    mean is used, which cancels drift in the load of this shared machine. The fixed start-up cost
    (Ray Train controller, worker group, process group, data read in the worker, final result and
    best-checkpoint copy) is reported separately: round wall time minus the epochs' time.
(2) Quality. Hippocampus ingested with ``n_test=40`` (seed 0); 40 pool cases (seeded choice) trained
    with 2 DDP workers; mean Dice per foreground class on the 40 test cases; CPU minutes = CPU time of the
    driver plus the training workers' processes (``time.process_time`` reported by each worker).

Usage::

    .venv/bin/python benchmarks/train.py                    # both parts
    .venv/bin/python benchmarks/train.py --skip-quality     # overhead only
    .venv/bin/python benchmarks/train.py --epochs 30 --iterations 40
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "msd_hippocampus"

from raylearn.metrics import dice  # noqa: E402
from raylearn.models import training as T  # noqa: E402
from raylearn.models.config import ModelConfig, TrainConfig  # noqa: E402
from raylearn.models.unet import MonaiSegmenter  # noqa: E402
from raylearn.train import fit_round  # noqa: E402


def plain_loop(store, ids, model_cfg: ModelConfig, cfg: TrainConfig) -> dict:
    """The same work as a fit_round worker, in this process, without Ray (checkpoint saved every epoch too)."""
    t0 = time.perf_counter()
    torch.set_num_threads(cfg.torch_threads or 1)
    train_ids, val_ids, _ = T.split_validation(ids, cfg)
    cases = [{"image": store.get(i).image, "label": store.get(i).label} for i in train_ids]
    val = [{"image": store.get(i).image, "label": store.get(i).label} for i in val_ids]
    seg = MonaiSegmenter(model_cfg, store.num_channels, store.num_classes, seed=cfg.seed, device="cpu")
    opt = T.make_optimizer(seg.network.parameters(), cfg)
    sched = T.make_scheduler(opt, cfg, cfg.epochs * cfg.iterations_per_epoch)
    loss_fn = T.make_loss(store.num_classes)
    starts = []
    with tempfile.TemporaryDirectory() as tmp:
        for epoch in range(cfg.epochs):
            starts.append(time.perf_counter())
            torch.manual_seed(epoch)
            loader = T.make_train_loader(cases, model_cfg, cfg, seed=epoch)
            T.train_epoch(seg.network, loader, opt, sched, loss_fn, torch.device("cpu"))
            T.validate(seg.network, val, seg.inferer(), store.num_classes, torch.device("cpu"))
            seg.save(Path(tmp) / "model.pt")
            torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, Path(tmp) / "state.pt")
    end = time.perf_counter()
    steady = (cfg.epochs - 1) * cfg.iterations_per_epoch / (starts[-1] - starts[0])
    return {"steps_per_s": steady, "wall_s": end - t0, "startup_s": starts[0] - t0}


def overhead(store, ids, epochs: int, iterations: int, storage: Path) -> dict:
    model_cfg = ModelConfig()
    cfg = TrainConfig(epochs=epochs, iterations_per_epoch=iterations, batch_size=2, torch_threads=1,
                      val_fraction=0.2, storage_path=str(storage), max_failures=0)
    plain_a = plain_loop(store, ids, model_cfg, cfg)
    res = fit_round(store, ids, None, model_cfg, cfg, name="overhead")
    starts = [h["epoch_start"] for h in res.history]
    ray_steps_s = (epochs - 1) * iterations / (starts[-1] - starts[0])
    epoch_time = (starts[-1] - starts[0]) / (epochs - 1)
    plain_b = plain_loop(store, ids, model_cfg, cfg)
    plain_steps_s = (plain_a["steps_per_s"] + plain_b["steps_per_s"]) / 2
    return {
        "model": "MONAI UNet channels (16,32,64,128), strides (2,2,2), 2 res units, patch 32x48x32, batch 2",
        "epochs": epochs,
        "iterations_per_epoch": iterations,
        "torch_threads": 1,
        "plain_steps_per_s": [round(plain_a["steps_per_s"], 3), round(plain_b["steps_per_s"], 3)],
        "ray_train_steps_per_s": round(ray_steps_s, 3),
        "throughput_ratio_plain_over_ray": round(plain_steps_s / ray_steps_s, 3),
        "ray_round_wall_s": round(res.wall_s, 1),
        "ray_fixed_startup_s": round(res.wall_s - epochs * epoch_time, 1),
        "plain_startup_s": round((plain_a["startup_s"] + plain_b["startup_s"]) / 2, 2),
        "plain_wall_s": [round(plain_a["wall_s"], 1), round(plain_b["wall_s"], 1)],
    }


def quality(store, n_train: int, epochs: int, iterations: int, workers: int, storage: Path, seed: int) -> dict:
    pool = store.case_ids("pool")
    rng = np.random.default_rng(seed)
    ids = sorted(rng.choice(pool, size=min(n_train, len(pool)), replace=False).tolist())
    cfg = TrainConfig(epochs=epochs, iterations_per_epoch=iterations, batch_size=2, num_workers=workers,
                      torch_threads=1, val_fraction=0.1, val_every=5, storage_path=str(storage), seed=seed)
    model_cfg = ModelConfig()
    cpu0 = time.process_time()
    res = fit_round(store, ids, None, model_cfg, cfg, name="quality")
    worker_cpu = res.history[-1]["cpu_s"] * workers  # rank 0's CPU time; ranks do the same work
    seg = MonaiSegmenter.load(res.checkpoint_path, device="cpu")
    test_ids = store.case_ids("test")
    per_class = {c: [] for c in range(1, store.num_classes)}
    t0 = time.perf_counter()
    for cid in test_ids:
        case = store.get(cid)
        pred = seg.predict_label(case.image)
        for c in per_class:
            per_class[c].append(dice(pred == c, case.label == c))
    eval_s = time.perf_counter() - t0
    driver_cpu = time.process_time() - cpu0
    means = {store.labels[c]: round(float(np.mean(v)), 4) for c, v in per_class.items()}
    return {
        "n_labelled_cases": len(ids),
        "n_train_cases": len(res.train_ids),
        "n_val_cases": len(res.val_ids),
        "n_test_cases": len(test_ids),
        "epochs": epochs,
        "iterations_per_epoch": iterations,
        "num_workers": workers,
        "dice_per_class": means,
        "mean_dice": round(float(np.mean(list(means.values()))), 4),
        "best_val_dice": round(res.best_val_dice, 4),
        "best_epoch": res.best_epoch,
        "train_wall_min": round(res.wall_s / 60, 2),
        "cpu_min": round((worker_cpu + driver_cpu) / 60, 2),
        "test_inference_s": round(eval_s, 1),
        "curve": [(h["epoch"], round(h["loss"], 4), round(h["val_dice"], 4)) for h in res.history if h["validated"]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--overhead-epochs", type=int, default=4)
    ap.add_argument("--overhead-iterations", type=int, default=25)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("ray", "ray.train", "ray.data"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import ray

    from raylearn.data.store import PoolStore, ingest

    work = args.work or Path(tempfile.mkdtemp(prefix="raylearn_train_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    report = ingest(args.dataset, work / "store", n_test=40, seed=0, progress=False)
    store = PoolStore.open(work / "store")
    print(f"store: {report.n_pool} pool + {report.n_test} test cases, classes {store.labels}")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=1024**3, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}})
    results: dict = {}
    if not args.skip_overhead:
        ids = store.case_ids("pool")[:10]
        results["overhead"] = overhead(store, ids, args.overhead_epochs, args.overhead_iterations, work / "runs")
        print(json.dumps(results["overhead"], indent=1))
    if not args.skip_quality:
        results["quality"] = quality(store, 40, args.epochs, args.iterations, args.workers, work / "runs", seed=0)
        print(json.dumps({k: v for k, v in results["quality"].items() if k != "curve"}, indent=1))
    ray.shutdown()
    results.update(
        command="python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
        date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        machine={"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                 "torch": torch.__version__, "ray": ray.__version__},
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
