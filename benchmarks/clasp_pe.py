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

With ``--unit patch`` the queries are 3D patches of at most ``--patch-size`` voxels (nnActive's setting: the pool's
cases tiled into near-equal boxes, partial labels, masked training); ``--cold`` and ``--batch`` then count patches
(MSD hippocampus at 16^3: 4880 pool patches, 30.3 per case, so ``--cold 244 --batch 122`` labels the same 5 % +
2.5 % per round as the volume defaults), and the result goes to ``clasp_pe_patch.json``.

Usage (run it alone on the machine; the lead schedules the full run)::

    python benchmarks/clasp_pe.py [--strategies clasp_pe,fg_random,random,entropy] [--seeds 3] [--cold 8]
        [--rounds 3] [--batch 4] [--first-steps 300] [--steps 200] [--out runs/bench_clasp]
    python benchmarks/clasp_pe.py --unit patch --patch-size 16 --cold 244 --batch 122   # -> runs/bench_clasp_patch
    python benchmarks/clasp_pe.py --quick     # phantom smoke run (about 20 min on 2 busy cores); no results file
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _al_common import REPO, add_output_arguments, al_config, al_parser, parse, run_compare, save_result, start_run
from _provenance import provenance


def _base_config(args: argparse.Namespace) -> dict:
    name = "clasp-quick" if args.quick else "hippocampus-clasp"
    if args.unit == "patch":
        size = [8, 8, 8] if args.quick else [args.patch_size] * 3
        return al_config(f"{name}-patch", args, cold_strategy=args.cold_strategy,
                         unit={"kind": "patch", "size": size})
    return al_config(name, args, cold_strategy=args.cold_strategy)


def _class_coverage(store_dir: Path, patch_size: int | None = None) -> dict:
    """Which pool cases (and, with ``patch_size``, which patches) contain each class."""
    import numpy as np
    import pandas as pd

    man = pd.read_parquet(store_dir / "manifest.parquet")
    pool = man[man["split"] == "pool"]
    vox = np.stack([np.asarray(v, dtype=float) for v in pool["class_voxels"]])[:, 1:]
    fg = vox.sum(axis=1)
    out = {"pool_cases": len(pool), "every_case_has_every_class": bool((vox > 0).all()),
           "cases_per_class": (vox > 0).sum(axis=0).astype(int).tolist(),
           "fg_voxels_per_case": {"min": float(fg.min()), "mean": float(fg.mean()), "max": float(fg.max())}}
    if patch_size is not None:  # nnActive's setting: most patches hold no foreground, so FG-aware random differs
        from raylearn.data.store import PoolStore
        from raylearn.scoring.features import label_unit_records
        from raylearn.units import UnitSpace

        store = PoolStore.open(store_dir)
        ids = sorted(store.case_ids("pool"))
        shapes = {c: tuple(int(x) for x in s) for c, s in zip(pool["case_id"], pool["shape"], strict=True)}
        space = UnitSpace(ids, "patch", shapes=shapes, patch_size=(patch_size,) * 3)
        per = np.stack([r["label_class_voxels"] for r in
                        label_unit_records(store, space, ids, ["label_class_voxels"]).values()])
        out["patches"] = {"pool_patches": len(space), "patches_per_class": (per > 0).sum(axis=0).astype(int).tolist(),
                          "patches_with_foreground": int((per.sum(axis=1) > 0).sum())}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = al_parser(__doc__.split("\n")[0], "clasp_pe,fg_random,random,entropy")
    ap.add_argument("--cold-strategy", default="random")
    ap.add_argument("--unit", choices=("volume", "patch"), default="volume",
                    help="query whole volumes or 3D patches (then --cold / --batch count patches)")
    ap.add_argument("--patch-size", type=int, default=16, help="--unit patch: the largest patch edge in voxels")
    add_output_arguments(ap)
    args = parse(ap, argv, "bench_clasp")
    if args.unit == "patch" and args.out == REPO / "runs" / ("bench_clasp_quick" if args.quick else "bench_clasp"):
        args.out = args.out.with_name(args.out.name.replace("bench_clasp", "bench_clasp_patch"))
    if args.quick:
        args.seeds = min(args.seeds, 2)
    return args


def main() -> None:
    args = parse_args()
    load_before = start_run()
    _, strategies, res, wall = run_compare(args, _base_config(args), "clasp_pe benchmark")
    coverage = _class_coverage(args.out / "store", args.patch_size if args.unit == "patch" else None)

    result = {
        **provenance(load_before),
        "setup": {"quick": args.quick, "unit": args.unit,
                  "patch_size": args.patch_size if args.unit == "patch" else None,
                  "strategies": strategies, "seeds": args.seeds, "cold_start": args.cold,
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
    if coverage["every_case_has_every_class"] and args.unit == "volume":
        print("note: every pool case contains every class, so foreground-aware random picks like random here")
    name = "clasp_pe_patch" if args.unit == "patch" else "clasp_pe"
    path = save_result(result, name, args, png=args.out / "compare" / "compare.png")
    print(f"wrote {path} and {path.stem}.png in {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
