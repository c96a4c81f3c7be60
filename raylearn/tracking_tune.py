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

__all__ = ["TuneTrackingConfig", "tune_callbacks"]


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


def tune_callbacks(tc: TuneTrackingConfig, out: str | Path, sweep_name: str) -> list:
    """Ray Tune's own logger callbacks for a sweep: ``MLflowLoggerCallback`` (one MLflow run per trial in
    ``tc.uri``, default ``<out>/mlruns``) and, when asked, ``TBXLoggerCallback``."""
    callbacks = []
    if mlflow_wanted(tc.mlflow):
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        uri = resolve_uri(tc.uri, out)
        tracking_client(uri)  # fail now, naming the key, rather than inside Tune
        callbacks.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=tc.experiment or sweep_name,
                                              tags={"raylearn.sweep": sweep_name, **tc.tags}, save_artifact=True))
    if tc.tensorboard:
        _import("tensorboardX", "tracking.tensorboard")
        from ray.tune.logger import TBXLoggerCallback

        callbacks.append(TBXLoggerCallback())
    return callbacks
