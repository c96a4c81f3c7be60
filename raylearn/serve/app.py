"""Ray Serve app: a FastAPI ingress (sessions, clicks, one-shot, pre-annotation) and a batched model deployment.

``SamMed3DIngress`` (HTTP, CPU) reads volumes, preprocesses them (:mod:`raylearn.models.sam_med3d`), keeps click
sessions and an embedding cache, and calls ``SamMed3DModel`` (stateless, GPU if configured, replicas /
autoscaling) whose ``encode`` / ``decode`` are ``@serve.batch``-ed so that concurrent requests share a forward
pass. Start with ``serve run deployments/serve.yaml`` or :func:`run_server`; docs at ``/docs``.
"""

import asyncio
import hmac
import json
import logging
import os
import time
from typing import Annotated, Literal

import numpy as np
from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, Security, UploadFile
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from raylearn.config import ConfigError, parse_config
from raylearn.models.sam_med3d import (
    Click,
    ClickError,
    EmbeddingCache,
    SamMed3D,
    combine_class_probabilities,
    crop_window,
    file_sha256,
    group_clicks,
    prepare_volume,
    upsample_logits,
    window_probability_to_original,
    window_start,
)
from raylearn.serve import config as _rt
from raylearn.serve.config import (
    INGRESS_NAME,
    MODEL_NAME,
    IngressConfig,
    ModelDeploymentConfig,
    ServeConfig,
    load_serve_config,
)
from raylearn.serve.schemas import (
    CLICK_LIST,
    ClassStats,
    ClickIn,
    ClicksRequest,
    ErrorResponse,
    InfoResponse,
    MaskResponse,
    ModelInfo,
    SessionInfo,
)
from raylearn.serve.sessions import Session, SessionNotFound, SessionStore
from raylearn.serve.volumes import VolumeError, encode_mask, nifti_bytes, read_volume

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ model deployment


@serve.deployment(name=MODEL_NAME, max_ongoing_requests=32, ray_actor_options={"num_cpus": 1})
class SamMed3DModel:
    """Stateless SAM-Med3D replica: batched image encoder and prompt encoder + mask decoder."""

    def __init__(self) -> None:
        self.cfg: ModelDeploymentConfig | None = None
        self.model: SamMed3D | None = None  # built by reconfigure (user_config), else on first use
        self.batches = {"encode": 0, "decode": 0}  # forward passes; calls / batches = mean batch size

    def _ready(self) -> SamMed3D:
        if self.model is None:
            self.reconfigure({})
        return self.model

    def reconfigure(self, user_config: dict) -> None:
        cfg = parse_config(user_config, ModelDeploymentConfig, source=f"{MODEL_NAME}.user_config")
        if self.model is None or self.cfg is None or cfg.model != self.cfg.model:
            self.model = SamMed3D(cfg.model)
        size = cfg.batching.max_batch_size if cfg.batching.enabled else 1
        for fn in (self._encode_batch, self._decode_batch):
            fn.set_max_batch_size(size)
            fn.set_batch_wait_timeout_s(cfg.batching.batch_wait_timeout_s if cfg.batching.enabled else 0.0)
        self.cfg = cfg

    def info(self) -> dict:
        m, c = self._ready(), self.cfg
        return dict(model="SAM-Med3D", preset=c.model.preset, architecture=c.model.arch(), parameters=m.num_parameters,
                    checkpoint=c.model.checkpoint, checkpoint_sha256=m.checkpoint_sha256, input_size=m.image_size,
                    target_spacing_mm=c.model.target_spacing_mm, device=str(m.device),
                    batching={**c.batching.model_dump(), **{f"{k}_batches": v for k, v in self.batches.items()}},
                    encoder_calls=m.encoder_calls, decoder_calls=m.decoder_calls)

    async def encode(self, window: np.ndarray) -> np.ndarray:
        """``[S,S,S]`` z-scored window -> embedding ``[C,g,g,g]``."""
        self._ready()
        return await self._encode_batch(window)

    async def decode(self, embedding: np.ndarray, points: np.ndarray, labels: np.ndarray,
                     mask: np.ndarray | None) -> np.ndarray:
        """Embedding + clicks ``[N,3]``/``[N]`` + previous low-res logits -> low-res logits ``[L,L,L]``."""
        self._ready()
        return await self._decode_batch((embedding, points, labels, mask))

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _encode_batch(self, windows: list[np.ndarray]) -> list[np.ndarray]:
        self.batches["encode"] += 1
        return list(await asyncio.to_thread(self.model.encode, np.stack(windows)))

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _decode_batch(self, items: list[tuple]) -> list[np.ndarray]:
        self.batches["decode"] += 1
        emb = np.stack([it[0] for it in items])
        out = await asyncio.to_thread(self.model.decode, emb, [it[1] for it in items], [it[2] for it in items],
                                      [it[3] for it in items])
        return list(out)


# ------------------------------------------------------------------------------------------------- ingress

_bearer = HTTPBearer(auto_error=False, description="RAYLEARN_SERVE_TOKEN (only when auth is on)")
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422)}


async def _guard(request: Request,
                 credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None) -> None:
    """Every route: bearer auth on /v1/* (401) and the upload limit from Content-Length (413).

    A dependency, not a middleware, so it runs in the replica beside the handlers and sees reconfigure's values.
    """
    token = _rt.GUARD["token"]
    if token and "/v1/" in request.url.path:
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > _rt.GUARD["max_bytes"]:
        raise HTTPException(413, f"request body of {int(length)} bytes exceeds the limit of {_rt.GUARD['max_bytes']} "
                                 "bytes (max_upload_mb)")


fastapi_app = FastAPI(
    title="raylearn SAM-Med3D",
    version="0.1.0",
    description="Click-prompt 3D segmentation with SAM-Med3D and prediction-to-prompt pre-annotation. "
    "Volumes: NIfTI (.nii/.nii.gz) or MetaImage (.mha). Voxel clicks are array indices [d, h, w] (z, y, x); "
    "world clicks are physical [x, y, z] in mm. Masks come back as compressed JSON (default) or NIfTI "
    "(`format=nifti` or `Accept: application/gzip`).",
    dependencies=[Depends(_guard)],
)


Fmt = Annotated[Literal["json", "nifti"] | None, Query(description="mask format; default from Accept, else json")]


@serve.deployment(name=INGRESS_NAME, max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
@serve.ingress(fastapi_app)
class SamMed3DIngress:
    """The HTTP API. Holds sessions (so keep one replica, or route a session's requests to one replica)."""

    def __init__(self, model: DeploymentHandle, token: str | None = None) -> None:
        self.model = model
        self._build_token = token
        self.cfg: IngressConfig | None = None
        self.sessions = SessionStore()
        self.cache = EmbeddingCache()
        self.segmenter = None
        self.segmenter_sha256: str | None = None
        self.encoder_requests = 0
        self.decoder_requests = 0
        self.reconfigure({})

    def reconfigure(self, user_config: dict) -> None:
        cfg = parse_config(user_config, IngressConfig, source=f"{INGRESS_NAME}.user_config")
        _rt.GUARD["token"] = cfg.auth_token or self._build_token or os.environ.get(cfg.auth_token_env) or None
        _rt.GUARD["max_bytes"] = int(cfg.max_upload_mb * (1 << 20))
        self.sessions.ttl_s, self.sessions.max_sessions = cfg.session_ttl_s, cfg.max_sessions
        self.cache.capacity = cfg.embedding_cache_size
        if cfg.segmenter_checkpoint != (self.cfg.segmenter_checkpoint if self.cfg else None):
            self.segmenter = self.segmenter_sha256 = None
            if cfg.segmenter_checkpoint:
                from raylearn.models.unet import MonaiSegmenter

                self.segmenter = MonaiSegmenter.load(cfg.segmenter_checkpoint, device="cpu")
                self.segmenter_sha256 = file_sha256(cfg.segmenter_checkpoint)
        self.cfg = cfg

    # ------------------------------------------------------------------ helpers
    async def _model_info(self) -> dict:
        return await self.model.info.remote()

    async def _read(self, upload: UploadFile):
        data = await upload.read()
        if len(data) > _rt.GUARD["max_bytes"]:
            raise HTTPException(413, f"upload of {len(data)} bytes exceeds the limit of {_rt.GUARD['max_bytes']} bytes")
        try:
            return await asyncio.to_thread(read_volume, data, upload.filename)
        except VolumeError as err:
            raise HTTPException(err.status, str(err)) from None

    async def _prepare(self, upload: UploadFile, info: dict):
        image = await self._read(upload)
        return image, await asyncio.to_thread(prepare_volume, image, info["target_spacing_mm"])

    def _check_classes(self, clicks: list[Click]) -> None:
        if not clicks:
            raise HTTPException(422, "the click list is empty: give at least one click")
        for i, c in enumerate(clicks):
            if c.label not in self.cfg.classes:
                known = ", ".join(f"{k} ({v})" for k, v in sorted(self.cfg.classes.items()))
                raise HTTPException(422, f"click {i}: unknown class {c.label} (known classes: {known})")

    async def _embedding(self, volume, start, size: int) -> np.ndarray:
        key = f"{volume.sha256}:{tuple(start)}:{size}"
        emb = self.cache.get(key)
        if emb is None:
            window = await asyncio.to_thread(crop_window, volume.array, start, size)
            emb = await self.model.encode.remote(window)
            self.encoder_requests += 1
            self.cache.put(key, emb)
        return emb

    async def _decode(self, grouped: dict, embeddings: dict, prev: dict) -> dict[int, np.ndarray]:
        keys = list(grouped)
        outs = await asyncio.gather(*[
            self.model.decode.remote(embeddings[grouped[k][0]], grouped[k][1], grouped[k][2], prev.get(k))
            for k in keys])
        self.decoder_requests += len(keys)
        return dict(zip(keys, outs, strict=True))

    async def _segment(self, volume, clicks: list[Click], info: dict) -> tuple[np.ndarray, dict]:
        """One-shot: window(s) around the clicks, embeddings (cached), one decoder pass per class."""
        grouped = group_clicks(volume, clicks, info["input_size"])
        starts = sorted({g[0] for g in grouped.values()})
        embs = await asyncio.gather(*[self._embedding(volume, s, info["input_size"]) for s in starts])
        low = await self._decode(grouped, dict(zip(starts, embs, strict=True)), {})
        label = await asyncio.to_thread(self._to_label, volume, {k: grouped[k][0] for k in low}, low,
                                        info["input_size"])
        return label, low

    @staticmethod
    def _to_label(volume, starts: dict, low: dict, size: int) -> np.ndarray:
        probs = {k: window_probability_to_original(volume, starts[k], upsample_logits(v, size)) for k, v in low.items()}
        return combine_class_probabilities(probs) if probs else np.zeros(volume.shape, np.uint8)

    def _respond(self, request: Request, fmt: str | None, label: np.ndarray, image, **extra) -> Response:
        accept = request.headers.get("accept", "")
        if fmt == "nifti" or (fmt is None and any(t in accept for t in ("application/gzip", "application/x-nifti"))):
            headers = {"Content-Disposition": 'attachment; filename="mask.nii.gz"'}
            if extra.get("session_id"):
                headers["X-Session-Id"] = extra["session_id"]
            return Response(nifti_bytes(label, image), media_type="application/gzip", headers=headers)
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
        counts = np.bincount(label.ravel(), minlength=256)
        classes = {k: ClassStats(name=v, voxels=int(counts[k]), volume_ml=float(counts[k] * voxel_ml))
                   for k, v in self.cfg.classes.items()}
        body = MaskResponse(shape=label.shape, data=encode_mask(label), spacing=image.GetSpacing(),
                            origin=image.GetOrigin(), direction=image.GetDirection(), classes=classes, **extra)
        return JSONResponse(body.model_dump(mode="json"))

    def _session_info(self, s: Session) -> SessionInfo:
        return SessionInfo(session_id=s.session_id, shape=s.volume.shape, spacing=s.volume.original.GetSpacing(),
                           window_start=s.start, clicks=len(s.clicks), classes_clicked=sorted(s.low_res),
                           encoder_calls=s.encoder_calls, decoder_calls=s.decoder_calls,
                           expires_in_s=self.sessions.expires_in(s))

    def _session(self, session_id: str) -> Session:
        try:
            return self.sessions.get(session_id)
        except SessionNotFound:
            raise HTTPException(404, f"unknown or expired session {session_id!r}") from None

    # ------------------------------------------------------------------ routes
    @fastapi_app.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness: the ingress answers (no auth)."""
        return {"status": "ok"}

    @fastapi_app.get("/v1/info", response_model=InfoResponse, responses=_ERRORS)
    async def info(self) -> InfoResponse:
        """Model (architecture, checkpoint SHA-256, input size), classes, limits and call counters."""
        c = self.cfg
        return InfoResponse(model=ModelInfo(**await self._model_info()), classes=c.classes,
                            segmenter_checkpoint=c.segmenter_checkpoint,
                            segmenter_checkpoint_sha256=self.segmenter_sha256,
                            auth=bool(_rt.GUARD["token"]), max_upload_mb=c.max_upload_mb, session_ttl_s=c.session_ttl_s,
                            sessions=len(self.sessions), encoder_requests=self.encoder_requests,
                            decoder_requests=self.decoder_requests)

    @fastapi_app.post("/v1/sessions", status_code=201, response_model=SessionInfo, responses=_ERRORS)
    async def create_session(self, file: Annotated[UploadFile, File(description="NIfTI or MHA volume")],
                             roi_center: Annotated[str | None, Form(description="JSON [d, h, w] voxel centre of the "
                                                                   "model window; default: volume centre")] = None,
                             ) -> SessionInfo:
        """Upload a volume; its image embedding is computed once and reused by every click of the session."""
        info = await self._model_info()
        _, volume = await self._prepare(file, info)
        centre = None
        if roi_center:
            try:
                centre = volume.click_index(Click(label=0, voxel=tuple(json.loads(roi_center))), name="roi_center")
            except (ValueError, TypeError) as err:
                raise HTTPException(422, f"roi_center: {err}") from None
        start = window_start(volume, centre, info["input_size"])
        before = self.encoder_requests
        emb = await self._embedding(volume, start, info["input_size"])
        s = Session(volume=volume, start=start, size=info["input_size"], embedding=emb,
                    encoder_calls=self.encoder_requests - before)
        return self._session_info(self.sessions.add(s))

    @fastapi_app.get("/v1/sessions/{session_id}", response_model=SessionInfo, responses=_ERRORS)
    async def get_session(self, session_id: str) -> SessionInfo:
        """Session state: clicks so far, encoder/decoder calls, time to expiry."""
        return self._session_info(self._session(session_id))

    @fastapi_app.post("/v1/sessions/{session_id}/clicks", response_model=MaskResponse, responses=_ERRORS)
    async def add_clicks(self, session_id: str, body: ClicksRequest, request: Request, format: Fmt = None):
        """Add clicks and refine: decoder only (cached embedding + previous low-res mask per class)."""
        s = self._session(session_id)
        new = [c.to_click() for c in body.clicks]
        self._check_classes(new)
        try:
            for i, c in enumerate(new):
                s.volume.click_index(c, name=f"click {i}")
        except ClickError as err:
            raise HTTPException(422, str(err)) from None
        async with s.lock:
            reset = {c.label for c in new} if body.reset else set()
            clicks = [c for c in s.clicks if c.label not in reset] + new
            try:
                grouped = group_clicks(s.volume, clicks, s.size, s.start)
            except ClickError as err:
                raise HTTPException(422, str(err)) from None
            todo = {k: grouped[k] for k in {c.label for c in new}}
            prev = {k: v for k, v in s.low_res.items() if k not in reset}
            low = await self._decode(todo, {s.start: s.embedding}, prev)
            s.clicks, s.low_res = clicks, {**prev, **low}
            s.decoder_calls += len(low)
            starts = {k: s.start for k in s.low_res}
            label = await asyncio.to_thread(self._to_label, s.volume, starts, s.low_res, s.size)
        return self._respond(request, format, label, s.volume.original, session_id=s.session_id,
                             clicks=[ClickIn(**c.__dict__) for c in clicks])

    @fastapi_app.delete("/v1/sessions/{session_id}", status_code=204, responses=_ERRORS)
    async def delete_session(self, session_id: str) -> Response:
        """Drop a session and its embedding."""
        try:
            self.sessions.delete(session_id)
        except SessionNotFound:
            raise HTTPException(404, f"unknown or expired session {session_id!r}") from None
        return Response(status_code=204)

    @fastapi_app.post("/v1/segment", response_model=MaskResponse, responses=_ERRORS)
    async def segment(self, request: Request, file: Annotated[UploadFile, File(description="NIfTI or MHA volume")],
                      clicks: Annotated[str, Form(description='JSON list, e.g. [{"label": 1, "voxel": [18, 24, 17]}]')],
                      format: Fmt = None):
        """One shot: volume + clicks -> mask (the embedding is cached for a later request on the same volume)."""
        try:
            parsed = [c.to_click() for c in CLICK_LIST.validate_json(clicks)]
        except ValidationError as err:
            raise HTTPException(422, f"clicks: {err.errors()[0]['msg']} at {err.errors()[0]['loc']}") from None
        self._check_classes(parsed)
        info = await self._model_info()
        image, volume = await self._prepare(file, info)
        try:
            label, _ = await self._segment(volume, parsed, info)
        except ClickError as err:
            raise HTTPException(422, str(err)) from None
        return self._respond(request, format, label, image)

    @fastapi_app.post("/v1/preannotate", response_model=MaskResponse, responses=_ERRORS)
    async def preannotate(self, request: Request, file: Annotated[UploadFile, File(description="NIfTI or MHA volume")],
                          label: Annotated[UploadFile | None, File(description="ground truth (adds NSD)")] = None,
                          n_clicks: Annotated[int | None, Form(ge=1, le=50)] = None,
                          n_negative: Annotated[int | None, Form(ge=0, le=50)] = None,
                          seed: Annotated[int | None, Form()] = None, format: Fmt = None):
        """Segmenter prediction -> N simulated clicks per class (interior-weighted) -> SAM-Med3D mask per class."""
        from raylearn.prompts import clicks_from_prediction, compare_symdiff_pct
        from raylearn.serve.preannotate import segmenter_label_map, voxel_spacing

        if self.segmenter is None:
            raise HTTPException(503, "pre-annotation needs a segmenter: set segmenter_checkpoint in the "
                                     f"{INGRESS_NAME} user_config")
        pc = self.cfg.preannotate
        info = await self._model_info()
        image, volume = await self._prepare(file, info)
        gt = None
        if label is not None and label.filename:
            gt_img = await self._read(label)
            if gt_img.GetSize() != image.GetSize():
                raise HTTPException(422, f"label size {gt_img.GetSize()} != image size {image.GetSize()}")
            import SimpleITK as sitk

            gt = sitk.GetArrayFromImage(gt_img).astype(np.int64)
        t0 = time.perf_counter()
        try:
            seg = await asyncio.to_thread(segmenter_label_map, self.segmenter, image, self.cfg.segmenter_preprocess)
        except ValueError as err:
            raise HTTPException(422, str(err)) from None
        t1 = time.perf_counter()
        clicks = clicks_from_prediction(seg, n_clicks or pc.n_clicks, classes=self.cfg.classes,
                                        n_negative=pc.n_negative if n_negative is None else n_negative,
                                        spacing=voxel_spacing(image), seed=pc.seed if seed is None else seed)
        out = np.zeros(volume.shape, np.uint8)
        if clicks:
            try:
                out, _ = await self._segment(volume, clicks, info)
            except ClickError as err:  # e.g. a predicted structure wider than the model's field of view
                raise HTTPException(422, f"pre-annotation clicks: {err}") from None
        t2 = time.perf_counter()
        nsd = compare_symdiff_pct(out, seg, gt, self.cfg.classes) if gt is not None else None
        return self._respond(request, format, out, image, clicks=[ClickIn(**c.__dict__) for c in clicks], nsd=nsd,
                             timing_ms={"segmenter": 1e3 * (t1 - t0), "sam_med3d": 1e3 * (t2 - t1)})


# --------------------------------------------------------------------------------------------- building / running


def build_app(cfg: ServeConfig | None = None):
    """The bound Serve application (ingress -> model) with ``cfg``'s user_configs and deployment options.

    The env var ``ingress.auth_token_env`` is read here too (in the building process) and passed to the ingress,
    so the token reaches replicas that do not inherit this environment; ``ingress.auth_token`` travels in the
    user_config (so changing it is a lightweight reconfigure).
    """
    cfg = cfg or ServeConfig()
    token = os.environ.get(cfg.ingress.auth_token_env) or None
    model = SamMed3DModel.options(user_config=cfg.model.model_dump(mode="json"), **cfg.model_options.as_kwargs())
    ingress = SamMed3DIngress.options(user_config=cfg.ingress.model_dump(mode="json"),
                                      **cfg.ingress_options.as_kwargs())
    return ingress.bind(model.bind(), token)


def _module_config() -> ServeConfig:
    path = os.environ.get("RAYLEARN_SERVE_CONFIG")
    return load_serve_config(path) if path else ServeConfig()


def run_server(config_path: str | None = None, host: str | None = None, port: int | None = None,
               blocking: bool = True) -> str:
    """Start Ray (if needed), Serve's HTTP proxy on ``host:port`` and the app; returns the base URL.

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
    host, port = host or cfg.host, cfg.port if port is None else port
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(cfg), name=cfg.name, route_prefix=cfg.route_prefix)
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


try:
    #: module-level application for ``serve run deployments/serve.yaml`` (import_path raylearn.serve.app:app)
    app = build_app(_module_config())
except ConfigError as _err:  # pragma: no cover - surfaced when Serve imports the module
    raise ConfigError(f"RAYLEARN_SERVE_CONFIG: {_err}") from None
