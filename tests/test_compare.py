"""`compare`: strategies x seeds with a shared cold start, a papers-style table and one plot."""

from __future__ import annotations

import json

import pytest

from raylearn.config import ConfigError
from raylearn.experiment import ExperimentConfig, parse_config


def _base(tmp_path) -> ExperimentConfig:
    return parse_config({
        "name": "cmp", "output_dir": str(tmp_path / "unused"),
        "data": {"dataset": "phantom", "phantom": {"n_cases": 12, "shape": [24, 24, 24], "seed": 2}, "n_test": 3},
        "cold_start": {"size": 2}, "schedule": {"rounds": 1, "batch_size": 2},
        "model": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
        "train": {"first_round_steps": 3, "steps": 2, "batch_size": 2},
        "pool": {"n_shards": 1, "num_cpus": 0.5, "progress": False},
        "evaluate": {"hd95": False},
    }, ExperimentConfig)


def test_compare_shares_cold_start_and_reference_and_writes_table(ray_session, tmp_path, caplog):
    """Round 0 is shared by the strategies of a seed; the full-pool reference gets the run's whole step budget on
    every pool case and is trained once for all strategies and seeds; the runs share the pool's shards."""
    import logging

    from raylearn.compare import compare
    from raylearn.ledger import Ledger

    base = _base(tmp_path)
    base = base.model_copy(update={"evaluate": base.evaluate.model_copy(update={"full_data_reference": True})})
    out = tmp_path / "cmp"
    caplog.set_level(logging.INFO, logger="raylearn.compare")
    res = compare(base, ["random", "entropy"], [0, 1], out)
    # the first run's shards stop before it trains the reference; the other three runs share one set
    assert "compare: 2 pool start(s), 2 re-use(s)" in caplog.text
    led_r = Ledger(out / "random" / "seed_0" / "ledger.jsonl", readonly=True)
    led_e = Ledger(out / "entropy" / "seed_0" / "ledger.jsonl", readonly=True)
    assert led_r.selection(0)["ids"] == led_e.selection(0)["ids"]
    r0 = led_e.rounds()[0]
    assert r0.get("shared_from"), "round 0 should be re-used, not retrained"
    assert r0["metrics"] == led_r.rounds()[0]["metrics"]
    assert [row["strategy"] for row in res["rows"]] == ["random", "entropy"]
    assert all(len(row["dice_mean"]) == 2 for row in res["rows"])
    assert "random" in (out / "compare.md").read_text()
    assert json.loads((out / "compare.json").read_text())["seeds"] == [0, 1]
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"

    rec = json.loads((out / "reference" / "reference.json").read_text())
    assert rec["budget"] == 3 + 1 * 2 and rec["unit"] == "steps" and rec["n_cases"] == 9
    assert sorted(p.name for p in (out / "reference" / "checkpoints").iterdir()) == ["reference.pt"]
    dices = {json.loads((out / s / f"seed_{k}" / "summary.json").read_text())["full_data_dice"]
             for s in ("random", "entropy") for k in (0, 1)}
    assert dices == {rec["metrics"]["dice_mean"]} and res["reference_dice"] == rec["metrics"]["dice_mean"]
    assert not any((out / s / f"seed_{k}" / "reference").exists() for s in ("random", "entropy") for k in (0, 1))
    _check_mlflow(out, base.name)


def _check_mlflow(out, experiment: str) -> None:
    """The comparison in MLflow (``tracking.mlflow: auto``, the default store ``<out>/mlruns``), read back with
    MLflow's own client: a finished parent run, one nested child per (strategy, seed) with a metric per round."""
    pytest.importorskip("mlflow")
    from raylearn.tracking import resolve_uri, tracking_client

    client = tracking_client(resolve_uri(None, out))
    exp = client.get_experiment_by_name(experiment)
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {f"{experiment} compare"} | {f"{experiment}-{s}-s{k}" for s in ("random", "entropy")
                                                     for k in (0, 1)}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    parent = runs.pop(f"{experiment} compare")
    assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {parent.info.run_id}
    for name, run in runs.items():
        summary = json.loads((out / run.data.tags["raylearn.strategy"] / f"seed_{run.data.tags['raylearn.seed']}"
                              / "summary.json").read_text())
        hist = client.get_metric_history(run.info.run_id, "dice_mean")
        assert [h.step for h in hist] == [0, 1], name
        assert [h.value for h in hist] == pytest.approx([c["dice_mean"] for c in summary["curve"]])
        assert run.data.metrics["full_data_dice"] == pytest.approx(summary["full_data_dice"])
        assert "learning_curve.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert parent.data.metrics["alc_mean/entropy"] == pytest.approx(
        json.loads((out / "compare.json").read_text())["rows"][1]["alc_mean"])


def test_compare_rejects_unknown_strategy_before_running(tmp_path):
    from raylearn.compare import compare

    with pytest.raises(ConfigError, match="nope"):
        compare(_base(tmp_path), ["random", "nope"], [0], tmp_path / "x")
    assert not (tmp_path / "x" / "random").exists()


@pytest.mark.slow  # 2 seeds x 3 rounds + the reference: about 4 min on 2 busy cores
def test_clasp_pe_runs_with_an_fg_random_cold_start_and_counts_foreground(ray_session, tmp_path):
    """ClaSP PE end to end (its noise schedule reads the round from the loop): the cold start is fg_random on the
    store's ground truth (no model needed), every round records the cost in foreground, and the compare table
    carries S95%, the foreground share and FG-Eff. (The paired comparison needs two strategies; it is covered by
    the unit tests in test_curves.py.)"""
    import csv

    from raylearn.compare import compare
    from raylearn.ledger import Ledger

    base = _base(tmp_path)
    base = base.model_copy(update={
        "cold_start": base.cold_start.model_copy(update={"strategy": "fg_random", "params": {"all_classes": True}}),
        "schedule": base.schedule.model_copy(update={"rounds": 2}),
        "evaluate": base.evaluate.model_copy(update={"full_data_reference": True}),
    })
    out = tmp_path / "cmp"
    res = compare(base, ["clasp_pe"], [0, 1], out)
    rows = list(csv.DictReader(open(out / "clasp_pe" / "seed_0" / "rounds.csv")))
    fg = [float(r["fraction_fg_labelled"]) for r in rows]
    assert len(fg) == 3 and 0 < fg[0] < fg[1] < fg[2] <= 1
    recs = Ledger(out / "clasp_pe" / "seed_0" / "ledger.jsonl", readonly=True).rounds()
    assert [r["n_labeled"] for r in recs] == [2, 4, 6]
    assert recs[-1]["fg_labelled_voxels"] == sum(r["annotated_fg_voxels"] for r in recs)
    (row,) = res["rows"]
    assert len(row["fg_fractions"]) == 3 and "fg_eff" in row and "s95_percent" in row
    md = (out / "compare.md").read_text()
    assert "FG% (end)" in md and "S95%" in md and "FG-Eff" in md
