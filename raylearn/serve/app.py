"""Building and running the Serve application: ingress (:mod:`raylearn.serve.ingress`) -> model
(:mod:`raylearn.serve.model`).

``serve run deployments/serve.yaml`` imports :data:`app`, bound here with defaults only (nothing is read from the
environment at import time); the file's ``user_config`` and deployment options are applied by Serve.
``raylearn serve`` / :func:`run_server` reads the config file itself and passes a token found in its own
environment to the ingress as an argument, so it reaches the replicas however Ray was started. Docs at ``/docs``.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from ray import serve

from raylearn.serve.config import ServeConfig, load_serve_config
from raylearn.serve.guard import NO_AUTH_WARNING
from raylearn.serve.ingress import SamMed3DIngress
from raylearn.serve.model import SamMed3DModel

__all__ = ["SamMed3DIngress", "SamMed3DModel", "app", "build_app", "run_server"]

log = logging.getLogger(__name__)


def build_app(cfg: ServeConfig | None = None, token: str | None = None):
    """The bound Serve application (ingress -> model) with ``cfg``'s user_configs and deployment options.

    Args:
        cfg: the configuration (defaults: full model, random weights, no auth token).
        token: a bearer token for the ingress, passed as a deployment argument (it travels with the app to
            every replica, whichever cluster runs it); ``cfg.ingress.auth_token`` wins over it.
    """
    cfg = cfg or ServeConfig()
    model = SamMed3DModel.options(user_config=cfg.model.model_dump(mode="json"), **cfg.model_options.as_kwargs())
    ingress = SamMed3DIngress.options(user_config=cfg.ingress.model_dump(mode="json"),
                                      **cfg.ingress_options.as_kwargs())
    return _pinned(ingress).bind(_pinned(model).bind(), token)


def code_version() -> str:
    """A digest of the Serve app's source (``raylearn/serve``, SAM-Med3D, prompts): the deployments' code version.

    ``serve.run`` of an app built without one gives every deployment a random code version, so deploying it again
    restarts every replica (open sessions lost). With this one, deploying the same code with another ``user_config``
    (new weights, :func:`raylearn.serve.publish.publish_promptable`) is a lightweight update: Serve calls
    ``reconfigure`` on the live replicas. Changed code still restarts them.
    """
    import hashlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in sorted([*root.joinpath("serve").glob("*.py"), *root.joinpath("models").glob("sam_med3d*.py"),
                     root / "prompts.py", root / "p2p.py"]):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return "raylearn-" + h.hexdigest()[:16]


def _pinned(deployment):
    """The deployment with :func:`code_version` as its version (Serve's own ``options(version=...)``, which the
    public API no longer takes; the user's options are applied before, so Serve still knows which they set)."""
    try:
        return deployment.options(_internal=True, version=code_version())
    except TypeError:  # a Serve without the private keyword: redeploying then restarts the replicas
        log.warning("Serve does not take a code version here: a weight update will restart the replicas")
        return deployment


#: module-level application for ``serve run deployments/serve.yaml`` (import_path raylearn.serve.app:app)
app = build_app()


def run_server(config_path: str | None = None, host: str | None = None, port: int | None = None,
               blocking: bool = True) -> str:
    """Start Ray (if needed), Serve's HTTP proxy on ``host:port`` and the app; returns the base URL.

    The bearer token: ``auth_token`` of the file, else the env var ``auth_token_env`` (default
    ``RAYLEARN_SERVE_TOKEN``) of this process, passed on to the ingress replicas.

    Args:
        config_path: a Serve config file such as ``deployments/serve.yaml`` (None: defaults = full model,
            random weights).
        host, port: override ``http_options`` of the file (default 127.0.0.1:8000).
        blocking: serve until Ctrl-C, then shut Serve down.

    Raises:
        ConfigError: an invalid config file (one line per problem, naming the key).
    """
    import ray

    cfg = load_serve_config(config_path) if config_path else ServeConfig()
    ann = cfg.ingress.annotation
    if ann is not None and not os.path.isabs(os.path.expanduser(ann.run_dir)):  # the replicas' cwd is not ours
        ann.run_dir = os.path.abspath(os.path.expanduser(ann.run_dir))
    host, port = host or cfg.host, cfg.port if port is None else port
    token = os.environ.get(cfg.ingress.auth_token_env) or None
    if not (cfg.ingress.auth_token or token or (ann is not None and ann.users)):  # annotation users turn auth on
        warning = NO_AUTH_WARNING.format(env=cfg.ingress.auth_token_env)
        log.warning("raylearn serve: %s", warning)
        if blocking:
            print(f"WARNING: {warning}", file=sys.stderr, flush=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(cfg, token), name=cfg.name, route_prefix=cfg.route_prefix)
    url = f"http://{host}:{port}{cfg.route_prefix.rstrip('/')}"
    log.info("raylearn SAM-Med3D serving at %s (docs: %s/docs)", url, url)
    if blocking:
        print(f"serving at {url} (OpenAPI docs at {url}/docs); Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            serve.shutdown()
    return url
