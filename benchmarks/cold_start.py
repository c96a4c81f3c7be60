"""Cold-start selection on MSD Task04 hippocampus (issue 16): URDS (CSAL-3D), GSCU (SUGFW), TypiClust on the same
features, and random, choosing the first 5 and 10 cases to label; Dice after training on the chosen set.

Fixed 40-case test split (ingest seed 0); the other 161 cases are the unlabelled pool. The label-free features are
extracted once on the sharded pool and cached in the store (``<store>/extractors/``): CSAL-3D's pretext model
(light 3D encoder, trained with Ray Train on the pool) and, with ``--sam-checkpoint``, SUGFW's SAM ViT-B features
(without a checkpoint GSCU and TypiClust-on-SAM are left out and the JSON says so: nothing is downloaded). For each
seed and size every strategy selects (k-means / kernel k-means seeded by the seed; random by the seed), then the
loop trains round 0 on exactly that set with the learning-engine recipe of ``benchmarks/al_hippocampus.py`` (MONAI
UNet 16-32-64-128, whole volumes, batch 4, Adam 2e-3, ``--first-steps`` steps) and evaluates on the test split.
Identical (set, seed) pairs train once. Reports mean ± sd Dice per strategy and size, and a seed-paired comparison
against random (difference mean ± sd, wins, two-sided paired t-test p). The papers' figures for reference: CSAL-3D
Heart 4 labels 91.62 vs random 90.82; SUGFW Promise12 5 % 65.02 vs random 54.24.

Usage (run it alone on the machine; the lead schedules the full run)::

    python benchmarks/cold_start.py [--sizes 5,10] [--seeds 5] [--strategies urds,gscu,typiclust,random]
        [--sam-checkpoint PATH] [--pretext-steps 300] [--first-steps 300] [--out runs/bench_coldstart]
    python benchmarks/cold_start.py --quick   # phantom smoke run (random SAM weights, tiny models); no results file
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _al_common import add_output_arguments, al_parser, parse, recipe_config, save_result, start_run, strategy_list
from _provenance import provenance


def _base_config(args: argparse.Namespace) -> dict:
    """Round 0 only: the loop trains on the set a strategy chose (handed over as the cold-start selection)."""
    return recipe_config("coldstart", args, schedule={"rounds": 0, "batch_size": 1},
                         cold_start={"strategy": "random", "size": 1},
                         train={"first_round_steps": args.first_steps, "steps": 1})


def _extractor_settings(args: argparse.Namespace) -> dict:
    if args.quick:
        return {"csal3d": {"patch": 16, "channels": [4, 8, 8], "steps": args.pretext_steps, "batch_size": 1},
                "sugfw": {"random_weights": True, "img_size": 64, "encoder_depth": 1, "points_per_side": 4,
                          "max_slices": 2, "n_aug": 3}}
    out = {"csal3d": {"steps": args.pretext_steps, "batch_size": 2, "patch": 32}}
    if args.sam_checkpoint:
        out["sugfw"] = {"checkpoint": str(args.sam_checkpoint), "max_slices": args.sam_slices}
    return out


def _select(strategy: str, view, size: int, seed: int, settings: dict):
    from raylearn.runtime import round_seed
    from raylearn.strategies import build_strategy

    rs = round_seed(seed, 0)
    if strategy == "urds":
        s = build_strategy("urds", source="extractor", extractor=settings["csal3d"], random_state=rs)
    elif strategy == "gscu":
        s = build_strategy("gscu", source="extractor", extractor=settings["sugfw"], random_state=rs)
    elif strategy in ("typiclust", "typiclust_sam"):
        emb = "csal3d_embedding" if strategy == "typiclust" else "sugfw_embedding"
        s = build_strategy("typiclust", embedding=emb, random_state=rs)
    else:
        s = build_strategy(strategy, random_state=rs)
    return [str(c) for c in s.select(view, size)]


def _train_and_evaluate(base, ids: list[str], seed: int, run_dir: Path) -> float:
    """Round 0 of the loop on exactly ``ids`` (handed over as a recorded cold-start selection); its test Dice."""
    from raylearn.ledger import Ledger
    from raylearn.loop import run_experiment

    sel_dir = run_dir / "selection"
    sel_dir.mkdir(parents=True, exist_ok=True)
    led = Ledger(sel_dir / "ledger.jsonl")
    if led.selection(0) is None:
        led.append("selected", round=0, ids=ids, scores=None, strategy="benchmark")
    cfg = base.model_copy(update={"seed": seed, "output_dir": str(run_dir / "run"),
                                  "cold_start": base.cold_start.model_copy(update={"size": len(ids)})})
    resume = (run_dir / "run" / "ledger.jsonl").is_file()
    res = run_experiment(cfg, resume=resume, cold_start_from=None if resume else sel_dir, progress=False)
    assert sorted(res.rounds[0]["selected"]) == sorted(ids)
    return float(res.rounds[0]["metrics"]["dice_mean"])


def _paired(diffs: list[float]) -> dict:
    import numpy as np
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    p = float(stats.ttest_1samp(d, 0.0).pvalue) if len(d) > 1 and d.std() > 0 else float("nan")
    return {"mean": float(d.mean()), "sd": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
            "wins": int((d > 0).sum()), "n": len(d), "p_paired_t": p}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = al_parser(__doc__.split("\n")[0], "urds,gscu,typiclust,random", seeds=5, loop=False)
    ap.add_argument("--sizes", default="5,10")
    ap.add_argument("--sam-checkpoint", type=Path, default=None, help="local SAM ViT-B checkpoint (GSCU)")
    ap.add_argument("--sam-slices", type=int, default=8, help="slices per volume for SAM")
    ap.add_argument("--pretext-steps", type=int, default=300)
    add_output_arguments(ap, quick="tiny phantom run to check the pipeline")
    args = parse(ap, argv, "bench_coldstart")
    if args.quick:
        args.seeds, args.sizes = min(args.seeds, 2), "2"
        args.pretext_steps, args.first_steps = min(args.pretext_steps, 3), min(args.first_steps, 3)
    return args


def main() -> None:
    args = parse_args()
    load_before = start_run()
    import numpy as np

    from raylearn.config import parse_config
    from raylearn.experiment import ExperimentConfig
    from raylearn.extract import extractor_records
    from raylearn.pool import ShardedPool
    from raylearn.runtime import ensure_ray, ensure_store, storage_uri
    from raylearn.scoring.coldstart import EXTRACTOR_FEATURES
    from raylearn.strategies import PoolView

    t0 = time.time()
    base = parse_config(_base_config(args), ExperimentConfig, source="cold_start benchmark")
    settings = _extractor_settings(args)
    strategies = strategy_list(args)
    left_out = {}
    if "sugfw" not in settings:
        for s in ("gscu", "typiclust_sam"):
            if s in strategies:
                strategies.remove(s)
                left_out[s] = "no --sam-checkpoint given (SAM ViT-B weights are never downloaded)"
    sizes = [int(s) for s in args.sizes.split(",") if s]
    ensure_ray()
    store = ensure_store(base, progress=False)
    pool_ids = sorted(store.case_ids("pool"))
    names = [n for n, (ext, _, _) in EXTRACTOR_FEATURES.items() if ext in settings]
    t1 = time.time()
    pool = ShardedPool(store, config=base.pool)
    try:
        recs = extractor_records(pool, store, names, settings, pool_ids, storage_uri(base))
    finally:
        pool.shutdown()
    extract_s = time.time() - t1
    view = PoolView.from_records(pool_ids, set(), recs, round_index=0)

    dice: dict[tuple[str, int, int], float] = {}
    chosen: dict[str, list[str]] = {}
    trained: dict[tuple[tuple[str, ...], int], float] = {}
    for seed in range(args.seeds):
        for size in sizes:
            for strat in strategies:
                ids = _select(strat, view, size, seed, settings)
                key = (tuple(sorted(ids)), seed)
                if key not in trained:
                    trained[key] = _train_and_evaluate(base, ids, seed, args.out / "runs" / f"{strat}-n{size}-s{seed}")
                dice[(strat, size, seed)] = trained[key]
                chosen[f"{strat}-n{size}-s{seed}"] = ids
                print(f"seed {seed} n={size} {strat}: Dice {trained[key]:.4f}", flush=True)

    rows, paired = [], {}
    lines = ["| strategy | labels | Dice mean ± sd | vs random: diff mean ± sd | wins | paired t p |",
             "|---|---|---|---|---|---|"]
    for size in sizes:
        for strat in strategies:
            vals = [dice[(strat, size, s)] for s in range(args.seeds)]
            row = {"strategy": strat, "labels": size, "dice_mean": float(np.mean(vals)),
                   "dice_sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, "dice": vals}
            rows.append(row)
            cmp = "-"
            if strat != "random" and "random" in strategies:
                pr = _paired([dice[(strat, size, s)] - dice[("random", size, s)] for s in range(args.seeds)])
                paired[f"{strat}-n{size}"] = pr
                cmp = f"{pr['mean']:+.4f} ± {pr['sd']:.4f} | {pr['wins']}/{pr['n']} | {pr['p_paired_t']:.3g}"
            else:
                cmp = "- | - | -"
            lines.append(f"| {strat} | {size} | {row['dice_mean']:.4f} ± {row['dice_sd']:.4f} | {cmp} |")
    table = "\n".join(lines)
    wall = time.time() - t0
    result = {
        **provenance(load_before),
        "setup": {"quick": args.quick, "strategies": strategies, "left_out": left_out, "sizes": sizes,
                  "seeds": args.seeds, "first_round_steps": args.first_steps, "extractors": settings,
                  "pool_cases": len(pool_ids), "trainings": len(trained)},
        "table_markdown": table, "rows": rows, "paired_vs_random": paired, "selections": chosen,
        "extract_s": round(extract_s, 1), "wall_s": round(wall, 1),
    }
    print(table)
    if left_out:
        print("left out:", json.dumps(left_out))
    path = save_result(result, "cold_start", args)
    print(f"wrote {path} in {wall / 60:.1f} min (features {extract_s / 60:.1f} min)")


if __name__ == "__main__":
    main()
