"""The HTTP ingress deployment: volumes, click sessions, the embedding cache, and calls to the model deployment.

``SamMed3DIngress`` builds its own FastAPI app per replica (:func:`raylearn.serve.api.build_api`, through Serve's
``__serve_build_asgi_app__``), so the request guard (token, limits) is state of this instance, updated by
``reconfigure``. Volumes are read by :func:`raylearn.serve.volumes.read_volume` in a small thread pool of its own
under ``read_timeout_s``; preprocessing follows :mod:`raylearn.models.sam_med3d`.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import FastAPI, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from raylearn.config import ConfigError, parse_config
from raylearn.models.sam_med3d import (
    Click,
    EmbeddingCache,
    Volume,
    combine_class_probabilities,
    crop_window,
    file_sha256,
    group_clicks,
    prepare_volume,
    upsample_logits,
    window_probability_to_original,
)
from raylearn.serve.config import INGRESS_NAME, IngressConfig
from raylearn.serve.guard import Guard
from raylearn.serve.schemas import ClassStats, MaskResponse, SessionInfo
from raylearn.serve.sessions import Session, SessionNotFound, SessionStore, short_id
from raylearn.serve.volumes import VolumeError, VolumeLimits, encode_mask, nifti_bytes, read_volume

log = logging.getLogger(__name__)


@serve.deployment(name=INGRESS_NAME, max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
@serve.ingress()
class SamMed3DIngress:
    """The HTTP API. Holds sessions (so keep one replica, or route a session's requests to one replica).

    Args:
        model: handle of the ``SamMed3DModel`` deployment.
        token: a bearer token given when the app was built (``build_app(cfg, token=...)``); the user_config's
            ``auth_token`` wins over it, the replica's env var ``auth_token_env`` comes after it.
    """

    def __init__(self, model: DeploymentHandle, token: str | None = None) -> None:
        self.model = model
        self._build_token = token
        self.guard = Guard()
        self.cfg: IngressConfig | None = None
        self.sessions = SessionStore()
        self.cache = EmbeddingCache()
        self.segmenter_sha256: str | None = None
        self.encoder_requests = 0
        self.decoder_requests = 0
        self._readers: ThreadPoolExecutor | None = None
        self.annotation = None  # raylearn.serve.annotation.AnnotationService when user_config.annotation is set
        self.reconfigure({}, announce=False)  # defaults; Serve then calls reconfigure with the user_config

    def __serve_build_asgi_app__(self) -> FastAPI:
        from raylearn.serve.api import build_api

        return build_api(self)

    def reconfigure(self, user_config: dict, announce: bool = True) -> None:
        """Apply a ``user_config`` (validated strictly); raises :class:`ConfigError` naming the key.

        ``announce``: log the warning when auth is off (not for the constructor's defaults).
        """
        source = f"{INGRESS_NAME}.user_config"
        cfg = parse_config(user_config, IngressConfig, source=source)
        from raylearn.serve.annotation import AnnotationService, users_from_config

        try:
            self.guard.users = users_from_config(cfg.annotation)
            self.guard.configure(cfg.auth_token, self._build_token, cfg.auth_token_env, cfg.require_auth,
                                 cfg.max_upload_mb, announce=announce)
        except ValueError as err:
            raise ConfigError(f"{source}: {err}") from None
        if cfg.annotation != (self.cfg.annotation if self.cfg else None):
            self.annotation = AnnotationService(cfg.annotation) if cfg.annotation else None
        self.sessions.ttl_s, self.sessions.max_sessions = cfg.session_ttl_s, cfg.max_sessions
        self.cache.capacity = cfg.embedding_cache_size
        if self._readers is None or cfg.read_workers != self.cfg.read_workers:
            if self._readers is not None:
                self._readers.shutdown(wait=False)
            self._readers = ThreadPoolExecutor(cfg.read_workers, thread_name_prefix="raylearn-read")
        if cfg.segmenter_checkpoint != (self.cfg.segmenter_checkpoint if self.cfg else None):
            self.segmenter_sha256 = None
            if cfg.segmenter_checkpoint:  # loaded and run by the model deployment (on its device)
                import os

                if not os.path.isfile(cfg.segmenter_checkpoint):
                    raise ConfigError(f"{source}.segmenter_checkpoint: {cfg.segmenter_checkpoint}: file not found")
                self.segmenter_sha256 = file_sha256(cfg.segmenter_checkpoint)
        self.cfg = cfg

    # ------------------------------------------------------------------ volumes
    async def model_info(self) -> dict:
        return await self.model.info.remote()

    async def _bounded(self, what: str, fn, *args):
        """Run ``fn(*args)`` in the reader pool under ``read_timeout_s`` (503 when it takes longer)."""
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(self._readers, fn, *args), self.cfg.read_timeout_s)
        except TimeoutError:
            raise HTTPException(503, f"{what} took longer than read_timeout_s = {self.cfg.read_timeout_s:g} s "
                                     "(the server is busy); try again later", headers={"Retry-After": "5"}) from None

    async def read(self, upload: UploadFile, field: str, info: dict):
        """An uploaded volume as a ``sitk.Image`` through the safe reader (4xx on any problem)."""
        data = await upload.read()
        limits = VolumeLimits(self.cfg.max_voxels, self.cfg.max_resampled_voxels, info["target_spacing_mm"])
        try:
            return await self._bounded(f"{field}: reading the volume", read_volume, data, field, limits)
        except VolumeError as err:
            raise HTTPException(err.status, str(err)) from None

    async def prepare(self, upload: UploadFile, info: dict):
        """Read and resample: ``(sitk.Image, Volume)``."""
        image = await self.read(upload, "file", info)
        return image, await self._bounded("file: resampling the volume", prepare_volume, image,
                                          info["target_spacing_mm"])

    # ------------------------------------------------------------------ clicks
    def check_clicks(self, clicks: list[Click]) -> None:
        """422 for an empty list, too many clicks, or an unknown class."""
        if not clicks:
            raise HTTPException(422, "the click list is empty: give at least one click")
        if len(clicks) > self.cfg.max_clicks_per_request:
            raise HTTPException(422, f"{len(clicks)} clicks in one request exceed max_clicks_per_request = "
                                     f"{self.cfg.max_clicks_per_request}")
        for i, c in enumerate(clicks):
            if c.label not in self.cfg.classes:
                known = ", ".join(f"{k} ({v})" for k, v in sorted(self.cfg.classes.items()))
                raise HTTPException(422, f"click {i}: unknown class {c.label} (known classes: {known})")

    async def embedding(self, volume: Volume, start, size: int, digest: str | None = None) -> np.ndarray:
        """The window's embedding, cached per image encoder (``digest``: new encoder weights, new embedding)."""
        key = f"{volume.sha256}:{tuple(start)}:{size}:{digest}"
        emb = self.cache.get(key)
        if emb is None:
            window = await asyncio.to_thread(crop_window, volume.array, start, size)
            emb = await self.model.encode.remote(window)
            self.encoder_requests += 1
            self.cache.put(key, emb)
        return emb

    async def decode(self, grouped: dict, embeddings: dict, prev: dict) -> dict[int, np.ndarray]:
        keys = list(grouped)
        outs = await asyncio.gather(*[
            self.model.decode.remote(embeddings[grouped[k][0]], grouped[k][1], grouped[k][2], prev.get(k))
            for k in keys])
        self.decoder_requests += len(keys)
        return dict(zip(keys, outs, strict=True))

    async def segment(self, volume: Volume, clicks: list[Click], info: dict) -> tuple[np.ndarray, dict]:
        """One-shot: window(s) around the clicks, embeddings (cached), one decoder pass per class."""
        grouped = group_clicks(volume, clicks, info["input_size"])
        starts = sorted({g[0] for g in grouped.values()})
        embs = await asyncio.gather(*[self.embedding(volume, s, info["input_size"], info.get("encoder_digest"))
                                      for s in starts])
        low = await self.decode(grouped, dict(zip(starts, embs, strict=True)), {})
        label = await asyncio.to_thread(self.to_label, volume, {k: grouped[k][0] for k in low}, low,
                                        info["input_size"])
        return label, low

    @staticmethod
    def to_label(volume: Volume, starts: dict, low: dict, size: int) -> np.ndarray:
        probs = {k: window_probability_to_original(volume, starts[k], upsample_logits(v, size)) for k, v in low.items()}
        return combine_class_probabilities(probs) if probs else np.zeros(volume.shape, np.uint8)

    # ------------------------------------------------------------------ responses and sessions
    def respond(self, request: Request, fmt: str | None, label: np.ndarray, image, **extra) -> Response:
        """The mask as compressed JSON (default) or ``.nii.gz`` (``format=nifti`` / ``Accept: application/gzip``)."""
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

    def session_info(self, s: Session) -> SessionInfo:
        return SessionInfo(session_id=s.session_id, shape=s.volume.shape, spacing=s.volume.original.GetSpacing(),
                           window_start=s.start, clicks=len(s.clicks), classes_clicked=sorted(s.low_res),
                           encoder_calls=s.encoder_calls, decoder_calls=s.decoder_calls,
                           expires_in_s=self.sessions.expires_in(s))

    def session(self, session_id: str) -> Session:
        """The live session, else 404 (the id in the message is truncated)."""
        try:
            return self.sessions.get(session_id)
        except SessionNotFound:
            raise HTTPException(404, f"unknown or expired session {short_id(session_id)}") from None
