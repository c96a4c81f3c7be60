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
