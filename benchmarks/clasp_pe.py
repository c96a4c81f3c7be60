"""ClaSP PE against nnActive's random baselines on MSD Task04 hippocampus (issue 19), MONAI backend on CPU.

Strategies (default): ``clasp_pe`` (class-stratified scheduled power predictive entropy), ``fg_random``
(nnActive's "Random 66% FG" on the store's ground truth), ``random`` and ``entropy`` (plain predictive entropy,
top-k), each over ``--seeds`` seeds; the cold start of a seed is shared by all strategies, the full-pool reference
trains once. Same learning-engine recipe and split as ``benchmarks/al_hippocampus.py`` (40 test cases, 161 pool
cases, MONAI UNet 16-32-64-128, whole volumes, batch 4, Adam 2e-3). Reports and saves:

* the papers-style table: mean ± sd Dice at each labelled %, ALC, S% / S95% (least labelled % whose mean Dice
  reaches the full-pool Dice / 95 % of it), the share of the pool's foreground voxels labelled at the end and
  nnActive's foreground efficiency (FG-Eff, higher = closer to the full-pool Dice per foreground voxel labelled);
* a seed-paired comparison of every strategy against the best random baseline (by ALC): ALC difference mean ± sd,
  wins, two-sided paired t-test p, and the Dice difference at each labelled %;
* whether every pool case contains every class (then foreground-aware random chooses like random at volume level).

Usage (run it alone on the machine; the lead schedules the full run)::

    python benchmarks/clasp_pe.py [--strategies clasp_pe,fg_random,random,entropy] [--seeds 3] [--cold 8]
        [--rounds 3] [--batch 4] [--first-steps 300] [--steps 200] [--out runs/bench_clasp]
    python benchmarks/clasp_pe.py --quick     # phantom smoke run (about 20 min on 2 busy cores); no results file
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from _provenance import provenance

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "msd_hippocampus"


def _base_config(args: argparse.Namespace) -> dict:
    if args.quick:  # phantoms: proves the pipeline, says nothing about the method
        return {
            "name": "clasp-quick", "output_dir": str(args.out / "unused"),
            "data": {"dataset": "phantom", "store": str(args.out / "store"),
                     "phantom": {"n_cases": 14, "shape": [24, 24, 24], "seed": 3}, "n_test": 3},
            "cold_start": {"strategy": args.cold_strategy, "size": 2},
            "schedule": {"rounds": 2, "batch_size": 2},
            "model": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
            "train": {"first_round_steps": 3, "steps": 2, "batch_size": 2},
            "pool": {"n_shards": 1, "num_cpus": 0.5, "progress": False},
            "evaluate": {"hd95": False, "full_data_reference": True},
        }
    return {
        "name": "hippocampus-clasp", "output_dir": str(args.out / "unused"),
        "data": {"dataset": str(args.data), "store": str(args.out / "store"), "n_test": 40, "split_seed": 0},
        "cold_start": {"strategy": args.cold_strategy, "size": args.cold},
        "schedule": {"rounds": args.rounds, "batch_size": args.batch},
        "model": {"channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 2},
        "train": {"first_round_steps": args.first_steps, "steps": args.steps, "batch_size": 4, "lr": 2e-3},
        "pool": {"n_shards": 2, "num_cpus": 0.5, "progress": False},
        "evaluate": {"hd95": False, "full_data_reference": True},
    }


def _class_coverage(store_dir: Path) -> dict:
    import numpy as np
    import pandas as pd

    man = pd.read_parquet(store_dir / "manifest.parquet")
    pool = man[man["split"] == "pool"]
    vox = np.stack([np.asarray(v, dtype=float) for v in pool["class_voxels"]])[:, 1:]
    fg = vox.sum(axis=1)
    return {"pool_cases": len(pool), "every_case_has_every_class": bool((vox > 0).all()),
            "cases_per_class": (vox > 0).sum(axis=0).astype(int).tolist(),
            "fg_voxels_per_case": {"min": float(fg.min()), "mean": float(fg.mean()), "max": float(fg.max())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--strategies", default="clasp_pe,fg_random,random,entropy")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--cold", type=int, default=8)
    ap.add_argument("--cold-strategy", default="random")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--first-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--quick", action="store_true", help="tiny phantom run (2 seeds) to check the pipeline")
    args = ap.parse_args()
    if args.out is None:
        args.out = REPO / "runs" / ("bench_clasp_quick" if args.quick else "bench_clasp")
    if args.quick:
        args.seeds = min(args.seeds, 2)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_worker_niceness", "0")

    import logging

    load_before = os.getloadavg()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from raylearn.compare import compare
    from raylearn.config import parse_config
    from raylearn.experiment import ExperimentConfig

    strategies = [s for s in args.strategies.split(",") if s]
    base = parse_config(_base_config(args), ExperimentConfig, source="clasp_pe benchmark")
    t0 = time.time()
    res = compare(base, strategies, list(range(args.seeds)), args.out / "compare")
    wall = time.time() - t0
    coverage = _class_coverage(args.out / "store")

    result = {
        **provenance(load_before),
        "setup": {"quick": args.quick, "strategies": strategies, "seeds": args.seeds, "cold_start": args.cold,
                  "cold_strategy": args.cold_strategy, "rounds": args.rounds, "batch": args.batch,
                  "first_round_steps": args.first_steps, "steps_per_round": args.steps},
        "full_pool_dice": res["reference_dice"],
        "class_coverage": coverage,
        "table_markdown": res["table"],
        "rows": res["rows"],
        "baseline": res["baseline"],
        "paired": res["paired"],
        "wall_s": round(wall, 1),
    }
    print(res["table"])
    print(f"full-pool Dice {res['reference_dice']}")
    print("class coverage of the pool:", json.dumps(coverage))
    if coverage["every_case_has_every_class"]:
        print("note: every pool case contains every class, so foreground-aware random picks like random here")
    out = args.out if args.quick else REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    name = "clasp_pe_quick" if args.quick else "clasp_pe"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=float))
    png = args.out / "compare" / "compare.png"
    if png.is_file():
        (out / f"{name}.png").write_bytes(png.read_bytes())
    print(f"wrote {out / (name + '.json')} and {name}.png in {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
