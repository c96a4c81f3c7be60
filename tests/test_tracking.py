"""Experiment tracking: what a run logs to MLflow / TensorBoard, read back through MLflow's own client
(``mlflow.tracking.MlflowClient``) and TensorBoard's event reader; config errors name the key and the extra.

The trackers are fed real ledger-shaped round records (and the real ``rounds.csv`` / learning-curve PNG that
:func:`raylearn.outputs.write_outputs` draws from them); the end-to-end paths (a real ``compare`` and a real Tune
sweep) are checked in ``test_compare.py`` and ``test_tune.py``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from raylearn.config import ConfigError
from raylearn.experiment import ExperimentConfig, load_experiment, parse_config
from raylearn.outputs import write_outputs
from raylearn.tracking import (
    CompareTracker,
    RunTracker,
    TrackingConfig,
    flatten,
    resolve_uri,
    round_metrics,
    tracking_client,
)
from raylearn.tracking_tune import TuneTrackingConfig, tune_callbacks

pytest.importorskip("mlflow", reason="the tracking extra: pip install 'raylearn[tracking]'")


def _cfg(out: Path, **tracking) -> ExperimentConfig:
    return parse_config({"name": "trk", "seed": 3, "output_dir": str(out), "strategy": {"name": "entropy"},
                         "tracking": tracking}, ExperimentConfig)


def _round(r: int) -> dict:
    """A round record as the loop writes it to the ledger (two classes; HD95 undefined in round 0)."""
    return {"round": r, "selected": [f"c{r}a", f"c{r}b"], "n_labeled": 2 * (r + 1), "fraction_labelled": 0.1 * (r + 1),
            "fg_labelled_voxels": 100 * (r + 1), "fraction_fg_labelled": 0.05 * (r + 1),
            "metrics": {"dice_mean": 0.5 + 0.1 * r, "dice_Anterior": 0.4 + 0.1 * r, "dice_Posterior": 0.6 + 0.1 * r,
                        "hd95_mean": float("nan") if r == 0 else 3.0, "symdiff_pct_mean": 40.0 - 5 * r,
                        "surface_dice_mean": 0.7},
            "timings": {"train_s": 1.5, "score_s": 0.5, "select_s": 0.01, "eval_s": 0.7}}


def _client(out: Path):
    return tracking_client(resolve_uri(None, out))


def _only_run(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def test_round_metrics_and_flatten():
    m = round_metrics(_round(1))
    assert m["dice_Anterior"] == pytest.approx(0.5) and m["labelled_pct"] == pytest.approx(20.0)
    assert m["fg_labelled_pct"] == pytest.approx(10.0) and m["fg_labelled_voxels"] == 200
    assert m["time_train_s"] == 1.5 and m["n_labeled"] == 4 and m["symdiff_pct_mean"] == 35.0
    assert math.isnan(round_metrics(_round(0))["hd95_mean"])
    rec = {**_round(0), "metrics": {"dice_Left (L)!": 0.3}, "fraction_fg_labelled": None}
    assert "dice_Left _L__" in round_metrics(rec) and "fg_labelled_pct" not in round_metrics(rec)
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x", "e": {}}) == {"a.b": "1", "a.c": "[1, 2]", "d": "x",
                                                                      "e": "{}"}


def test_resolve_uri(tmp_path):
    assert resolve_uri(None, tmp_path) == (tmp_path / "mlruns").resolve().as_uri()
    assert resolve_uri("http://mlflow:5000", tmp_path) == "http://mlflow:5000"
    assert resolve_uri("sqlite:///x/mlflow.db", tmp_path) == "sqlite:///x/mlflow.db"
    assert resolve_uri(str(tmp_path / "store"), tmp_path) == (tmp_path / "store").as_uri()


def test_run_logs_config_rounds_and_artifacts_then_resumes_without_duplicates(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    cfg = _cfg(out, tags={"team": "lab"})
    cfg_json = cfg.model_dump(mode="json", exclude={"tracking"})
    rounds = [_round(0), _round(1)]
    t = RunTracker.start(cfg, out, cfg_json, "hash123")
    write_outputs(out, rounds, {1: "Anterior", 2: "Posterior"}, None, "trk")
    t.log_rounds(rounds)
    t.log_rounds(rounds)  # nothing new: nothing logged twice
    t.finish({"rounds": 2, "alc": 0.42, "full_data_dice": None})

    client = _client(out)
    run = _only_run(client, "trk")
    assert run.info.status == "FINISHED" and run.info.run_name == "trk" and run.info.run_id == t.run_id
    tags = run.data.tags
    assert (tags["raylearn.strategy"], tags["raylearn.seed"], tags["raylearn.config_hash"], tags["team"]) == \
        ("entropy", "3", "hash123", "lab")
    params = run.data.params
    assert params["strategy.name"] == "entropy" and params["schedule.batch_size"] == "5"
    assert params["data.phantom.shape"] == "[48, 48, 48]" and "tracking.mlflow" not in params
    hist = client.get_metric_history(run.info.run_id, "dice_Posterior")
    assert [(h.step, round(h.value, 6)) for h in hist] == [(0, 0.6), (1, 0.7)]
    assert [h.value for h in client.get_metric_history(run.info.run_id, "labelled_pct")] == pytest.approx([10, 20])
    assert math.isnan(client.get_metric_history(run.info.run_id, "hd95_mean")[0].value)
    assert run.data.metrics["alc"] == pytest.approx(0.42) and "full_data_dice" not in run.data.metrics
    assert {"time_train_s", "time_eval_s", "fg_labelled_pct", "symdiff_pct_mean"} <= set(run.data.metrics)
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "learning_curve.png", "rounds.csv"} <= files
    png = client.download_artifacts(run.info.run_id, "learning_curve.png", str(tmp_path))
    assert Path(png).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "tracking.json").read_text())["logged_round"] == 1

    # a resume continues the same MLflow run and logs only the new round
    rounds.append(_round(2))
    t2 = RunTracker.start(cfg, out, cfg_json, "hash123")
    assert t2.run_id == t.run_id and client.get_run(t.run_id).info.status == "RUNNING"
    t2.log_rounds(rounds)
    t2.finish(None, status="KILLED")
    hist = client.get_metric_history(t.run_id, "dice_mean")
    assert [h.step for h in hist] == [0, 1, 2]
    assert _only_run(client, "trk").info.status == "KILLED"


def test_compare_parent_and_nested_child_runs(tmp_path):
    base = _cfg(tmp_path / "unused", experiment="cmp-exp")
    out = tmp_path / "cmp"
    out.mkdir()
    parent = CompareTracker.start(base, out, ["random", "entropy"], [0])
    for name in ("random", "entropy"):
        run_dir = out / name / "seed_0"
        run_dir.mkdir(parents=True)
        child = base.model_copy(update={"name": f"cmp-{name}-s0", "output_dir": str(run_dir),
                                        "strategy": base.strategy.model_copy(update={"name": name}),
                                        "tracking": parent.child(base.tracking, f"{name}/seed_0")})
        t = RunTracker.start(child, run_dir, {"strategy": {"name": name}}, "h")
        t.log_rounds([_round(0)])
        t.finish({"rounds": 1, "alc": 0.3})
    (out / "compare.md").write_text("| strategy | ALC |\n")
    parent.finish({"rows": [{"strategy": "random", "alc_mean": 0.3, "alc_sd": 0.0},
                            {"strategy": "entropy", "alc_mean": 0.35, "alc_sd": 0.01}], "reference_dice": 0.8})

    client = _client(out)  # one store for the whole comparison, under its folder
    exp = client.get_experiment_by_name("cmp-exp")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"trk compare", "cmp-random-s0", "cmp-entropy-s0"}
    pid = runs["trk compare"].info.run_id
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{pid}'")
    assert {r.info.run_name for r in children} == {"cmp-random-s0", "cmp-entropy-s0"}
    assert runs["trk compare"].data.metrics["alc_mean/entropy"] == pytest.approx(0.35)
    assert runs["trk compare"].data.params == {"strategies": "random,entropy", "seeds": "0"}
    assert "compare.md" in {a.path for a in client.list_artifacts(pid)}
    assert not (out / "random" / "seed_0" / "mlruns").exists()


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    out.mkdir()
    t = RunTracker.start(_cfg(out, mlflow=False, tensorboard=True), out, {"seed": 3}, "h")
    assert t.mlflow is None
    t.log_rounds([_round(0), _round(1)])
    t.finish()
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("dice_mean")] == [(0, 0.5), (1, 0.6)]
    assert "labelled_pct" in acc.Tags()["scalars"] and not (out / "mlruns").exists()


def test_off_means_nothing_is_written(tmp_path):
    assert RunTracker.start(_cfg(tmp_path, mlflow=False), tmp_path, {}, "h") is None
    assert list(tmp_path.iterdir()) == []


def test_missing_extra_and_bad_settings_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"tracking.uri: cannot open MLflow tracking store 'nosuchscheme://x'"):
        RunTracker.start(_cfg(tmp_path, uri="nosuchscheme://x"), tmp_path, {}, "h")
    y = tmp_path / "e.yaml"
    y.write_text("tracking: {mlfow: true}\n")
    with pytest.raises(ConfigError, match=r"tracking.mlfow: unknown key \(allowed: experiment, mlflow, tags"):
        load_experiment(y)
    y.write_text("tracking: {mlflow: sometimes}\n")
    with pytest.raises(ConfigError, match=r"tracking.mlflow"):
        load_experiment(y)
    # the extra not installed: `auto` quietly logs nothing, `true` names the key and the extra
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "mlflow" else object())
    assert RunTracker.start(_cfg(tmp_path / "a"), tmp_path / "a", {}, "h") is None
    with pytest.raises(ConfigError, match=r"tracking.mlflow: true: needs the optional package 'mlflow'.*"
                                          r"pip install 'raylearn\[tracking\]'"):
        RunTracker.start(_cfg(tmp_path, mlflow=True), tmp_path, {}, "h")
    with pytest.raises(ConfigError, match=r"tracking.mlflow: true: needs .*raylearn\[tracking\]"):
        tune_callbacks(TuneTrackingConfig(mlflow=True), tmp_path, "sweep")
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(ConfigError, match=r"tracking.tensorboard: needs the optional package 'tensorboardX'"):
        tune_callbacks(TuneTrackingConfig(mlflow=False, tensorboard=True), tmp_path, "sweep")


def test_tune_uses_ray_tunes_own_callbacks(tmp_path):
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.logger import TBXLoggerCallback

    cbs = tune_callbacks(TuneTrackingConfig(tensorboard=True, tags={"team": "lab"}), tmp_path, "sw")
    assert [type(c) for c in cbs] == [MLflowLoggerCallback, TBXLoggerCallback]
    assert cbs[0].tracking_uri == (tmp_path / "mlruns").resolve().as_uri() and cbs[0].experiment_name == "sw"
    assert cbs[0].tags == {"raylearn.sweep": "sw", "team": "lab"}
    assert tune_callbacks(TuneTrackingConfig(mlflow=False), tmp_path, "sw") == []
    # the names' old home still answers
    from raylearn.tracking import TuneTrackingConfig as OldConfig
    from raylearn.tracking import tune_callbacks as old_callbacks

    assert (OldConfig, old_callbacks) == (TuneTrackingConfig, tune_callbacks)


def test_tracking_is_left_out_of_the_config_hash(tmp_path):
    from raylearn.loop import _config_json

    a, b = _cfg(tmp_path), _cfg(tmp_path, mlflow=False, uri="http://elsewhere:5000")
    assert _config_json(a) == _config_json(b) and "tracking" not in _config_json(a)
    assert isinstance(a.tracking, TrackingConfig) and a.tracking.mlflow == "auto"


def test_a_failing_store_mid_run_warns_and_catches_up(tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    out.mkdir()
    t = RunTracker.start(_cfg(out), out, {"seed": 3}, "h")
    t.log_rounds([_round(0)])

    def down(*a, **k):
        raise OSError("tracking server unreachable")

    with monkeypatch.context() as m:
        m.setattr(t.mlflow.client, "log_batch", down)
        t.log_rounds([_round(0), _round(1)])  # the run goes on
    assert "could not log" in caplog.text and t.logged_round == 0
    t.log_rounds([_round(0), _round(1), _round(2)])  # the round missed is logged with the next
    assert [h.step for h in _client(out).get_metric_history(t.run_id, "dice_mean")] == [0, 1, 2]
    with monkeypatch.context() as m:
        m.setattr(t.mlflow.client, "set_terminated", down)
        t.finish(status="FAILED")  # the run is failing already: only a warning
        with pytest.raises(OSError):
            t.finish({"rounds": 3})
