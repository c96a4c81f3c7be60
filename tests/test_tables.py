"""The shared CSV writer."""

import csv

import pytest

from raylearn.tables import write_csv


def test_write_csv_header_from_first_row_or_columns(tmp_path):
    rows = [{"a": 1, "b": 0.5}, {"a": 2, "b": None}]
    p = write_csv(tmp_path / "t.csv", rows)
    assert p.read_text().splitlines() == ["a,b", "1,0.5", "2,"]
    write_csv(tmp_path / "u.csv", [{"b": 1}, {"a": 2, "c": 3}], columns=["a", "b", "c"])
    assert list(csv.DictReader((tmp_path / "u.csv").open())) == [{"a": "", "b": "1", "c": ""},
                                                                  {"a": "2", "b": "", "c": "3"}]
    with pytest.raises(ValueError):
        write_csv(tmp_path / "v.csv", [{"a": 1}, {"a": 1, "z": 2}])


def test_write_rounds_csvs(tmp_path):
    from raylearn.p2p_rounds import METHODS, check_goals, write_rounds

    summary = [{"round": r, "n_labeled": 2 + r, "method": m, "label": label, "nsd_overall": 30.0 - r - i,
                "nsd_1": 30.0 - r - i, "dice_mean": 0.5} for r in (0, 1, 2) for i, (m, label) in
               enumerate(METHODS.items())]
    rows = [{"round": 0, "method": "a", "case_id": "c0", "nsd_overall": 30.0}]
    paths = write_rounds(tmp_path, rows, summary, check_goals(summary), {1: "fg"}, 5, 1)
    got = list(csv.DictReader(paths["csv"].open()))
    assert [(r["round"], r["method"], r["nsd_overall"]) for r in got] == \
        [(str(s["round"]), s["method"], str(s["nsd_overall"])) for s in summary]
    assert paths["cases"].read_text().splitlines() == ["round,method,case_id,nsd_overall", "0,a,c0,30.0"]
    assert "(b)" in paths["md"].read_text() and paths["png"].stat().st_size > 0
