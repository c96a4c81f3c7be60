"""Run outputs: the foreground cost in rounds.csv, the round line and summary.json."""

from __future__ import annotations

import csv

import pandas as pd
import pytest

from raylearn.outputs import foreground_cost, pool_foreground_voxels, round_line, summary, write_outputs


class Store:
    manifest = pd.DataFrame({"case_id": ["a", "b", "c", "t"],
                             "class_voxels": [[90, 6, 4], [80, 10, 10], [100, 0, 0], None]})


def test_pool_foreground_and_cumulative_cost_by_hand():
    assert pool_foreground_voxels(Store(), ["a", "b", "c"]) == 30  # 6 + 4 + 10 + 10 + 0
    assert pool_foreground_voxels(Store(), ["a", "t"]) is None  # a case without ground truth
    rounds = [{"annotated_fg_voxels": 10}]
    assert foreground_cost(rounds, 20, 30) == {"fg_labelled_voxels": 30, "fraction_fg_labelled": 1.0}
    assert foreground_cost([], 10, 30)["fraction_fg_labelled"] == pytest.approx(1 / 3)
    assert foreground_cost([], 10, None)["fraction_fg_labelled"] is None


def _round(r, n, frac, fg, fgf):
    return {"round": r, "n_labeled": n, "fraction_labelled": frac, "fg_labelled_voxels": fg,
            "fraction_fg_labelled": fgf, "metrics": {"dice_mean": 0.5 + 0.1 * r},
            "timings": {"train_s": 1.0, "score_s": 0.5, "select_s": 0.1, "eval_s": 0.2}, "selected": [f"x{r}"]}


def test_rounds_csv_summary_and_line_carry_the_foreground_cost(tmp_path):
    rounds = [_round(0, 2, 0.1, 10, 1 / 3), _round(1, 4, 0.2, 30, 1.0)]
    write_outputs(tmp_path, rounds, {1: "a", 2: "b"}, 0.8, "t")
    rows = list(csv.DictReader(open(tmp_path / "rounds.csv")))
    assert [r["fg_labelled_voxels"] for r in rows] == ["10", "30"]
    assert [r["fraction_fg_labelled"] for r in rows] == ["0.3333", "1.0000"]
    assert "fg  33.3%" in round_line(rounds[0])
    s = summary("t", "clasp_pe", 0, rounds, 0.8, "h")
    assert [p["fraction_fg_labelled"] for p in s["curve"]] == pytest.approx([1 / 3, 1.0])
    # records of older runs have no foreground cost: blank cells, no crash
    old = [{k: v for k, v in _round(0, 2, 0.1, 0, 0).items() if not k.startswith(("fg_", "fraction_fg"))}]
    write_outputs(tmp_path, old, {}, None, "t")
    assert list(csv.DictReader(open(tmp_path / "rounds.csv")))[0]["fraction_fg_labelled"] == ""
    assert "fg" not in round_line(old[0]).split("|")[1]
