"""Tracking of ``raylearn tune`` sweeps: Ray Tune's own ``MLflowLoggerCallback`` / ``TBXLoggerCallback``.

The MLflow plumbing (the optional-extra checks, the tracking URI, the store check) is :mod:`raylearn.tracking`'s;
Ray is imported only inside :func:`tune_callbacks`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from raylearn.config import StrictModel
from raylearn.tracking import _import, mlflow_wanted, resolve_uri, tracking_client

__all__ = ["TuneTrackingConfig", "open_tracking_store", "tune_callbacks"]


class TuneTrackingConfig(StrictModel):
    """The ``tracking:`` section of a sweep YAML: Ray Tune's ``MLflowLoggerCallback`` / ``TBXLoggerCallback``.

    Attributes:
        mlflow: as :class:`TrackingConfig` (one MLflow run per trial, its reports as metrics at each round).
        uri: None = ``<output_dir>/mlruns``.
        experiment: None = the sweep's ``name``.
        tags: extra tags of every trial's run.
        tensorboard: add Ray Tune's ``TBXLoggerCallback`` (event files in each trial's folder under
            ``<output_dir>/ray_tune``); an error when ``tensorboardX`` is missing.
    """

    mlflow: Literal["auto"] | bool = "auto"
    uri: str | None = None
    experiment: str | None = Field(None, min_length=1)
    tags: dict[str, str] = {}
    tensorboard: bool = False


def open_tracking_store(tc: TuneTrackingConfig, out: str | Path) -> str | None:
    """The sweep's MLflow tracking URI, its store checked in this process (failing now, naming the key, rather than
    inside Tune; a file store allowed, see :func:`raylearn.tracking.tracking_client`); None when MLflow is off.
    A resumed sweep needs this too: ``Tuner.restore`` brings back the callbacks but not this process's set-up."""
    if not mlflow_wanted(tc.mlflow):
        return None
    uri = resolve_uri(tc.uri, out)
    tracking_client(uri)
    return uri


def tune_callbacks(tc: TuneTrackingConfig, out: str | Path, sweep_name: str) -> list:
    """Ray Tune's own logger callbacks for a sweep: ``MLflowLoggerCallback`` (one MLflow run per trial in
    ``tc.uri``, default ``<out>/mlruns``) and, when asked, ``TBXLoggerCallback``."""
    callbacks = []
    uri = open_tracking_store(tc, out)
    if uri is not None:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=tc.experiment or sweep_name,
                                              tags={"raylearn.sweep": sweep_name, **tc.tags}, save_artifact=True))
    if tc.tensorboard:
        _import("tensorboardX", "tracking.tensorboard")
        from ray.tune.logger import TBXLoggerCallback

        callbacks.append(TBXLoggerCallback())
    return callbacks
