"""What a run writes besides its ledger: ``rounds.csv``, ``learning_curve.png``, ``summary.json``, the round line."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from raylearn.curves import alc, plot_learning_curve

__all__ = ["round_line", "summary", "write_outputs", "write_summary"]

TIMINGS = ("train_s", "score_s", "select_s", "eval_s")


def write_outputs(out: Path, rounds: list[dict], class_names: dict[int, str], reference: float | None,
                  title: str) -> None:
    """``rounds.csv`` (one row per round: labelled count and share, every metric, timings, selected ids) and
    ``learning_curve.png`` (with the full-pool reference line when known)."""
    if not rounds:
        return
    metric_keys = sorted({k for r in rounds for k in r["metrics"]})
    with open(out / "rounds.csv.tmp", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["round", "n_labeled", "fraction_labelled", *metric_keys, *TIMINGS, "selected"])
        for r in rounds:
            t = r["timings"]
            w.writerow([r["round"], r["n_labeled"], f"{r['fraction_labelled']:.4f}",
                        *[r["metrics"].get(k, "") for k in metric_keys],
                        *[f"{t.get(k, 0.0):.2f}" for k in TIMINGS], " ".join(r["selected"])])
    os.replace(out / "rounds.csv.tmp", out / "rounds.csv")
    plot_learning_curve(rounds, out / "learning_curve.png", class_names=class_names, reference=reference,
                        title=title)


def _metric(m: dict, *names: str) -> float:
    for n in names:
        if n in m:
            return m[n]
    return float("nan")


def round_line(r: dict) -> str:
    """One progress line per round: labelled count and share, Dice, P2P's symmetric difference, timings."""
    m, t = r["metrics"], r["timings"]
    return (f"round {r['round']:>2} | labelled {r['n_labeled']:>4} ({100 * r['fraction_labelled']:5.1f}%) | "
            f"Dice {_metric(m, 'dice_mean'):.3f} | NSD (P2P) {_metric(m, 'symdiff_pct_mean', 'nsd_mean'):6.2f}% | "
            f"train {t['train_s']:6.1f}s score {t['score_s']:5.1f}s select {t['select_s']:4.2f}s "
            f"eval {t['eval_s']:5.1f}s")


def summary(name: str, strategy: str, seed: int, rounds: list[dict], reference: float | None, chash: str) -> dict:
    """The run's summary: final metrics, the curve, ALC, the full-pool Dice, total timings, selections."""
    fr = [r["fraction_labelled"] for r in rounds]
    dice = [r["metrics"].get("dice_mean", float("nan")) for r in rounds]
    return {
        "name": name, "strategy": strategy, "seed": seed, "config_hash": chash,
        "rounds": len(rounds), "n_labeled": rounds[-1]["n_labeled"] if rounds else 0,
        "final_metrics": rounds[-1]["metrics"] if rounds else {},
        "curve": [{"fraction_labelled": f, "n_labeled": r["n_labeled"], "dice_mean": d}
                  for f, d, r in zip(fr, dice, rounds, strict=True)],
        "alc": alc(fr, dice) if rounds else None,
        "full_data_dice": reference,
        "timings_total_s": {k: float(sum(r["timings"].get(k, 0.0) for r in rounds)) for k in TIMINGS},
        "selected": [r["selected"] for r in rounds],
    }


def write_summary(out: Path, data: dict) -> None:
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, out / "summary.json")
