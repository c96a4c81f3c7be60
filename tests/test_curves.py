"""Learning-curve helpers: ALC, S%, table rows and plots."""

from __future__ import annotations

import math

import pytest

from raylearn.curves import alc, format_table, plot_compare, plot_learning_curve, reach_fraction, summarise_runs


def test_alc_flat_curve_is_its_value_and_trapezoid():
    assert alc([0.1, 0.2, 0.5], [0.7, 0.7, 0.7]) == pytest.approx(0.7)
    # trapezoid of (0,0)->(1,1) normalised by span 1 = 0.5
    assert alc([0.0, 1.0], [0.0, 1.0]) == pytest.approx(0.5)
    assert alc([0.3], [0.42]) == pytest.approx(0.42)
    assert math.isnan(alc([], []))


def test_reach_fraction():
    assert reach_fraction([0.1, 0.2, 0.3], [0.5, 0.8, 0.9], 0.8) == pytest.approx(0.2)
    assert reach_fraction([0.1, 0.2], [0.5, 0.6], 0.9) is None


def test_summarise_and_plots(tmp_path):
    curves = {
        "random": [[(0.1, 0.5), (0.2, 0.6)], [(0.1, 0.55), (0.2, 0.65)]],
        "lc": [[(0.1, 0.5), (0.2, 0.8)], [(0.1, 0.55), (0.2, 0.9)]],
    }
    rows = summarise_runs(curves, reference=0.8)
    by = {r["strategy"]: r for r in rows}
    assert by["lc"]["dice_mean"] == pytest.approx([0.525, 0.85])
    assert by["lc"]["s_percent"] == pytest.approx(20.0)
    assert by["random"]["s_percent"] is None
    assert by["lc"]["alc_mean"] > by["random"]["alc_mean"]
    table = format_table(rows)
    assert "lc" in table and "20.0" in table
    png = plot_compare(rows, tmp_path / "c.png", reference=0.8)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rounds = [{"fraction_labelled": 0.1, "metrics": {"dice_1": 0.4, "dice_2": 0.6, "dice_mean": 0.5}},
              {"fraction_labelled": 0.2, "metrics": {"dice_1": 0.7, "dice_2": 0.8, "dice_mean": 0.75}}]
    png = plot_learning_curve(rounds, tmp_path / "lc.png", class_names={1: "a", 2: "b"}, reference=0.8)
    assert png.stat().st_size > 1000


# ------------------------------------------------------------------------- cost in foreground, paired comparison
def _exact_curve(b, xs, a=0.5, c=0.9, x0=0.05):
    return [(x, c - a * math.exp(-b * (x - x0)), x) for x in xs]


def test_foreground_efficiency_recovers_the_rate_of_an_exact_curve():
    """y = c - a exp(-b (x - x0)): with c the full-data Dice, x0 the least foreground share and a = c - y(x0),
    the fit returns b per strategy (nnActive's FG-Eff)."""
    from raylearn.curves import foreground_efficiency

    xs = [0.05, 0.1, 0.2, 0.3]
    curves = {"slow": [_exact_curve(10.0, xs), _exact_curve(10.0, xs)], "fast": [_exact_curve(20.0, xs)]}
    eff = foreground_efficiency(curves, reference=0.9)
    assert eff["slow"][0] == pytest.approx(10.0, rel=1e-4) and eff["fast"][0] == pytest.approx(20.0, rel=1e-4)
    assert eff["slow"][1] == pytest.approx(0.0, abs=1e-3)  # an exact fit has no spread
    # no foreground shares -> nothing to fit
    assert foreground_efficiency({"a": [[(0.1, 0.5), (0.2, 0.6)]]}, 0.9) == {}
    # queries that added no foreground (every point at one share): the rate is undefined, not a fitted artefact
    flat = {"flat": [[(0.1, 0.5, 0.104), (0.2, 0.52, 0.104)]], "ok": [_exact_curve(10.0, xs)]}
    eff = foreground_efficiency(flat, reference=0.9)
    assert all(math.isnan(v) for v in eff["flat"]) and eff["ok"][0] == pytest.approx(10.0, rel=1e-4)


def test_summarise_reports_fg_share_s95_and_fg_eff():
    xs = [0.05, 0.1, 0.2, 0.3]
    # case fractions differ from the foreground shares: cost in cases 10-40 %, in foreground 5-30 %
    slow = [(f, d, x) for f, (_, d, x) in zip([0.1, 0.2, 0.3, 0.4], _exact_curve(10.0, xs), strict=True)]
    fast = [(f, d, x) for f, (_, d, x) in zip([0.1, 0.2, 0.3, 0.4], _exact_curve(20.0, xs), strict=True)]
    rows = summarise_runs({"slow": [slow], "fast": [fast]}, reference=0.9)
    by = {r["strategy"]: r for r in rows}
    assert by["fast"]["fg_fractions"] == pytest.approx(xs)
    assert by["fast"]["fg_eff"] == pytest.approx(20.0, rel=1e-4)
    # 0.95 * 0.9 = 0.855: fast reaches it at x = 0.2 (0.9 - 0.5 e^-3 = 0.875), i.e. 30 % of the cases
    assert by["fast"]["s95_percent"] == pytest.approx(30.0)
    table = format_table(rows)
    assert "S95%" in table and "FG% (end)" in table and "FG-Eff" in table and "20.00" in table


def test_paired_comparison_by_hand():
    """ALC per seed 0.7/0.8/0.75 vs 0.6/0.7/0.7: differences 0.1, 0.1, 0.05, mean 1/12, sd 0.0289,
    t = 5.0 on 2 degrees of freedom, two-sided p = 1 - 5 / sqrt(27) = 0.03775; 3 wins of 3."""
    from raylearn.curves import best_random_baseline, format_paired, paired_comparison

    rows = [
        {"strategy": "random", "alc_mean": 0.667, "alc_per_seed": [0.6, 0.7, 0.7], "dice_mean": [0.5, 0.6],
         "dice_per_seed": [[0.5, 0.6], [0.5, 0.6], [0.5, 0.6]]},
        {"strategy": "fg_random", "alc_mean": 0.6, "alc_per_seed": [0.6, 0.6, 0.6], "dice_mean": [0.5, 0.6],
         "dice_per_seed": [[0.5, 0.6], [0.5, 0.6], [0.5, 0.6]]},
        {"strategy": "clasp_pe", "alc_mean": 0.75, "alc_per_seed": [0.7, 0.8, 0.75], "dice_mean": [0.5, 0.7],
         "dice_per_seed": [[0.5, 0.7], [0.5, 0.7], [0.5, 0.7]]},
    ]
    assert best_random_baseline(rows) == "random"
    cmp = {c["strategy"]: c for c in paired_comparison(rows, "random")}
    c = cmp["clasp_pe"]
    assert c["alc_diff_mean"] == pytest.approx(1 / 12)
    assert c["alc_diff_sd"] == pytest.approx(0.0288675, rel=1e-5)
    assert c["t"] == pytest.approx(5.0) and c["p"] == pytest.approx(1 - 5 / math.sqrt(27), rel=1e-6)
    assert c["wins"] == 3 and c["seeds"] == 3 and c["dice_diff_mean"] == pytest.approx([0.0, 0.1])
    assert "clasp_pe - random" in format_paired(list(cmp.values()), [0.1, 0.2])
    with pytest.raises(ValueError, match="baseline 'nope'"):
        paired_comparison(rows, "nope")
    assert best_random_baseline([{"strategy": "entropy", "alc_mean": 1.0}]) is None


def test_plots_with_a_foreground_panel(tmp_path):
    rows = summarise_runs({"a": [[(0.1, 0.5, 0.05), (0.2, 0.7, 0.2)]]}, reference=0.8)
    assert plot_compare(rows, tmp_path / "c.png", reference=0.8).read_bytes()[:4] == b"\x89PNG"
    rounds = [{"fraction_labelled": 0.1, "fraction_fg_labelled": 0.05, "metrics": {"dice_mean": 0.5}},
              {"fraction_labelled": 0.2, "fraction_fg_labelled": 0.2, "metrics": {"dice_mean": 0.7}}]
    assert plot_learning_curve(rounds, tmp_path / "lc.png", reference=0.8).stat().st_size > 1000
