"""What a run writes besides its ledger: ``rounds.csv``, ``learning_curve.png``, ``summary.json``, the round line.

Cost is counted in cases (``fraction_labelled``) and in foreground (``fraction_fg_labelled``: the labelled share of
the pool's ground-truth foreground voxels, nnActive's ``percentage_of_voxels_foreground``,
MIC-DKFZ/nnActive ``nnactive/analyze/experiment_statistics.py`` lines 64-70 and 312-319), so a strategy that picks
large-foreground cases is not credited for free. With slice or patch units (``unit: slice | patch``) the units are
what is counted: ``n_labeled`` / ``fraction_labelled`` count the pool's slices (patches), rounds.csv adds ``unit``
and ``n_cases_labelled`` columns, the summary says ``"unit": "slice"`` (``"patch"``), and S% (:mod:`raylearn.curves`)
is in % of those units.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from raylearn.curves import alc, plot_learning_curve

__all__ = ["foreground_cost", "pool_foreground_voxels", "round_line", "summary", "write_outputs", "write_summary"]

TIMINGS = ("train_s", "score_s", "select_s", "eval_s")


def pool_foreground_voxels(store, pool_ids: list[str]) -> int | None:
    """Ground-truth foreground voxels (every class but background) of the pool cases, from the store's manifest
    (``class_voxels``, counted at ingest); None when some case has no ground truth (no foreground cost then)."""
    man = getattr(store, "manifest", None)
    if man is None or "class_voxels" not in man.columns:
        return None
    table = man.set_index("case_id")["class_voxels"]
    total = 0
    for cid in pool_ids:
        counts = table.get(cid)
        if counts is None or (isinstance(counts, float) and counts != counts):
            return None
        total += int(sum(int(v) for v in list(counts)[1:]))
    return total


def foreground_cost(rounds: list[dict], round_fg_voxels: int, pool_fg: int | None) -> dict:
    """The foreground cost of a round about to be recorded, after ``rounds`` already recorded.

    Args:
        rounds: the earlier round records (each with ``annotated_fg_voxels``).
        round_fg_voxels: foreground voxels the oracle delivered this round.
        pool_fg: the pool's foreground voxels (:func:`pool_foreground_voxels`), or None.

    Returns:
        ``{"fg_labelled_voxels": cumulative foreground voxels labelled, "fraction_fg_labelled": their share of
        the pool's foreground (None when ``pool_fg`` is unknown or 0)}``.
    """
    cum = int(sum(int(r.get("annotated_fg_voxels") or 0) for r in rounds)) + int(round_fg_voxels)
    return {"fg_labelled_voxels": cum, "fraction_fg_labelled": cum / pool_fg if pool_fg else None}


def _fmt_fraction(v) -> str:
    return "" if v is None else f"{v:.4f}"


def write_outputs(out: Path, rounds: list[dict], class_names: dict[int, str], reference: float | None,
                  title: str) -> None:
    """``rounds.csv`` (one row per round: labelled count and share, labelled foreground voxels and their share of the
    pool's foreground, every metric, timings, selected ids) and ``learning_curve.png`` (with the full-pool
    reference line when known)."""
    if not rounds:
        return
    metric_keys = sorted({k for r in rounds for k in r["metrics"]})
    slices = any(r.get("unit") in ("slice", "patch") for r in rounds)
    with open(out / "rounds.csv.tmp", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["round", "n_labeled", "fraction_labelled", "fg_labelled_voxels", "fraction_fg_labelled",
                    *metric_keys, *TIMINGS, *(("unit", "n_cases_labelled") if slices else ()), "selected"])
        for r in rounds:
            t = r["timings"]
            w.writerow([r["round"], r["n_labeled"], f"{r['fraction_labelled']:.4f}", r.get("fg_labelled_voxels", ""),
                        _fmt_fraction(r.get("fraction_fg_labelled")),
                        *[r["metrics"].get(k, "") for k in metric_keys],
                        *[f"{t.get(k, 0.0):.2f}" for k in TIMINGS],
                        *((r.get("unit", "volume"), r.get("n_cases_labelled", "")) if slices else ()),
                        " ".join(r["selected"])])
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
    fg = r.get("fraction_fg_labelled")
    fg_part = "" if fg is None else f" fg {100 * fg:5.1f}%"
    what = f" {r['unit']}es" if r.get("unit") == "patch" else " slices" if r.get("unit") == "slice" else ""
    return (f"round {r['round']:>2} | labelled {r['n_labeled']:>4}{what} "
            f"({100 * r['fraction_labelled']:5.1f}%{fg_part}) | "
            f"Dice {_metric(m, 'dice_mean'):.3f} | NSD (P2P) {_metric(m, 'symdiff_pct_mean', 'nsd_mean'):6.2f}% | "
            f"train {t['train_s']:6.1f}s score {t['score_s']:5.1f}s select {t['select_s']:4.2f}s "
            f"eval {t['eval_s']:5.1f}s")


def summary(name: str, strategy: str, seed: int, rounds: list[dict], reference: float | None, chash: str) -> dict:
    """The run's summary: final metrics, the curve, ALC, the full-pool Dice, total timings, selections."""
    fr = [r["fraction_labelled"] for r in rounds]
    dice = [r["metrics"].get("dice_mean", float("nan")) for r in rounds]
    unit = rounds[-1].get("unit", "volume") if rounds else "volume"
    return {
        "name": name, "strategy": strategy, "seed": seed, "config_hash": chash,
        **({"unit": unit, "n_cases_labelled": rounds[-1].get("n_cases_labelled")} if unit != "volume" else {}),
        "rounds": len(rounds), "n_labeled": rounds[-1]["n_labeled"] if rounds else 0,
        "final_metrics": rounds[-1]["metrics"] if rounds else {},
        "curve": [{"fraction_labelled": f, "n_labeled": r["n_labeled"], "dice_mean": d,
                   "fraction_fg_labelled": r.get("fraction_fg_labelled")}
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
