"""SBC-AL against random and least confidence on MSD Task04 hippocampus (issue 17), MONAI backend on CPU.

Two parts:

1. **AL curves**: ``raylearn compare`` of ``sbc``, ``random`` and ``least_confidence`` over ``--seeds`` seeds, every
   strategy on the same SBC U-Net (``model.arch: sbc_unet``, so the table isolates the query strategy; the cold
   start of a seed is shared). Learning-engine recipe and split of ``benchmarks/clasp_pe.py`` (40 test cases, 161
   pool cases, UNet 16-32-64-128 + SFP/ASR heads, whole volumes, batch 4, Adam 2e-3). Table: mean ± sd Dice at each
   labelled %, ALC, S% / S95%, and a seed-paired comparison against random.
2. **Cost of the extra heads**, outside Ray, same threads, the same pool volumes: median optimiser-step time
   (batch 4 whole volumes) of the SBC U-Net with its joint loss vs the plain UNet with Dice+CE, and per-case
   scoring time of ``sbc_consistency`` (one 3-output forward + distance transforms + Hausdorff) vs
   ``least_confidence`` on the plain UNet; the SBC U-Net both with the heads at full resolution (the default) and
   at the decoder's half resolution (``model.sbc.head_resolution: half``).

Paper figures for reference (2D, other data): ACDC 10 % labels 81.43 vs random 72.70; KiTS19 10 % 86.51 vs 67.30.

Usage (run it alone on the machine; the lead schedules the full run)::

    python benchmarks/sbc_al.py [--strategies sbc,random,least_confidence] [--seeds 3] [--cold 8] [--rounds 3]
        [--batch 4] [--first-steps 300] [--steps 200] [--beta 2.0] [--gamma 0.5] [--head-resolution full|half]
        [--out runs/bench_sbc]
    # the run of benchmarks/results/sbc_al.json (86 min alone): python benchmarks/sbc_al.py --head-resolution half
    python benchmarks/sbc_al.py --quick   # phantom smoke run; writes runs/bench_sbc_quick/sbc_al_quick.json only
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from _al_common import add_output_arguments, al_config, al_parser, parse, run_compare, save_result, start_run
from _provenance import provenance


def _base_config(args: argparse.Namespace) -> dict:
    sbc = {"alpha": 1.0, "beta": args.beta, "gamma": args.gamma, "head_resolution": args.head_resolution}
    if args.quick:
        return al_config("sbc-quick", args, model={"arch": "sbc_unet", "sbc": sbc}, train={"first_round_steps": 4},
                         evaluate={"full_data_reference": False})
    return al_config("hippocampus-sbc", args, model={"arch": "sbc_unet", "sbc": sbc})


def head_cost(store_dir: Path, model_cfg_sbc, n_steps: int, n_cases: int) -> dict:
    """Step and scoring time of the SBC U-Net against the plain UNet of the same config (no Ray, this process)."""
    import numpy as np
    import torch

    from raylearn.data.store import PoolStore
    from raylearn.models import training as T
    from raylearn.models.config import TrainConfig, resolve_model_config
    from raylearn.models.unet import MonaiSegmenter
    from raylearn.scoring.features import compute_features

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    store = PoolStore.open(store_dir)
    ids = store.case_ids("pool")
    shapes = list(store.manifest["shape"])
    cfg = TrainConfig(batch_size=4 if n_steps > 2 else 2)
    cpu = torch.device("cpu")
    out: dict = {"threads": threads, "steps_timed": n_steps, "cases_scored": min(n_cases, len(ids))}
    variants = (("unet", "unet", "least_confidence", "full"), ("sbc_unet", "sbc_unet", "sbc_consistency", "full"),
                ("sbc_unet_half", "sbc_unet", "sbc_consistency", "half"))
    for name, arch, feature, where in variants:
        sbc = model_cfg_sbc.sbc.model_copy(update={"head_resolution": where})
        mcfg = resolve_model_config(model_cfg_sbc.model_copy(update={"arch": arch, "sbc": sbc}), shapes)
        seg = MonaiSegmenter(mcfg, store.num_channels, store.num_classes, seed=0, device=cpu)
        opt = T.make_optimizer(seg.network.parameters(), cfg)
        loss_fn = T.make_loss(mcfg)
        cache = T.CaseCache(mcfg.patch_size, lambda c: (store.get(c).image, store.get(c).label))
        cache.ensure(ids[:16])
        tf = T.train_transforms(mcfg, cfg, crop=not cache.whole_volume())
        times = []
        for s in range(n_steps + 1):  # step 0 warms up, untimed
            x, y = T.sample_batch(cache, ids[:16], tf, cfg.batch_size, s, [0])
            t0 = time.perf_counter()
            T.train_step(seg.network, x, y, opt, None, loss_fn, cpu)
            if s:
                times.append(time.perf_counter() - t0)
        score = []
        for cid in ids[: out["cases_scored"]]:
            img = np.asarray(store.get(cid).image)
            t0 = time.perf_counter()
            compute_features(seg, img, [feature])
            score.append(time.perf_counter() - t0)
        params = sum(p.numel() for p in seg.network.parameters())
        out[name] = {"params": int(params), "step_s_median": statistics.median(times),
                     "score_feature": feature, "score_s_per_case_median": statistics.median(score)}
    for name in ("sbc_unet", "sbc_unet_half"):
        out[name]["step_time_ratio"] = out[name]["step_s_median"] / out["unet"]["step_s_median"]
        out[name]["score_time_ratio"] = out[name]["score_s_per_case_median"] / out["unet"]["score_s_per_case_median"]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = al_parser(__doc__.split("\n")[0], "sbc,random,least_confidence")
    ap.add_argument("--beta", type=float, default=2.0,
                    help="model.sbc.beta (SFP loss weight; 2.0: the choice of deployments/sweep_sbc.yaml)")
    ap.add_argument("--gamma", type=float, default=0.5,
                    help="model.sbc.gamma (ASR loss weight; 0.5: the choice of deployments/sweep_sbc.yaml)")
    ap.add_argument("--head-resolution", choices=("full", "half"), default="full",
                    help="model.sbc.head_resolution of the AL runs")
    ap.add_argument("--cost-steps", type=int, default=20, help="timed optimiser steps per network")
    ap.add_argument("--cost-cases", type=int, default=20, help="pool cases scored per network")
    add_output_arguments(ap)
    args = parse(ap, argv, "bench_sbc")
    if args.quick:
        args.seeds = min(args.seeds, 2)
        args.cost_steps, args.cost_cases = min(args.cost_steps, 2), min(args.cost_cases, 2)
    if args.seeds < 1:
        sys.exit("--seeds must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    load_before = start_run()
    base, strategies, res, al_wall = run_compare(args, _base_config(args), "sbc_al benchmark")
    t1 = time.time()
    cost = head_cost(args.out / "store", base.model, args.cost_steps, args.cost_cases)
    cost_wall = time.time() - t1

    result = {
        **provenance(load_before),
        "setup": {"quick": args.quick, "strategies": strategies, "seeds": args.seeds, "cold_start": args.cold,
                  "rounds": args.rounds, "batch": args.batch, "first_round_steps": args.first_steps,
                  "steps_per_round": args.steps, "model": base.model.model_dump(mode="json")},
        "full_pool_dice": res["reference_dice"],
        "table_markdown": res["table"],
        "rows": res["rows"],
        "baseline": res["baseline"],
        "paired": res["paired"],
        "head_cost": cost,
        "wall_s": {"al": round(al_wall, 1), "head_cost": round(cost_wall, 1)},
    }
    print(res["table"])
    print(f"full-pool Dice {res['reference_dice']}")
    u = cost["unet"]
    for name in ("sbc_unet", "sbc_unet_half"):
        s = cost[name]
        print(f"cost of the SFP/ASR heads, {name} ({cost['threads']} threads): params {u['params']} -> "
              f"{s['params']}; train step {u['step_s_median']:.3f} s -> {s['step_s_median']:.3f} s "
              f"(x{s['step_time_ratio']:.2f}); scoring per case {u['score_feature']} "
              f"{u['score_s_per_case_median']:.3f} s -> {s['score_feature']} {s['score_s_per_case_median']:.3f} s "
              f"(x{s['score_time_ratio']:.2f})")
    path = save_result(result, "sbc_al", args, png=args.out / "compare" / "compare.png")
    print(f"wrote {path} in {(al_wall + cost_wall) / 60:.1f} min")


if __name__ == "__main__":
    main()
