"""Learning curves: area under the curve, S%, tables and PNG plots. Pure (matplotlib Agg, no Ray).

A learning curve is a list of points ``(fraction_labelled in [0, 1], dice)`` or
``(fraction_labelled, dice, fraction_fg_labelled)`` (the labelled share of the pool's foreground voxels). The
normalised area under it (ALC) is the trapezoid area divided by the fraction span, so a flat curve at Dice ``d``
has ALC ``d`` whatever its length.

Foreground efficiency (:func:`foreground_efficiency`) is nnActive's FG-Eff; :func:`paired_comparison` compares a
strategy with a baseline seed by seed (the seeds share their cold start).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "alc",
    "best_random_baseline",
    "foreground_efficiency",
    "format_paired",
    "format_table",
    "paired_comparison",
    "plot_compare",
    "plot_learning_curve",
    "reach_fraction",
    "summarise_runs",
]

logger = logging.getLogger(__name__)

#: the random baselines (the paired comparison is against the best of those present)
RANDOM_BASELINES = ("random", "fg_random", "fg_random33")


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


def cost_label(unit: str | None) -> str:
    """The x axis of a learning curve: ``% of pool labelled`` (volumes), ``% of pool slices labelled`` or ``% of pool
    patches labelled``."""
    if unit in ("slice", "patch"):
        return f"% of pool {unit}{'es' if unit == 'patch' else 's'} labelled"
    return "% of pool labelled"


def plot_learning_curve(rounds: Sequence[Mapping], path: str | Path, class_names: Mapping[int, str] | None = None,
                        reference: float | None = None, title: str = "") -> Path:
    """Dice vs % of pool labelled (of its slices when the rounds carry ``unit: slice``), per class and mean; a dashed
    line at the full-data Dice if known. When every round carries ``fraction_fg_labelled``, a second panel plots
    mean Dice against % of the pool's foreground."""
    plt = _mpl()
    x = [100.0 * r["fraction_labelled"] for r in rounds]
    fg = [r.get("fraction_fg_labelled") for r in rounds]
    has_fg = bool(rounds) and all(v is not None for v in fg)
    if has_fg:
        fig, (ax, ax_fg) = plt.subplots(1, 2, figsize=(10.4, 4.2), dpi=110)
        ax_fg.plot([100.0 * v for v in fg], [r["metrics"].get("dice_mean", np.nan) for r in rounds], marker="o",
                   lw=2.2, color="k", label="Dice mean")
        if reference is not None:
            ax_fg.axhline(reference, ls="--", color="grey", label=f"full pool ({reference:.3f})")
        ax_fg.set_xlabel("% of pool foreground voxels labelled")
        ax_fg.set_ylim(0, 1)
        ax_fg.grid(alpha=0.3)
        ax_fg.legend(fontsize=8, loc="lower right")
        ax_fg.set_title("Cost in foreground")
    else:
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
    ax.set_xlabel(cost_label(rounds[-1].get("unit") if rounds else None))
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


def summarise_runs(curves: Mapping[str, Sequence[Sequence[tuple]]],
                   reference: float | None = None) -> list[dict]:
    """Table rows per strategy: mean ± sd Dice at each labelled %, ALC mean ± sd, S%, S95% and, when the points
    carry it, the mean % of the pool's foreground labelled and nnActive's foreground efficiency.

    Args:
        curves: strategy -> list over seeds of [(fraction, dice) or (fraction, dice, fg_fraction), ...] (same
            fractions across seeds).
        reference: full-data Dice; S% (S95%) is the least labelled % whose mean Dice reaches it (95 % of it).

    Returns:
        One dict per strategy; per-seed values (``dice_per_seed``, ``alc_per_seed``) are kept for
        :func:`paired_comparison`.
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
            "dice_per_seed": d.tolist(),
            "alc_per_seed": [float(a) for a in alcs],
        }
        fgs = [[p[2] if len(p) > 2 else None for p in c[:n]] for c in runs]
        if all(v is not None for c in fgs for v in c):
            row["fg_fractions"] = np.array(fgs, dtype=float).mean(axis=0).tolist()
        if reference is not None:
            s = reach_fraction(fr, d.mean(axis=0), reference)
            row["s_percent"] = None if s is None else 100.0 * s
            s95 = reach_fraction(fr, d.mean(axis=0), 0.95 * reference)
            row["s95_percent"] = None if s95 is None else 100.0 * s95
        rows.append(row)
    if reference is not None:
        eff = foreground_efficiency(curves, reference)
        for row in rows:
            if row["strategy"] in eff:
                row["fg_eff"], row["fg_eff_sd"] = eff[row["strategy"]]
    return rows


def foreground_efficiency(curves: Mapping[str, Sequence[Sequence[tuple]]],
                          reference: float) -> dict[str, tuple[float, float]]:
    """nnActive's foreground efficiency (FG-Eff): how fast Dice approaches the full-data Dice per labelled share of
    the pool's foreground voxels.

    One curve ``y = c - a * exp(-b * (x - x0))`` per setting, with ``x`` the fraction of foreground labelled and
    ``y`` the mean Dice; ``c`` = the full-data Dice, ``x0`` = the least ``x`` of all points of all strategies,
    ``a = c - mean(y at x0)`` (shared), and ``b`` fitted per strategy by least squares over all its points (every
    seed and round): FG-Eff = ``b``, higher is better (MIC-DKFZ/nnActive ``nnactive/analyze/metrics.py`` lines
    44-102, ``DatasetBeta``; ``analyze_results/setup.py`` lines 126 and 349-353 use
    ``percentage_of_voxels_foreground`` as ``x``).

    Args:
        curves: as for :func:`summarise_runs`; points without a foreground fraction are ignored.
        reference: the full-data Dice (``c``).

    Returns:
        strategy -> ``(b, sd of b)``; the sd is ``sqrt`` of the fit's variance (nnActive reports the variance
        ``pcov[0, 0]`` under the name "std"). Strategies with fewer than 2 points are left out; empty when no
        point carries a foreground fraction. A strategy whose points all share one foreground fraction (its queries
        added no foreground, e.g. background-only slices) gets NaN: the curve's rate cannot be fitted from them.
    """
    from scipy.optimize import OptimizeWarning, curve_fit

    pts = {name: np.array([(p[2], p[1]) for c in runs for p in c if len(p) > 2 and p[2] is not None], dtype=float)
           for name, runs in curves.items()}
    pts = {k: v.reshape(-1, 2) for k, v in pts.items()}
    allp = np.concatenate([v for v in pts.values()]) if pts else np.zeros((0, 2))
    allp = allp[np.isfinite(allp).all(axis=1)]
    if len(allp) == 0:
        return {}
    c = float(reference)
    x0 = float(allp[:, 0].min())
    a = c - float(allp[allp[:, 0] == x0, 1].mean())
    out: dict[str, tuple[float, float]] = {}
    for name, v in pts.items():
        v = v[np.isfinite(v).all(axis=1)]
        if len(v) < 2:
            continue
        if np.ptp(v[:, 0]) <= 1e-12:  # every point at one foreground share: the rate b is not identifiable
            logger.warning("foreground efficiency of %s: every point has the same labelled foreground share %.4g; "
                           "FG-Eff is undefined (NaN)", name, v[0, 0])
            out[name] = (float("nan"), float("nan"))
            continue

        def model(x, b):
            return c - a * np.exp(-b * (x - x0))

        try:  # a fit that does not converge must not lose hours of runs: report NaN
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)
                popt, pcov = curve_fit(model, v[:, 0], v[:, 1], p0=[1.0], maxfev=10000)
        except (RuntimeError, ValueError) as err:
            logger.warning("foreground efficiency of %s: the fit failed (%s)", name, err)
            out[name] = (float("nan"), float("nan"))
            continue
        var = float(pcov[0, 0])
        out[name] = (float(popt[0]), float(np.sqrt(var)) if np.isfinite(var) and var >= 0 else float("nan"))
    return out


def best_random_baseline(rows: Sequence[Mapping]) -> str | None:
    """The random baseline (:data:`RANDOM_BASELINES`) with the highest mean ALC among ``rows``, or None."""
    cands = [r for r in rows if r["strategy"] in RANDOM_BASELINES]
    return max(cands, key=lambda r: r["alc_mean"])["strategy"] if cands else None


def paired_comparison(rows: Sequence[Mapping], baseline: str) -> list[dict]:
    """Every other strategy against ``baseline``, seed by seed (seed ``k`` of both shares its cold start).

    Per strategy: the per-seed ALC differences (strategy - baseline), their mean and sd, the number of seeds the
    strategy wins, and a two-sided paired t-test (``scipy.stats.ttest_rel``; p is NaN with fewer than 2 seeds);
    also the mean Dice difference at each labelled %. Seeds are paired by position, so both need the same seeds.

    Returns:
        One dict per other strategy: ``strategy, baseline, seeds, alc_diff_mean, alc_diff_sd, wins, t, p,
        dice_diff_mean``.
    """
    from scipy import stats

    by = {r["strategy"]: r for r in rows}
    if baseline not in by:
        raise ValueError(f"paired_comparison: baseline {baseline!r} is not among {sorted(by)}")
    base = by[baseline]
    out = []
    for name, r in by.items():
        if name == baseline:
            continue
        n = min(len(r["alc_per_seed"]), len(base["alc_per_seed"]))
        diff = np.asarray(r["alc_per_seed"][:n]) - np.asarray(base["alc_per_seed"][:n])
        m = min(len(r["dice_mean"]), len(base["dice_mean"]))
        dd = np.asarray(r["dice_per_seed"])[:n, :m] - np.asarray(base["dice_per_seed"])[:n, :m]
        if n >= 2 and np.ptp(diff) > 0:
            t, p = stats.ttest_rel(r["alc_per_seed"][:n], base["alc_per_seed"][:n])
            t, p = float(t), float(p)
        else:
            t = p = float("nan")
        out.append({
            "strategy": name, "baseline": baseline, "seeds": int(n),
            "alc_diff_mean": float(diff.mean()) if n else float("nan"),
            "alc_diff_sd": float(diff.std(ddof=1)) if n > 1 else 0.0,
            "wins": int((diff > 0).sum()), "t": t, "p": p,
            "dice_diff_mean": dd.mean(axis=0).tolist() if n else [],
        })
    return out


def format_paired(comparisons: Sequence[Mapping], fractions: Sequence[float]) -> str:
    """A plain-text table of :func:`paired_comparison`: ALC difference mean ± sd, wins, p, and the mean Dice
    difference at each labelled %."""
    if not comparisons:
        return "(no paired comparison)"
    head = ["strategy - baseline", "ΔALC", "wins", "p (paired t)"] + [f"Δ@{100 * f:.1f}%" for f in fractions]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for c in comparisons:
        p = c["p"]
        cells = [f"{c['strategy']} - {c['baseline']}", f"{c['alc_diff_mean']:+.4f}±{c['alc_diff_sd']:.4f}",
                 f"{c['wins']}/{c['seeds']}", "-" if p != p else f"{p:.3f}"]
        cells += [f"{v:+.3f}" for v in c["dice_diff_mean"]]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def plot_compare(rows: Sequence[Mapping], path: str | Path, reference: float | None = None, title: str = "",
                 unit: str | None = None) -> Path:
    """One line per strategy (mean Dice, shaded ± sd) against % labelled (of the pool's slices with
    ``unit="slice"``); when every row has ``fg_fractions``, a second panel against % of the pool's foreground
    labelled (the cost in foreground)."""
    plt = _mpl()
    has_fg = bool(rows) and all("fg_fractions" in r for r in rows)
    if has_fg:
        fig, (ax, ax_fg) = plt.subplots(1, 2, figsize=(10.4, 4.2), dpi=110)
    else:
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for row in rows:
        x = 100.0 * np.asarray(row["fractions"])
        m = np.asarray(row["dice_mean"])
        s = np.asarray(row["dice_sd"])
        (line,) = ax.plot(x, m, marker="o", label=f"{row['strategy']} (ALC {row['alc_mean']:.3f})")
        ax.fill_between(x, m - s, m + s, color=line.get_color(), alpha=0.15)
        if has_fg:
            eff = row.get("fg_eff")
            label = row["strategy"] + ("" if eff is None else f" (FG-Eff {eff:.2f})")
            ax_fg.plot(100.0 * np.asarray(row["fg_fractions"]), m, marker="o", color=line.get_color(), label=label)
    axes = [ax, ax_fg] if has_fg else [ax]
    for a in axes:
        if reference is not None:
            a.axhline(reference, ls="--", color="grey", label=f"full pool ({reference:.3f})")
        a.set_ylabel("mean Dice (test split)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8, loc="lower right")
    ax.set_xlabel(cost_label(unit))
    ax.set_title(title or "Strategies compared")
    if has_fg:
        ax_fg.set_xlabel("% of pool foreground voxels labelled")
        ax_fg.set_title("Cost in foreground")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _opt(v, fmt: str) -> str:
    return "-" if v is None or v != v else format(v, fmt)


def format_table(rows: Sequence[Mapping], unit: str | None = None) -> str:
    """A plain-text table like the papers': mean ± sd Dice at each labelled %, ALC, S%, S95% and, when known, the
    % of the pool's foreground labelled at the end and the foreground efficiency (FG-Eff ± sd). With
    ``unit="slice"`` every % (columns, S%, S95%) is of the pool's slices, said in a first line."""
    if not rows:
        return "(no runs)"
    if unit in ("slice", "patch"):
        what = "patches" if unit == "patch" else "slices"
        return f"Cost: % of the pool's {what} labelled (unit: {unit})\n\n" + format_table(rows)
    fr = rows[0]["fractions"]
    has_fg = any("fg_fractions" in r for r in rows)
    has_eff = any("fg_eff" in r for r in rows)
    head = ["strategy"] + [f"{100 * f:.1f}%" for f in fr] + ["ALC", "S%", "S95%"]
    head += ["FG% (end)"] if has_fg else []
    head += ["FG-Eff"] if has_eff else []
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        cells = [r["strategy"]]
        cells += [f"{m:.3f}±{s:.3f}" for m, s in zip(r["dice_mean"], r["dice_sd"], strict=False)]
        cells += [f"{r['alc_mean']:.3f}±{r['alc_sd']:.3f}"]
        cells += [_opt(r.get("s_percent"), ".1f"), _opt(r.get("s95_percent"), ".1f")]
        if has_fg:
            cells += [_opt(100 * r["fg_fractions"][-1], ".1f") if "fg_fractions" in r else "-"]
        if has_eff:
            cells += [f"{r['fg_eff']:.2f}±{_opt(r.get('fg_eff_sd'), '.2f')}" if "fg_eff" in r else "-"]
        lines.append(" | ".join(cells))
    return "\n".join(lines)
