"""AL strategies on real MRI: MSD Task04 hippocampus, MONAI backend on CPU.

Fixed 40-case test split (ingest seed 0), the other 161 cases are the pool. Cold start of COLD random
cases (round 0 shared across strategies of a seed), then ROUNDS rounds of BATCH cases per strategy, on the
persistent training service with the default recipe (MONAI UNet 16-32-64-128, whole volumes, batch 4,
Adam 2e-3, left-right flips). The full-pool reference trains once, for the run's whole step budget.
Prints and saves:

* the quality gate against ``../shared/reference`` (plain script): random at 16 labelled cases >= 0.80
  mean Dice, full-pool reference >= 0.84,
* the papers-style table (mean ± sd Dice at each labelled %, ALC, S% = least labelled % reaching the
  full-pool Dice, and the labelled % reaching 95 % of it),
* the time share of scoring vs training per round, per strategy, and the wall time per run.

Run it alone on the machine. Usage::

    python benchmarks/al_hippocampus.py [--strategies random,fg_random,least_confidence,bald,kcenter,typiclust]
        [--seeds 3] [--cold 8] [--rounds 2] [--batch 4] [--first-steps 300] [--steps 200] [--out runs/bench_al]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--strategies", default="random,fg_random,least_confidence,bald,kcenter,typiclust")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--cold", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--first-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--mc-samples", type=int, default=4)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_al")
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_worker_niceness", "0")

    import logging

    load_before = os.getloadavg()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from raylearn.compare import compare
    from raylearn.config import parse_config
    from raylearn.curves import reach_fraction
    from raylearn.experiment import ExperimentConfig
    from raylearn.ledger import Ledger

    strategies = [s for s in args.strategies.split(",") if s]
    base = parse_config({
        "name": "hippocampus-al", "output_dir": str(args.out / "unused"),
        "data": {"dataset": str(args.data), "store": str(args.out / "store"), "n_test": 40, "split_seed": 0},
        "cold_start": {"strategy": "random", "size": args.cold},
        "schedule": {"rounds": args.rounds, "batch_size": args.batch},
        "features": {"mc_samples": args.mc_samples, "reduction": "foreground"},
        "model": {"channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 2},
        "train": {"first_round_steps": args.first_steps, "steps": args.steps, "batch_size": 4, "lr": 2e-3},
        "pool": {"n_shards": 2, "num_cpus": 0.5, "progress": False},
        "evaluate": {"hd95": False, "full_data_reference": True},
    }, ExperimentConfig, source="al_hippocampus")
    t0 = time.time()
    res = compare(base, strategies, list(range(args.seeds)), args.out / "compare")
    wall = time.time() - t0

    ref = res["reference_dice"]
    reach95, shares = {}, {}
    for row in res["rows"]:
        s95 = reach_fraction(row["fractions"], row["dice_mean"], 0.95 * ref) if ref else None
        reach95[row["strategy"]] = None if s95 is None else round(100 * s95, 1)
    for name in strategies:
        score = train = 0.0
        n = 0
        walls = []
        for seed in range(args.seeds):
            recs = Ledger(args.out / "compare" / name / f"seed_{seed}" / "ledger.jsonl", readonly=True).rounds()
            walls.append(sum(sum(v for k, v in r["timings"].items() if k != "train_step_s") for r in recs))
            for r in recs:
                if r["round"] == 0:
                    continue
                score += r["timings"]["score_s"] + r["timings"]["select_s"]
                train += r["timings"]["train_s"]
                n += 1
        shares[name] = {"score_s_per_round": round(score / max(n, 1), 1),
                        "train_s_per_round": round(train / max(n, 1), 1),
                        "score_over_train": round(score / train, 3) if train else None,
                        "run_wall_s_mean": round(sum(walls) / len(walls), 1)}
    rand_row = next((r for r in res["rows"] if r["strategy"] == "random"), None)
    at16 = None
    if rand_row is not None:
        idx = [k for k, f in enumerate(rand_row["fractions"]) if abs(f * 161 - 16) < 0.5]
        if idx:
            at16 = {"mean": rand_row["dice_mean"][idx[0]], "sd": rand_row["dice_sd"][idx[0]]}
    gate = {"random_at_16_labelled": at16, "random_at_16_goal": 0.80, "full_pool_reference": ref,
            "full_pool_goal": 0.84,
            "plain_script_reference": {"16 labelled, 1200 steps": 0.812, "161 labelled, 1200 steps": 0.847},
            "passed": bool(at16 and at16["mean"] >= 0.80 and ref is not None and ref >= 0.84)}
    rand = shares.get("random", {}).get("score_s_per_round")
    result = {
        **provenance(load_before),
        "setup": {"pool": 161, "test": 40, "cold_start": args.cold, "batch": args.batch, "rounds": args.rounds,
                  "seeds": args.seeds, "first_round_steps": args.first_steps, "steps_per_round": args.steps,
                  "run_total_steps": args.first_steps + args.rounds * args.steps, "mc_samples": args.mc_samples},
        "quality_gate": gate,
        "full_pool_dice": ref,
        "table_markdown": res["table"],
        "rows": res["rows"],
        "labelled_pct_to_95pct_of_full": reach95,
        "round_time_share": shares,
        "wall_s": round(wall, 1),
    }
    print(res["table"])
    print(f"full-pool Dice {ref}")
    print("quality gate:", json.dumps(gate))
    print("labelled % reaching 95 % of full-pool Dice:", reach95)
    for name, s in shares.items():
        extra = f" ({s['score_s_per_round'] / rand:.1f}x random's scoring)" if rand else ""
        print(f"{name:>18}: score {s['score_s_per_round']} s/round, train {s['train_s_per_round']} s/round, "
              f"score/train {s['score_over_train']}{extra}, {s['run_wall_s_mean']} s per run")
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "al_hippocampus.json").write_text(json.dumps(result, indent=2, default=float))
    png = args.out / "compare" / "compare.png"
    if png.is_file():
        (out / "al_hippocampus.png").write_bytes(png.read_bytes())
    print(f"wrote {out / 'al_hippocampus.json'} and al_hippocampus.png in {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
