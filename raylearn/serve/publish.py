"""Publishing new promptable-model weights to a running Serve app, live (open sessions stay open).

``raylearn run`` fine-tunes the promptable model after every round (``promptable:`` in the experiment) and, with
``promptable.serve_app`` and ``promptable.serve_config`` set, calls :func:`publish_promptable` with the round's
checkpoint. That deploys the app again from the same Serve config file with only the model deployment's
``user_config`` changed (``model.checkpoint`` and the architecture of the checkpoint, and ``version``). The app's
deployments carry a fixed code version (:func:`raylearn.serve.app.code_version`), so Serve applies it as a
lightweight update: ``SamMed3DModel.reconfigure`` loads the weights on the live replicas, the ingress replica (and
its sessions) is untouched, and ``/v1/info`` shows the new ``version``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from raylearn.serve.config import ServeConfig, load_serve_config

__all__ = ["publish_promptable", "with_promptable"]

log = logging.getLogger(__name__)


def with_promptable(cfg: ServeConfig, checkpoint: str | Path, version: str) -> ServeConfig:
    """``cfg`` with the model deployment serving ``checkpoint`` (its architecture, preset and spacing) as
    ``version``; everything else unchanged."""
    from raylearn.models.promptable_train import served_config

    sam = served_config(Path(checkpoint).expanduser().resolve(), device=cfg.model.model.device)
    model = cfg.model.model_copy(update={"model": sam, "version": str(version)})
    return cfg.model_copy(update={"model": model})


def publish_promptable(checkpoint: str | Path, version: str, serve_config: str | Path | ServeConfig,
                       app_name: str | None = None, token: str | None = None) -> dict:
    """Deploy the running Serve app ``app_name`` again with new SAM-Med3D weights (a lightweight update).

    Args:
        checkpoint: a promptable checkpoint (``checkpoints/promptable_round_XX.pt``); a path every replica reads.
        version: the weights' label, shown by ``/v1/info``.
        serve_config: the Serve config (file) the app was started with (``raylearn serve --config``), so the
            ingress's settings are deployed unchanged.
        app_name: the app (default: the config's ``name``).
        token: the ingress's bearer token as given to ``build_app``; default the config's ``auth_token_env`` of
            this process (as ``raylearn serve`` does).

    Returns:
        ``{"app", "version", "checkpoint"}``.

    Raises:
        RuntimeError: no Serve app of that name runs on the connected Ray cluster (nothing is started then).
    """
    from ray import serve

    from raylearn.serve.app import build_app

    cfg = serve_config if isinstance(serve_config, ServeConfig) else load_serve_config(serve_config)
    name = app_name or cfg.name
    running = serve.status().applications
    if name not in running:
        raise RuntimeError(f"no Serve app named {name!r} runs on this Ray cluster (running: {sorted(running)}); "
                           "start it with raylearn serve on the same cluster (RAY_ADDRESS)")
    ann = cfg.ingress.annotation
    if ann is not None and not os.path.isabs(os.path.expanduser(ann.run_dir)):  # as raylearn serve deploys it
        ann.run_dir = os.path.abspath(os.path.expanduser(ann.run_dir))
    token = token or os.environ.get(cfg.ingress.auth_token_env) or None
    new = with_promptable(cfg, checkpoint, version)
    serve.run(build_app(new, token), name=name, route_prefix=cfg.route_prefix)
    log.info("Serve app %s: SAM-Med3D version %s from %s", name, version, checkpoint)
    return {"app": name, "version": str(version), "checkpoint": str(new.model.model.checkpoint)}
