"""Experiment tracking where users already look: MLflow (and TensorBoard when asked) for ``raylearn run`` /
``compare``; Ray Tune's own callbacks for ``raylearn tune`` live in :mod:`raylearn.tracking_tune`.

One MLflow run per experiment run: its config (flattened parameters and ``config.yaml``), each round's metrics at
``step = round`` (every test metric the round recorded: Dice, HD95, surface Dice and P2P's NSD per class and their
means; labelled count, % and foreground cost; timings) and the learning-curve PNG, ``rounds.csv`` and
``summary.json`` as artifacts. ``compare`` makes one parent run (the table and plot) with a child run per
(strategy, seed), MLflow's own nesting (the ``mlflow.parentRunId`` tag). A resumed run continues its MLflow run
(``<output_dir>/tracking.json`` keeps the run id and the last round logged) and logs only the rounds it has not.

Where: ``tracking.uri`` (any MLflow tracking URI, or a folder for a local file store); by default a file store in
``<output_dir>/mlruns``. ``MLFLOW_TRACKING_URI`` of the environment is not read, so nothing is logged anywhere
the config does not say. MLflow 3.13+ refuses file stores unless ``MLFLOW_ALLOW_FILE_STORE=true``; raylearn sets it
(if unset) for the file stores it is configured to use, since ``mlflow-skinny`` has no SQL store.

Optional dependencies (the ``tracking`` extra): ``tracking.mlflow: auto`` (default) logs when MLflow is
installed; ``true`` or ``tensorboard: true`` without the package is a :class:`~raylearn.config.ConfigError` naming
the key and ``pip install 'raylearn[tracking]'``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from raylearn.config import ConfigError, StrictModel

__all__ = ["CompareTracker", "RunTracker", "TrackingConfig", "resolve_uri", "round_metrics", "tracking_client"]
#: :mod:`raylearn.tracking_tune`'s names, still importable from here (see ``__getattr__`` at the end)
_TUNE_NAMES = ("TuneTrackingConfig", "tune_callbacks")

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'raylearn[tracking]'"
STATE_FILE = "tracking.json"
#: MLflow's limits: a parameter value's length, and parameters / metrics per ``log_batch`` call
_MAX_PARAM_LEN, _PARAMS_PER_BATCH, _METRICS_PER_BATCH = 6000, 100, 1000
_TIMINGS = ("train_s", "train_step_s", "score_s", "select_s", "eval_s")


class TrackingConfig(StrictModel):
    """The ``tracking:`` section of an experiment YAML.

    Attributes:
        mlflow: ``auto`` logs to MLflow when it is installed; ``true`` requires it (an error naming the extra when
            missing); ``false`` turns MLflow off.
        uri: an MLflow tracking URI (``http://host:5000``, ``sqlite:///runs/mlflow.db``, ``file:/abs/mlruns``) or
            a folder (a local file store); None = ``<output_dir>/mlruns``.
        experiment: the MLflow experiment; None = the experiment's ``name`` (``compare``: the base name).
        tags: extra tags of the MLflow run.
        tensorboard: also write TensorBoard event files (one scalar per metric, step = round).
        tensorboard_dir: where; None = ``<output_dir>/tensorboard``.
    """

    mlflow: Literal["auto"] | bool = "auto"
    uri: str | None = None
    experiment: str | None = Field(None, min_length=1)
    tags: dict[str, str] = {}
    tensorboard: bool = False
    tensorboard_dir: str | None = None

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("empty; leave it out for the default <output_dir>/mlruns")
        return v


# -- MLflow plumbing --------------------------------------------------------------------------------------------
def _import(module: str, key: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"{key}: needs the optional package {module.split('.')[0]!r} ({err}); "
                          f"install it with `{INSTALL_HINT}`") from None


def mlflow_wanted(setting: Literal["auto"] | bool, key: str = "tracking.mlflow") -> bool:
    """Whether to log to MLflow: ``auto`` when importable; ``true`` raises :class:`ConfigError` when it is not."""
    if setting is False:
        return False
    if setting == "auto":
        import importlib.util

        return importlib.util.find_spec("mlflow") is not None
    _import("mlflow", f"{key}: true")
    return True


def resolve_uri(uri: str | None, output_dir: str | Path) -> str:
    """The tracking URI: ``uri`` as given when it has a scheme, a folder made an absolute ``file:`` URI, and
    ``<output_dir>/mlruns`` when None."""
    if uri is not None and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri) and not re.match(r"^[A-Za-z]:[\\/]", uri):
        return uri
    path = Path(uri).expanduser() if uri is not None else Path(output_dir) / "mlruns"
    return path.resolve().as_uri()


def tracking_client(uri: str, key: str = "tracking.uri"):
    """``mlflow.tracking.MlflowClient`` for ``uri`` (a file store is allowed, see the module docstring).

    Raises:
        ConfigError: MLflow is missing, or the store cannot be opened (naming ``key``).
    """
    _import("mlflow", "tracking.mlflow")
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    except Exception as err:  # MlflowException and its unsupported-URI kin, OSError, a missing SQL driver
        raise ConfigError(f"{key}: cannot open MLflow tracking store {uri!r}: {str(err).splitlines()[0]}") from None
    return client


def _experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # created meanwhile by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}`` (lists as JSON; values cut to MLflow's 6000 characters)."""
    out: dict[str, str] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out[key] = text[:_MAX_PARAM_LEN]
    return out


def metric_key(name: str) -> str:
    """A name MLflow accepts (letters, digits, ``_ - . / :`` and spaces); other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-./: ]", "_", name)


def round_metrics(rec: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of one ledger round record, flat: every test metric (``dice_mean``, ``dice_<class>``,
    ``hd95_*`` in mm, ``surface_dice_*``, ``symdiff_pct_*`` = P2P's NSD in %, ``correction_*``), ``n_labeled``,
    ``labelled_pct``, ``fg_labelled_voxels``, ``fg_labelled_pct`` and ``time_<phase>_s``. None values are left out;
    NaN stays NaN (MLflow stores it)."""
    out: dict[str, float] = {}
    for k, v in (rec.get("metrics") or {}).items():
        if isinstance(v, int | float):
            out[metric_key(k)] = float(v)
    out["n_labeled"] = float(rec["n_labeled"])
    out["labelled_pct"] = 100.0 * float(rec["fraction_labelled"])
    if rec.get("fg_labelled_voxels") is not None:
        out["fg_labelled_voxels"] = float(rec["fg_labelled_voxels"])
    if rec.get("fraction_fg_labelled") is not None:
        out["fg_labelled_pct"] = 100.0 * float(rec["fraction_fg_labelled"])
    timings = rec.get("timings") or {}
    for k in _TIMINGS:
        if k in timings:
            out[f"time_{k}"] = float(timings[k])
    out["selected"] = float(len(rec.get("selected") or []))
    return out


def _log_batch(client, run_id: str, metrics: Mapping[str, float] = (), step: int = 0,
               params: Mapping[str, str] = ()) -> None:
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    ms = [Metric(k, float(v), now, int(step)) for k, v in dict(metrics).items()]
    for i in range(0, len(ms), _METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=ms[i:i + _METRICS_PER_BATCH], synchronous=True)
    ps = [Param(k, v) for k, v in dict(params).items()]
    for i in range(0, len(ps), _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=ps[i:i + _PARAMS_PER_BATCH], synchronous=True)


def _read_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_state(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


class _MlflowRun:
    """One MLflow run, re-opened from ``state`` when it still exists in the same store."""

    def __init__(self, client, uri: str, experiment: str, run_name: str, tags: Mapping[str, str],
                 state: dict) -> None:
        from mlflow.exceptions import MlflowException

        self.client, self.uri = client, uri
        self.experiment_id = _experiment_id(client, experiment)
        self.resumed = False
        run_id = state.get("run_id") if state.get("uri") == uri else None
        if run_id is not None:
            try:
                run = client.get_run(run_id)
                self.resumed = run.info.lifecycle_stage != "deleted"
            except MlflowException:
                self.resumed = False
        if self.resumed:
            self.run_id = run_id
            client.update_run(run_id, status="RUNNING")
        else:
            run = client.create_run(self.experiment_id, tags=dict(tags), run_name=run_name)
            self.run_id = run.info.run_id

    def state(self) -> dict:
        return {"uri": self.uri, "experiment_id": self.experiment_id, "run_id": self.run_id}

    def artifact(self, path: Path, folder: str | None = None) -> None:
        if Path(path).is_file():
            self.client.log_artifact(self.run_id, str(path), folder)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class RunTracker:
    """Tracking of one experiment run (``raylearn run``, or one (strategy, seed) of ``compare``).

    Use :meth:`start` (None when every backend is off), then :meth:`log_rounds` after each recorded round (it logs
    the rounds not logged yet, so a resumed run catches up) and :meth:`finish` at the end.
    """

    def __init__(self, out: Path, mlflow_run: _MlflowRun | None, writer, state: dict) -> None:
        self.out, self.mlflow, self.writer, self._state = out, mlflow_run, writer, state

    @classmethod
    def start(cls, cfg, out: str | Path, config_json: Mapping[str, Any], config_hash: str) -> RunTracker | None:
        """Open the run's trackers from ``cfg.tracking``; raises :class:`ConfigError` naming the key on a bad setting.

        Args:
            cfg: the experiment config (``tracking``, ``name``, ``strategy``, ``seed``, ...).
            out: the run's output folder (default stores, ``tracking.json``).
            config_json: the config logged as parameters and ``config.yaml``.
            config_hash: the ledger's config hash (a tag).
        """
        tc: TrackingConfig = cfg.tracking
        out = Path(out)
        use_mlflow = mlflow_wanted(tc.mlflow)
        if not use_mlflow and not tc.tensorboard:
            return None
        state = _read_state(out / STATE_FILE)
        mlflow_run = None
        if use_mlflow:
            uri = resolve_uri(tc.uri, out)
            client = tracking_client(uri)
            tags = {"raylearn.strategy": cfg.strategy.name, "raylearn.seed": str(cfg.seed),
                    "raylearn.config_hash": config_hash, "raylearn.output_dir": str(out.resolve()),
                    "raylearn.mode": cfg.schedule.mode, "raylearn.oracle": cfg.oracle,
                    "mlflow.source.name": "raylearn", "mlflow.source.type": "LOCAL", **tc.tags}
            mlflow_run = _MlflowRun(client, uri, tc.experiment or cfg.name, cfg.name, tags, state.get("mlflow", {}))
            if not mlflow_run.resumed:
                state = {}  # a new MLflow run: every round again
                _log_batch(client, mlflow_run.run_id, params=flatten(config_json))
                client.log_dict(mlflow_run.run_id, dict(config_json), "config.yaml")
            log.info("tracking: MLflow run %s in %s (experiment %r)", mlflow_run.run_id, uri,
                     tc.experiment or cfg.name)
        writer = None
        if tc.tensorboard:
            _import("tensorboard", "tracking.tensorboard")
            tb = _import("torch.utils.tensorboard", "tracking.tensorboard")
            tb_dir = Path(tc.tensorboard_dir).expanduser() if tc.tensorboard_dir else out / "tensorboard"
            writer = tb.SummaryWriter(log_dir=str(tb_dir))
            if state.get("logged_round") is None:
                writer.add_text("config", "```\n" + json.dumps(dict(config_json), indent=1) + "\n```", 0)
        tracker = cls(out, mlflow_run, writer, {**state, "mlflow": mlflow_run.state() if mlflow_run else None})
        tracker._save()
        return tracker

    @property
    def run_id(self) -> str | None:
        return self.mlflow.run_id if self.mlflow else None

    @property
    def logged_round(self) -> int:
        return int(self._state.get("logged_round", -1) if self._state.get("logged_round") is not None else -1)

    def _save(self) -> None:
        _write_state(self.out / STATE_FILE, self._state)

    def log_rounds(self, rounds: Iterable[Mapping[str, Any]]) -> None:
        """Log every round of ``rounds`` after the last one logged, then the current learning curve and CSV.

        A tracking server that fails mid-run does not stop the run: a warning, and the next call logs the rounds
        missed (the ledger stays the record)."""
        try:
            self._log_rounds(rounds)
        except Exception as err:  # noqa: BLE001 - MLflow / filesystem errors of the tracking store
            log.warning("tracking: could not log to %s (%s); retrying after the next round",
                        self.mlflow.uri if self.mlflow else "TensorBoard", (str(err) or repr(err)).splitlines()[0])

    def _log_rounds(self, rounds: Iterable[Mapping[str, Any]]) -> None:
        new = [r for r in rounds if int(r["round"]) > self.logged_round]
        if not new:
            return
        for rec in new:
            values = round_metrics(rec)
            if self.mlflow is not None:
                _log_batch(self.mlflow.client, self.mlflow.run_id, values, step=int(rec["round"]))
            if self.writer is not None:
                for k, v in values.items():
                    self.writer.add_scalar(k, v, int(rec["round"]))
            self._state["logged_round"] = int(rec["round"])
        if self.writer is not None:
            self.writer.flush()
        if self.mlflow is not None:
            self.mlflow.artifact(self.out / "learning_curve.png")
            self.mlflow.artifact(self.out / "rounds.csv")
        self._save()

    def finish(self, summary: Mapping[str, Any] | None = None, status: str = "FINISHED") -> None:
        """End the run: summary metrics (ALC, full-pool Dice) and files, then the run's status
        (``FINISHED``, ``FAILED`` or ``KILLED``). On ``FAILED`` / ``KILLED`` (the run is raising already) a tracking
        error is only logged."""
        try:
            if self.mlflow is not None:
                if summary is not None:
                    last = int(summary.get("rounds", 1)) - 1
                    extra = {k: float(summary[s]) for k, s in (("alc", "alc"), ("full_data_dice", "full_data_dice"))
                             if summary.get(s) is not None}
                    _log_batch(self.mlflow.client, self.mlflow.run_id, extra, step=max(0, last))
                    for name in ("learning_curve.png", "rounds.csv", "summary.json"):
                        self.mlflow.artifact(self.out / name)
                self.mlflow.end(status)
        except Exception as err:  # noqa: BLE001
            if status == "FINISHED":
                raise
            log.warning("tracking: could not mark the MLflow run %s: %s", status, err)
        finally:
            if self.writer is not None:
                self.writer.close()


class CompareTracker:
    """The parent MLflow run of a ``compare``: its child runs are the (strategy, seed) runs."""

    def __init__(self, out: Path, run: _MlflowRun, base_tracking: TrackingConfig) -> None:
        self.out, self.run, self.base = out, run, base_tracking

    @classmethod
    def start(cls, base, out: str | Path, strategies: list[str], seeds: list[int]) -> CompareTracker | None:
        """The parent run in ``base.tracking.uri`` (default ``<out>/mlruns``); None when MLflow is off."""
        tc: TrackingConfig = base.tracking
        if not mlflow_wanted(tc.mlflow):
            return None
        out = Path(out)
        uri = resolve_uri(tc.uri, out)
        client = tracking_client(uri)
        state = _read_state(out / STATE_FILE)
        tags = {"raylearn.compare": "parent", "raylearn.strategies": ",".join(strategies),
                "mlflow.source.name": "raylearn compare", "mlflow.source.type": "LOCAL", **tc.tags}
        run = _MlflowRun(client, uri, tc.experiment or base.name, f"{base.name} compare", tags,
                         state.get("mlflow", {}))
        if not run.resumed:
            _log_batch(client, run.run_id, params={"strategies": ",".join(strategies),
                                                   "seeds": ",".join(map(str, seeds))})
        _write_state(out / STATE_FILE, {"mlflow": run.state()})
        tracker = cls(out, run, tc.model_copy(update={"uri": uri, "experiment": tc.experiment or base.name}))
        log.info("tracking: compare's MLflow parent run %s in %s", run.run_id, uri)
        return tracker

    def child(self, tracking: TrackingConfig, sub: str) -> TrackingConfig:
        """The ``tracking`` of the child run in ``<out>/<sub>``: the parent's store and experiment, nested under it
        (TensorBoard: ``<tensorboard_dir>/<sub>`` when a folder is set, else the run's own)."""
        update: dict[str, Any] = {"uri": self.run.uri, "experiment": self.base.experiment,
                                  "tags": {**tracking.tags, "mlflow.parentRunId": self.run.run_id,
                                           "raylearn.compare": "child"}}
        if tracking.tensorboard_dir:
            update["tensorboard_dir"] = str(Path(tracking.tensorboard_dir) / sub)
        return tracking.model_copy(update=update)

    def finish(self, result: Mapping[str, Any] | None, status: str = "FINISHED") -> None:
        """The comparison's ALC per strategy (``alc_mean/<strategy>``, ``alc_sd/<strategy>``) and its files."""
        if result is not None:
            values: dict[str, float] = {}
            for row in result.get("rows", []):
                s = metric_key(row["strategy"])
                values[f"alc_mean/{s}"] = float(row["alc_mean"])
                values[f"alc_sd/{s}"] = float(row["alc_sd"])
            if result.get("reference_dice") is not None:
                values["full_data_dice"] = float(result["reference_dice"])
            _log_batch(self.run.client, self.run.run_id, {k: v for k, v in values.items() if not math.isnan(v)})
            for name in ("compare.png", "compare.md", "compare.json"):
                self.run.artifact(self.out / name)
        self.run.end(status)


def __getattr__(name: str):
    """The Ray Tune part moved to :mod:`raylearn.tracking_tune`; ``from raylearn.tracking import tune_callbacks``
    (and ``TuneTrackingConfig``) still work (imported lazily: that module imports this one)."""
    if name in _TUNE_NAMES:
        from raylearn import tracking_tune

        return getattr(tracking_tune, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
