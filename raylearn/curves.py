"""Learning curves: area under the curve, S%, tables and PNG plots. Pure (matplotlib Agg, no Ray).

A learning curve is a list of points ``(fraction_labelled in [0, 1], dice)``. The normalised area
under it (ALC) is the trapezoid area divided by the fraction span, so a flat curve at Dice ``d`` has
ALC ``d`` whatever its length.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["alc", "reach_fraction", "plot_learning_curve", "plot_compare", "summarise_runs"]


def alc(fractions: Sequence[float], dice: Sequence[float]) -> float:
    """Normalised area under the learning curve (Dice vs fraction labelled).

    Args:
        fractions: labelled fraction per point, increasing.
        dice: Dice per point.

    Returns:
        Area / (last - first fraction); the single Dice value when there is one point; NaN when empty.
    """
    x = np.asarray(fractions, dtype=float)
    y = np.asarray(dice, dtype=float)
    if x.size == 0:
        return float("nan")
    if x.size == 1 or x[-1] <= x[0]:
        return float(y[-1])
    return float(np.trapezoid(y, x) / (x[-1] - x[0]))


def reach_fraction(fractions: Sequence[float], dice: Sequence[float], target: float) -> float | None:
    """The least labelled fraction at which Dice reaches ``target`` (S% of the papers); None if never."""
    for f, d in zip(fractions, dice, strict=True):
        if d >= target:
            return float(f)
    return None


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curve(rounds: Sequence[Mapping], path: str | Path, class_names: Mapping[int, str] | None = None,
                        reference: float | None = None, title: str = "") -> Path:
    """Dice vs % of pool labelled, per class and mean; a dashed line at the full-data Dice if known."""
    plt = _mpl()
    x = [100.0 * r["fraction_labelled"] for r in rounds]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    keys = sorted({k for r in rounds for k in r.get("metrics", {}) if k.startswith("dice_") and k != "dice_mean"})
    for k in keys:
        cls = k.split("_", 1)[1]
        name = (class_names or {}).get(int(cls), cls) if cls.isdigit() else cls
        ax.plot(x, [r["metrics"].get(k, np.nan) for r in rounds], marker=".", alpha=0.6, label=f"Dice {name}")
    ax.plot(x, [r["metrics"].get("dice_mean", np.nan) for r in rounds], marker="o", lw=2.2, color="k",
            label="Dice mean")
    if reference is not None:
        ax.axhline(reference, ls="--", color="grey", label=f"full pool ({reference:.3f})")
    ax.set_xlabel("% of pool labelled")
    ax.set_ylabel("Dice (test split)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or "Learning curve")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def summarise_runs(curves: Mapping[str, Sequence[Sequence[tuple[float, float]]]],
                   reference: float | None = None) -> list[dict]:
    """Table rows per strategy: mean ± sd Dice at each labelled %, ALC mean ± sd, and S%.

    Args:
        curves: strategy -> list over seeds of [(fraction, dice), ...] (same fractions across seeds).
        reference: full-data Dice; S% is the least labelled % whose mean Dice reaches it.
    """
    rows = []
    for name, runs in curves.items():
        n = min(len(c) for c in runs)
        fr = np.array([[p[0] for p in c[:n]] for c in runs]).mean(axis=0)
        d = np.array([[p[1] for p in c[:n]] for c in runs])
        alcs = [alc([p[0] for p in c[:n]], [p[1] for p in c[:n]]) for c in runs]
        row = {
            "strategy": name,
            "seeds": len(runs),
            "fractions": fr.tolist(),
            "dice_mean": d.mean(axis=0).tolist(),
            "dice_sd": d.std(axis=0, ddof=1).tolist() if len(runs) > 1 else [0.0] * n,
            "alc_mean": float(np.mean(alcs)),
            "alc_sd": float(np.std(alcs, ddof=1)) if len(runs) > 1 else 0.0,
        }
        if reference is not None:
            s = reach_fraction(fr, d.mean(axis=0), reference)
            row["s_percent"] = None if s is None else 100.0 * s
            s95 = reach_fraction(fr, d.mean(axis=0), 0.95 * reference)
            row["s95_percent"] = None if s95 is None else 100.0 * s95
        rows.append(row)
    return rows


def plot_compare(rows: Sequence[Mapping], path: str | Path, reference: float | None = None, title: str = "") -> Path:
    """One line per strategy (mean Dice, shaded ± sd) against % labelled."""
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for row in rows:
        x = 100.0 * np.asarray(row["fractions"])
        m = np.asarray(row["dice_mean"])
        s = np.asarray(row["dice_sd"])
        (line,) = ax.plot(x, m, marker="o", label=f"{row['strategy']} (ALC {row['alc_mean']:.3f})")
        ax.fill_between(x, m - s, m + s, color=line.get_color(), alpha=0.15)
    if reference is not None:
        ax.axhline(reference, ls="--", color="grey", label=f"full pool ({reference:.3f})")
    ax.set_xlabel("% of pool labelled")
    ax.set_ylabel("mean Dice (test split)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or "Strategies compared")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def format_table(rows: Sequence[Mapping]) -> str:
    """A plain-text table like the papers': mean ± sd Dice at each labelled %, ALC and S%."""
    if not rows:
        return "(no runs)"
    fr = rows[0]["fractions"]
    head = ["strategy"] + [f"{100 * f:.1f}%" for f in fr] + ["ALC", "S%"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        cells = [r["strategy"]]
        cells += [f"{m:.3f}±{s:.3f}" for m, s in zip(r["dice_mean"], r["dice_sd"], strict=False)]
        cells += [f"{r['alc_mean']:.3f}±{r['alc_sd']:.3f}"]
        s = r.get("s_percent")
        cells += ["-" if s is None else f"{s:.1f}"]
        lines.append(" | ".join(cells))
    return "\n".join(lines)
