"""STAR against random slices and evenly spaced slices on MSD Task04 hippocampus (issue 18), slice units on CPU.

Every strategy starts from the same evenly spaced slices (``cold_start: even_slices``: every ``--spacing``-th slice
along ``--axis`` of every pool case, the paper's initial labels; ``--cold 0`` = the whole grid) and then queries
``--batch`` slices per round for ``--rounds`` rounds:

* ``star``: the slice of each group least cosine-similar to its labelled neighbours, and each round the
  ``--n-pseudo`` lowest-entropy pseudo-labelled slices from the spatial cross-attention network join the
  segmenter's training (labels + pseudo-labels, masked loss);
* ``random``: uniformly random unlabelled slices (labels only);
* ``even_slices``: the centres of the largest unlabelled gaps (labels only; the paper's "evenly spaced").

The segmenter is the learning-engine recipe of the other AL benchmarks (``benchmarks/_al_common.py``: MONAI UNet
16-32-64-128 on whole 40 x 56 x 40 volumes, 40 test cases, batch 4, Adam 2e-3), trained on the annotated (and
pseudo-labelled) voxels only. Reports the papers-style table over ``--seeds`` seeds: mean ± sd Dice at each % of the
pool's slices, ALC, S% / S95% (least % of slices whose mean Dice reaches the fully supervised Dice, i.e. the full
pool trained once, / 95 % of it). Paper figures for reference (other data): BraTS S% 19.4 %, Spleen 18.2 %.

STAR's network is the CPU adaptation (``backbone: small``, ``--star-width``); on CPU it trains ``--star-steps``
steps per stage and round, so its learning rates default to 10x the authors' code (1e-4 / 5e-5 there, for up to
100 epochs each).

Usage (run it alone on the machine; the lead schedules the full run)::

    python benchmarks/star.py [--strategies star,random,even_slices] [--seeds 3] [--cold 0] [--rounds 5]
        [--batch 160] [--first-steps 300] [--steps 200] [--star-steps 300] [--n-pseudo 100] [--out runs/bench_star]
    python benchmarks/star.py --quick     # phantom smoke run (2 seeds); result under --out, not in results/
    python benchmarks/star.py --smoke --seeds 1 --rounds 1 --first-steps 5 --steps 3 --star-steps 3 --batch 40
        # real data, tiny settings: proves the pipeline; result under --out as star_smoke.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _al_common import add_output_arguments, al_config, al_parser, parse, save_result, start_run, strategy_list
from _provenance import provenance

NAME = "star"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = al_parser(__doc__.split("\n")[0], "star,random,even_slices", rounds=5)
    ap.set_defaults(cold=0, batch=160)
    ap.add_argument("--axis", type=int, default=0, help="slice axis of the stored [D, H, W] grid (0: axial)")
    ap.add_argument("--spacing", type=int, default=10, help="j: initial labels every j-th slice, groups of j + 1")
    ap.add_argument("--n-pseudo", type=int, default=100, help="pseudo-labelled slices kept per round (the code: 100)")
    ap.add_argument("--drop-blank-pseudo", action="store_true",
                    help="star: rank only pseudo-labels with a foreground voxel (the code's delete_black_patch)")
    ap.add_argument("--star-steps", type=int, default=300, help="STAR's optimiser steps per stage and round")
    ap.add_argument("--star-width", type=int, default=16, help="STAR's small backbone width (D = 8 * width)")
    ap.add_argument("--star-lr1", type=float, default=1e-3)
    ap.add_argument("--star-lr2", type=float, default=5e-4)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny settings on the real data: the result goes under --out, not into benchmarks/results")
    add_output_arguments(ap)
    smoke = "--smoke" in (sys.argv[1:] if argv is None else argv)
    args = parse(ap, argv, "bench_star_smoke" if smoke else "bench_star")
    if args.quick:
        args.seeds = min(args.seeds, 2)
    return args


def grid_size(store_dir: Path, axis: int, spacing: int) -> tuple[int, int]:
    """(grid slices, all slices) of the pool in the store: ``sum ceil(n_c / j)`` and ``sum n_c`` along ``axis``."""
    import pandas as pd

    man = pd.read_parquet(store_dir / "manifest.parquet")
    sizes = [int(s[axis]) for s in man.loc[man["split"] == "pool", "shape"]]
    return sum(-(-n // spacing) for n in sizes), sum(sizes)


def ingest(cfg: dict, source: str) -> Path:
    """Build the pool store of ``cfg`` (as the first run would; a no-op when it exists) and return its folder."""
    from raylearn.config import parse_config
    from raylearn.experiment import ExperimentConfig
    from raylearn.runtime import ensure_store

    base = parse_config(cfg, ExperimentConfig, source=source)
    ensure_store(base, progress=False)
    return Path(base.data.store)


def star_params(args: argparse.Namespace) -> dict:
    steps = 2 if args.quick else args.star_steps
    return {"spacing": args.spacing, "n_pseudo": args.n_pseudo, "drop_blank_pseudo": args.drop_blank_pseudo,
            "width": 4 if args.quick else args.star_width,
            "stage1_steps": steps, "stage2_steps": steps, "lr1": args.star_lr1, "lr2": args.star_lr2,
            "torch_threads": 1}  # beside the training worker and the shards on 2 cores (see Star's torch_threads)


def _base_config(args: argparse.Namespace) -> dict:
    """The compared experiment, with the cold start's size ``--cold`` (``0``: set to the whole grid by :func:`main`
    once the store exists; 1 here so that the config validates)."""
    unit = {"kind": "slice", "axis": args.axis}
    cfg = al_config("hippocampus-star", args, cold_strategy="even_slices", unit=unit)
    cfg["cold_start"].update(params={"spacing": args.spacing}, size=max(args.cold, 1))
    if args.quick:
        cfg["schedule"] = {"rounds": 2, "batch_size": 4}
    return cfg


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_before = start_run()
    cfg = _base_config(args)
    store = ingest(cfg, "star benchmark")
    n_grid, n_slices = grid_size(store, args.axis, args.spacing)
    cold = args.cold or n_grid
    cfg["cold_start"]["size"] = cold
    params = {"star": star_params(args), "even_slices": {"spacing": args.spacing}}
    from raylearn.compare import compare
    from raylearn.config import parse_config
    from raylearn.experiment import ExperimentConfig

    strategies = strategy_list(args)
    base = parse_config(cfg, ExperimentConfig, source="star benchmark")
    t0 = time.time()
    res = compare(base, strategies, list(range(args.seeds)), args.out / "compare", strategy_params=params)
    wall = time.time() - t0
    result = {
        **provenance(load_before),
        "setup": {"quick": args.quick, "smoke": args.smoke, "strategies": strategies, "seeds": args.seeds,
                  "axis": args.axis, "spacing": args.spacing, "pool_slices": n_slices, "grid_slices": n_grid,
                  "cold_start_slices": cold, "rounds": base.schedule.rounds, "batch_slices": base.schedule.batch_size,
                  "first_round_steps": base.train.first_round_steps, "steps_per_round": base.train.steps,
                  "star": params["star"]},
        "full_pool_dice": res["reference_dice"],
        "table_markdown": res["table"],
        "rows": res["rows"],
        "baseline": res.get("baseline"),
        "paired": res.get("paired"),
        "wall_s": round(wall, 1),
    }
    print(res["table"])
    print(f"fully supervised (full pool) Dice {res['reference_dice']}")
    print(f"pool: {n_slices} slices along axis {args.axis}; cold start {cold} evenly spaced slices "
          f"({100 * cold / n_slices:.1f} %)")
    if args.smoke:  # tiny settings prove the pipeline only: never into benchmarks/results
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"{NAME}_smoke.json"
        path.write_text(json.dumps(result, indent=2, default=float))
    else:
        path = save_result(result, NAME, args, args.out / "compare" / "compare.png")
    print(f"wrote {path} in {wall / 60:.1f} min")
    print(json.dumps(result["setup"]))


if __name__ == "__main__":
    main()
