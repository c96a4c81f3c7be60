"""Serve configuration: pydantic models for the two deployments and the Serve config file reader.

``deployments/serve.yaml`` is a standard Ray Serve config file (``serve run deployments/serve.yaml``).
raylearn's own settings live in each deployment's ``user_config`` and are validated here (unknown keys are
errors); Serve's deployment options (``num_replicas``, ``autoscaling_config``, ``ray_actor_options`` with
``num_gpus``, ``max_ongoing_requests``) stay in Serve's own schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raylearn.config import ConfigError, StrictModel, load_yaml, parse_config
from raylearn.data.preprocess import PreprocessConfig
from raylearn.models.sam_med3d import SamMed3DConfig

INGRESS_NAME = "SamMed3DIngress"
MODEL_NAME = "SamMed3DModel"
DEFAULT_TOKEN_ENV = "RAYLEARN_SERVE_TOKEN"
#: hard ceiling of clicks in one request body, whatever ``max_clicks_per_request`` says (schema-level)
MAX_CLICKS_HARD = 1024


class BatchingConfig(StrictModel):
    """``@serve.batch`` settings of the model deployment (``enabled: false`` = batches of one)."""

    enabled: bool = True
    max_batch_size: int = Field(4, ge=1, le=64)
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=5)


class ModelDeploymentConfig(StrictModel):
    """``user_config`` of the ``SamMed3DModel`` deployment.

    Attributes:
        version: a label of the weights (``raylearn run`` publishes ``r03-s160``: round 3, 160 fine-tuning steps);
            shown by ``/v1/info``. A new version (or checkpoint) is loaded in place by ``reconfigure``: replicas
            and the ingress's open sessions stay up.
    """

    model: SamMed3DConfig = Field(default_factory=SamMed3DConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    version: str | None = Field(None, max_length=128)


class PreannotateConfig(StrictModel):
    """Defaults of ``POST /v1/preannotate`` (prediction -> prompt, :mod:`raylearn.p2p`).

    Attributes:
        n_clicks: clicks per class, added one at a time from the error region (positive where the mask misses
            the reference, negative where it exceeds it).
        click_method: ``random`` (uniform in the error region, SAM-Med3D's default) or ``center`` (its core).
        seed: seed of the click simulation.
    """

    n_clicks: int = Field(5, ge=1, le=50)
    click_method: Literal["random", "center"] = "random"
    seed: int = Field(0, ge=0)


class UserConfig(StrictModel):
    """One annotation user: a name, a role, and the bearer token (one of ``token``, ``token_env`` (an env var of
    the replica), ``token_sha256`` (its sha256 hex, so the file holds no secret))."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._@-]+$")
    role: Literal["annotator", "admin"] = "annotator"
    token: str | None = Field(None, min_length=8)
    token_env: str | None = None
    token_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _one_token(self) -> UserConfig:
        if sum(x is not None for x in (self.token, self.token_env, self.token_sha256)) != 1:
            raise ValueError(f"user {self.name!r}: give exactly one of token, token_env, token_sha256")
        return self


class AnnotationConfig(StrictModel):
    """The annotation API (MONAI Label-compatible routes and ``/v1/annotation/*``) over a run's workspace.

    Attributes:
        run_dir: the experiment's ``output_dir`` (``raylearn run`` writes ``annotation/run.json`` there; the API
            answers 503 until it exists).
        users: annotation users with roles (``annotator``: images, suggestions, labels; ``admin``: also pause /
            resume, strategy, export). With users set, auth is on even without the service token.
        lease_s: lease length of a suggested case (default: the run's ``schedule.lease_s``).
        require_lease: a label upload needs the uploader's active lease on the case (admins excepted).
        allow_empty_labels: accept labels without foreground.
        infer_device: device of the segmenter behind ``POST /infer/{model}``.
    """

    run_dir: str
    users: list[UserConfig] = Field(default_factory=list)
    lease_s: float | None = Field(None, gt=0)
    require_lease: bool = True
    allow_empty_labels: bool = False
    infer_device: str = "cpu"


class IngressConfig(StrictModel):
    """``user_config`` of the ``SamMed3DIngress`` deployment (the HTTP API).

    Attributes:
        classes: label value -> name of the classes a click may target (and the segmenter predicts).
        segmenter_checkpoint: a MONAI or nnU-Net segmenter checkpoint (``raylearn run`` writes them) for
            ``/v1/preannotate`` (None disables it); the model deployment loads and runs it on its device.
        segmenter_preprocess: preprocessing the segmenter was trained with (applied before predicting).
        auth_token: bearer token required on every route but ``/healthz`` and the docs. Token sources, first
            found wins: this key, the token given to :func:`raylearn.serve.app.build_app` (``raylearn serve`` reads
            ``auth_token_env`` in its own environment), the env var ``auth_token_env`` of the replica (the
            application's ``runtime_env.env_vars``). No token at all = no auth, with a warning at start and in
            ``/v1/info``.
        require_auth: refuse to start (a deployment error) when no token reached the replica.
        max_upload_mb: larger multipart bodies get 413 (from Content-Length, before the body is read).
        max_voxels: voxels an uploaded volume may declare (413 above; checked before decompression).
        max_resampled_voxels: voxels after resampling to the model's spacing (413 above).
        read_timeout_s: a volume read (header checks + decoding) taking longer answers 503.
        read_workers: threads that decode volumes (reads beyond them queue, within ``read_timeout_s``).
        max_clicks_per_request, max_clicks_per_session: 422 above (the decoder's cost grows with clicks).
        session_ttl_s: idle sessions expire after this many seconds.
        max_sessions: the least recently used session is dropped beyond this.
        embedding_cache_size: image embeddings kept (LRU) for one-shot requests on the same volume.
        annotation: the annotation API (:class:`AnnotationConfig`); None = SAM-Med3D routes only.
    """

    classes: dict[int, str] = Field(default_factory=lambda: {1: "object"})
    segmenter_checkpoint: str | None = None
    segmenter_preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    preannotate: PreannotateConfig = Field(default_factory=PreannotateConfig)
    auth_token: str | None = Field(None, min_length=8)
    auth_token_env: str = Field(DEFAULT_TOKEN_ENV, min_length=1)
    require_auth: bool = False
    max_upload_mb: float = Field(256.0, gt=0)
    max_voxels: int = Field(1 << 27, ge=8)
    max_resampled_voxels: int = Field(1 << 25, ge=8)
    read_timeout_s: float = Field(30.0, gt=0)
    read_workers: int = Field(2, ge=1, le=32)
    max_clicks_per_request: int = Field(64, ge=1, le=MAX_CLICKS_HARD)
    max_clicks_per_session: int = Field(256, ge=1)
    session_ttl_s: float = Field(1800.0, gt=0)
    max_sessions: int = Field(32, ge=1)
    embedding_cache_size: int = Field(8, ge=1)
    annotation: AnnotationConfig | None = None

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: dict[int, str]) -> dict[int, str]:
        if not v:
            raise ValueError("at least one class is required")
        if any(not 1 <= k <= 255 for k in v):
            raise ValueError("class values must lie in 1..255 (0 is background)")
        return v


class DeploymentOptions(StrictModel):
    """The Serve deployment options raylearn passes to ``.options(...)`` when it builds the app in Python."""

    num_replicas: int | str | None = None
    max_ongoing_requests: int | None = None
    ray_actor_options: dict[str, Any] | None = None
    autoscaling_config: dict[str, Any] | None = None

    def as_kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class ServeConfig(StrictModel):
    """Everything :func:`raylearn.serve.app.build_app` needs (read from a Serve config file or built in code)."""

    name: str = "raylearn"
    route_prefix: str = "/"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    model: ModelDeploymentConfig = Field(default_factory=ModelDeploymentConfig)
    ingress_options: DeploymentOptions = Field(default_factory=DeploymentOptions)
    model_options: DeploymentOptions = Field(default_factory=DeploymentOptions)


_OPTION_KEYS = set(DeploymentOptions.model_fields)


def load_serve_config(path: str | Path) -> ServeConfig:
    """Read a Ray Serve config file (``applications: - import_path: raylearn.serve.app:app ...``).

    Takes ``http_options.host/port``, the first application's ``name`` and ``route_prefix``, and per
    deployment (``SamMed3DIngress``, ``SamMed3DModel``) its ``user_config`` (validated strictly) and Serve
    options. Raises :class:`ConfigError` naming the file and key.
    """
    src = str(path)
    raw = load_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: <root>: expected a mapping")
    http = raw.get("http_options") or {}
    apps = raw.get("applications") or []
    if not apps or not isinstance(apps, list) or not isinstance(apps[0], dict):
        raise ConfigError(f"{src}: applications: expected a list with the raylearn application")
    app = apps[0]
    data: dict[str, Any] = {k: v for k, v in (("host", http.get("host")), ("port", http.get("port")),
                                              ("name", app.get("name")), ("route_prefix", app.get("route_prefix")))
                            if v is not None}
    for i, dep in enumerate(app.get("deployments") or []):
        name = dep.get("name") if isinstance(dep, dict) else None
        if name not in (INGRESS_NAME, MODEL_NAME):
            raise ConfigError(f"{src}: applications.0.deployments.{i}.name: expected {INGRESS_NAME} or {MODEL_NAME}, "
                              f"got {name!r}")
        kind = "ingress" if name == INGRESS_NAME else "model"
        if dep.get("user_config") is not None:
            data[kind] = dep["user_config"]
        data[f"{kind}_options"] = {k: v for k, v in dep.items() if k in _OPTION_KEYS}
    try:
        return parse_config(data, ServeConfig, source=src)
    except ConfigError as err:  # name keys as they are spelt in the file
        msg = str(err)
        for kind, name in (("ingress", INGRESS_NAME), ("model", MODEL_NAME)):
            msg = msg.replace(f": {kind}.", f": deployments[{name}].user_config.")
            msg = msg.replace(f": {kind}_options.", f": deployments[{name}].")
        raise ConfigError(msg) from None


def annotation_serve_config(run_dir: str | Path, users: list[UserConfig], *, name: str = "raylearn",
                            classes: dict[int, str] | None = None, auth_token_env: str = DEFAULT_TOKEN_ENV,
                            model: SamMed3DConfig | None = None, num_cpus: float = 0,
                            ingress_env_vars: dict[str, str] | None = None, **annotation: Any) -> ServeConfig:
    """A :class:`ServeConfig` of the annotation app over one run's workspace, built in code.

    Args:
        run_dir: the experiment's ``output_dir`` (:attr:`AnnotationConfig.run_dir`).
        users: the annotation users (names, roles, tokens).
        name: the Serve application's name.
        classes: label value -> class name (default: :class:`IngressConfig`'s).
        auth_token_env: env var of the service token (name an unset one for user tokens only).
        model: SAM-Med3D settings (default: the ``small`` preset on the CPU).
        num_cpus: CPUs each deployment's replica reserves (``ray_actor_options.num_cpus``).
        ingress_env_vars: environment of the ingress replica (``runtime_env.env_vars``; e.g. users' ``token_env``).
        **annotation: further :class:`AnnotationConfig` fields (``lease_s``, ``require_lease``, ...).
    """
    ingress = {"auth_token_env": auth_token_env,
               "annotation": AnnotationConfig(run_dir=str(run_dir), users=users, **annotation)}
    if classes is not None:
        ingress["classes"] = classes
    ingress_actor: dict[str, Any] = {"num_cpus": num_cpus}
    if ingress_env_vars:
        ingress_actor["runtime_env"] = {"env_vars": dict(ingress_env_vars)}
    return ServeConfig(
        name=name,
        ingress=IngressConfig(**ingress),
        model=ModelDeploymentConfig(model=model or SamMed3DConfig(preset="small", device="cpu")),
        ingress_options=DeploymentOptions(ray_actor_options=ingress_actor),
        model_options=DeploymentOptions(ray_actor_options={"num_cpus": num_cpus}),
    )
