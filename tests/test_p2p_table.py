"""``raylearn preannotate``'s table: means per method, markdown/CSV/PNG/JSON outputs, clear errors."""

import json

import pytest

from raylearn.config import ConfigError
from raylearn.p2p_table import run_table, summarise, write_table


def _rows():
    rows = []
    for cid, base in (("a", 20.0), ("b", 40.0)):
        rows.append({"case_id": cid, "method": "segmenter", "reference": "-", "clicks": 0, "nsd_1": base,
                     "dice_1": 0.8, "nsd_overall": base})
        for n in (1, 5):
            rows.append({"case_id": cid, "method": "sam_med3d", "reference": "gt", "clicks": n,
                         "nsd_1": base - n, "dice_1": 0.9, "nsd_overall": base - n})
    return rows


def test_summarise_means_per_method_and_clicks():
    s = summarise(_rows())
    assert [(r["method"], r["clicks"], r["n_cases"]) for r in s] == [("segmenter", 0, 2), ("sam_med3d", 1, 2),
                                                                    ("sam_med3d", 5, 2)]
    assert s[0]["nsd_overall"] == 30.0 and s[2]["nsd_1"] == 25.0 and s[1]["dice_1"] == pytest.approx(0.9)


def test_write_table_outputs(tmp_path):
    info = {"run": "runs/x", "round": 3, "n_cases": 2, "classes": {1: "Anterior"}, "clicks": [1, 5],
            "references": ["gt"], "sam_med3d": {"preset": "small", "checkpoint": None}}
    paths = write_table(tmp_path / "out", _rows(), info)
    md = paths["md"].read_text()
    assert "| NSD Anterior (%) | NSD Average (%) | Dice Anterior |" in md
    assert "| SAM-Med3D <- gt, 5 click(s) | 2 | 25.0 | 25.0 | 0.900 |" in md
    assert paths["png"].stat().st_size > 1000 and paths["cases"].read_text().count("\n") == 7
    assert json.loads(paths["json"].read_text())["summary"][0]["method"] == "segmenter"


def test_run_table_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an experiment YAML nor a run folder"):
        run_table(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no ledger.jsonl"):
        run_table(tmp_path)
    with pytest.raises(ConfigError, match="--reference"):
        run_table(tmp_path, references=["expert"])
    with pytest.raises(ConfigError, match="--clicks"):
        run_table(tmp_path, clicks=[0])


def test_cli_reports_one_error_line(tmp_path, capsys):
    from raylearn.cli import main

    assert main(["preannotate", str(tmp_path), "--clicks", "1,x"]) == 2
    assert "raylearn preannotate: error: --clicks: expected comma-separated integers" in capsys.readouterr().err
    assert main(["preannotate", str(tmp_path)]) == 2
    assert "no ledger.jsonl" in capsys.readouterr().err
