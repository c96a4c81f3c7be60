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

from _al_common import REPO, add_output_arguments, al_config, al_parser, parse, run_compare, save_result, start_run
from _provenance import provenance


def _base_config(args: argparse.Namespace) -> dict:
    return al_config("hippocampus-al", args, features={"mc_samples": args.mc_samples, "reduction": "foreground"})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = al_parser(__doc__.split("\n")[0], "random,fg_random,least_confidence,bald,kcenter,typiclust", rounds=2)
    ap.add_argument("--mc-samples", type=int, default=4)
    add_output_arguments(ap, out=REPO / "runs" / "bench_al", quick=None)
    return parse(ap, argv, "bench_al")


def main() -> None:
    args = parse_args()
    load_before = start_run()
    _, strategies, res, wall = run_compare(args, _base_config(args), "al_hippocampus")
    from raylearn.curves import reach_fraction
    from raylearn.ledger import Ledger

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
    path = save_result(result, "al_hippocampus", args, png=args.out / "compare" / "compare.png")
    print(f"wrote {path} and al_hippocampus.png in {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
