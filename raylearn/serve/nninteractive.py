"""nnInteractive's HTTP protocols on the ingress, so nnInteractive's clients drive raylearn's SAM-Med3D.

Two protocols, each under its own prefix (give the prefixed URL as the client's server URL):

- ``/nninteractive``: the protocol of ``nninteractive-server`` as spoken by ``nninteractive-client``
  (``nnInteractiveRemoteInferenceSession``), which the current nnInteractive 3D Slicer extension uses: a lease per
  client (``/claim``, ``X-Lease-Token``), image upload (``/set_image``, blosc2-packed ``NNIA`` arrays with an
  ``X-Meta`` JSON header), target buffer, point / box / scribble / lasso / initial-segmentation interactions,
  ``/predict``, ``/undo``, ``/reset_interactions``; results come back as the changed box of the target.
- ``/nninteractive-slicer``: the protocol of ``nninteractive-slicer-server`` (the Slicer extension's own server
  before the remote client): ``/upload_image`` (``.npy``), ``/upload_segment`` (gzipped ``.npy``), ``/add_point_
  interaction``, ``/add_bbox_interaction``, ``/add_lasso_interaction``, ``/add_scribble_interaction``; results are
  the whole mask packed to bits, gzip-compressed. One image per replica, as that server has.

How interactions become SAM-Med3D prompts: :mod:`raylearn.serve.interactive`. The ``NNIA`` wire format is read and
written with ``nninteractive-client``'s own serialization (``pip install nninteractive-client``: numpy, httpx,
blosc2). The ingress's bearer token applies (``Authorization: Bearer``, which both clients send).
"""

from __future__ import annotations

import json
import secrets
import time
from typing import TYPE_CHECKING, Annotated

import numpy as np
from fastapi import APIRouter, FastAPI, File, Form, Header, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, StrictBool

from raylearn.serve.interactive import (
    InteractiveState,
    changed_bbox,
    gunzip,
    gzip_bits,
    load_npy,
    nnia_shape,
    window_sizes,
)

if TYPE_CHECKING:
    from raylearn.serve.ingress import SamMed3DIngress

PREFIX = "/nninteractive"
SLICER_PREFIX = "/nninteractive-slicer"
LEASE_HEADER = "X-Lease-Token"
META_HEADER = "X-Meta"
OCTET = "application/octet-stream"


def _codec():
    try:
        from nnInteractive.inference.remote.serialization import pack_array, unpack_array
    except ImportError:  # pragma: no cover - depends on the environment
        raise HTTPException(501, "the nnInteractive protocol needs nninteractive-client on the serve replicas: "
                                 "pip install nninteractive-client") from None
    return pack_array, unpack_array


class Leases:
    """Lease token -> :class:`InteractiveState`, idle expiry (``session_ttl_s``) and a cap (``max_sessions``)."""

    def __init__(self) -> None:
        self.states: dict[str, InteractiveState] = {}

    def purge(self, ttl_s: float) -> None:
        now = time.monotonic()
        for t in [t for t, s in self.states.items() if now - s.last_active > ttl_s and not s.lock.locked()]:
            del self.states[t]

    def claim(self, ttl_s: float, cap: int) -> str:
        self.purge(ttl_s)
        if len(self.states) >= cap:
            raise HTTPException(503, f"server is at capacity ({cap} sessions)", headers={"Retry-After": "10"})
        token = secrets.token_urlsafe(24)
        self.states[token] = InteractiveState()
        return token

    def get(self, token: str | None, ttl_s: float, touch: bool = True) -> InteractiveState:
        self.purge(ttl_s)
        if not token:
            raise HTTPException(410, "lease token missing: POST /claim first")
        st = self.states.get(token)
        if st is None:
            raise HTTPException(410, "lease expired or unknown")
        if touch:
            st.last_active = time.monotonic()
        return st


class BBoxIn(BaseModel):
    bbox_coords: list[list[float]]
    include_interaction: StrictBool
    run_prediction: StrictBool = True
    override_capability_checks: StrictBool = False


class PointIn(BaseModel):
    coordinates: list[float]
    include_interaction: StrictBool
    run_prediction: StrictBool = True
    override_capability_checks: StrictBool = False


class SlicerPoint(BaseModel):
    voxel_coord: list[int]
    positive_click: StrictBool


class SlicerBox(BaseModel):
    outer_point_one: list[int]
    outer_point_two: list[int]
    positive_click: StrictBool


class TargetIn(BaseModel):
    shape: list[int]
    dtype: str


def _meta(request: Request) -> dict:
    raw = request.headers.get(META_HEADER)
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise HTTPException(400, f"Bad {META_HEADER}: {err}") from None
    if not isinstance(meta, dict):
        raise HTTPException(400, f"Bad {META_HEADER}: expected a JSON object")
    return meta


def add_nninteractive_routes(app: FastAPI, svc: SamMed3DIngress) -> None:
    """Mount both nnInteractive protocols on ``app`` (state held per ingress replica, in this closure)."""
    leases = Leases()
    slicer_state = InteractiveState()
    from raylearn.serve.api import ERRORS  # every 4xx is {"detail": ...} (the one error shape)

    r = APIRouter(prefix=PREFIX, tags=["nnInteractive protocol (nninteractive-client)"], responses=ERRORS)

    def lease(token: str | None, touch: bool = True) -> InteractiveState:
        return leases.get(token, svc.cfg.session_ttl_s, touch)

    async def array_body(request: Request, what: str, max_elems: int) -> np.ndarray:
        _, unpack = _codec()
        body = await request.body()
        shape = nnia_shape(body, what)
        if int(np.prod(shape, dtype=np.float64)) > max_elems:
            raise HTTPException(413, f"{what}: {tuple(shape)} elements exceed max_voxels = {max_elems:,}")
        try:
            return await run_in_threadpool(unpack, body)
        except ValueError as err:
            raise HTTPException(400, f"{what}: {err}") from None

    async def result(st: InteractiveState, old: np.ndarray | None, ran: bool) -> Response:
        """The changed box of the target buffer (``X-Meta``: ran_prediction, bbox, dtype, shape)."""
        bbox = changed_bbox(old, st.mask) if ran and st.mask is not None else None
        if bbox is None:
            return Response(b"", media_type=OCTET, headers={META_HEADER: json.dumps({"ran_prediction": ran,
                                                                                    "bbox": None})})
        pack, _ = _codec()
        sub = np.ascontiguousarray(st.mask[tuple(slice(lo, hi) for lo, hi in bbox)].astype(st.target_dtype))
        import blosc2

        body = await run_in_threadpool(pack, sub, filters=[blosc2.Filter.NOFILTER])
        meta = {"ran_prediction": True, "bbox": bbox, "dtype": str(sub.dtype), "shape": list(sub.shape)}
        return Response(body, media_type=OCTET, headers={META_HEADER: json.dumps(meta, separators=(",", ":"))})

    async def interact(st: InteractiveState, run_prediction: bool, add) -> Response:
        async with st.lock:
            old = None if st.mask is None else st.mask.copy()
            add()
            if not run_prediction:
                return await result(st, old, False)
            await st.predict(svc)
            return await result(st, old, True)

    @r.get("/healthz")
    async def healthz() -> dict:
        return {"ok": True}

    @r.get("/capabilities")
    async def capabilities() -> dict:
        info = await svc.model_info()
        return {"supported_interactions": {"points": True, "bbox2d": True, "bbox3d": True, "scribble": True,
                                           "lasso": True},
                "channel_mapping": {"prev_seg": 0, "bbox2d": [1, 2], "bbox3d": [1, 2], "lasso": [1, 2],
                                    "points": [3, 4], "scribble": [5, 6]},
                "num_interaction_channels": 7, "supports_initial_label": True,
                "supports_zero_shot_label_refinement": True, "preferred_scribble_thickness": [2, 2, 2],
                "interaction_decay": None, "patch_size": [info["input_size"]] * 3, "do_autozoom": False,
                "inference_session_version": "raylearn-sam-med3d", "supports_undo": True,
                "license": "SAM-Med3D (Apache-2.0) served by raylearn", "model": info.get("model", "SAM-Med3D")}

    @r.post("/claim")
    async def claim() -> dict:
        token = leases.claim(svc.cfg.session_ttl_s, svc.cfg.max_sessions)
        return {"lease_token": token, "idle_timeout_seconds": svc.cfg.session_ttl_s, "liveness_timeout_seconds": 0.0,
                "max_sessions": svc.cfg.max_sessions}

    @r.post("/release")
    async def release(x_lease_token: Annotated[str | None, Header(alias=LEASE_HEADER)] = None) -> dict:
        leases.states.pop(x_lease_token or "", None)
        return {"released": True}

    @r.post("/heartbeat")
    async def heartbeat(x_lease_token: Annotated[str | None, Header(alias=LEASE_HEADER)] = None) -> dict:
        st = lease(x_lease_token, touch=False)
        return {"remaining_seconds": max(0.0, svc.cfg.session_ttl_s - (time.monotonic() - st.last_active))}

    @r.get("/lease_status")
    async def lease_status(x_lease_token: Annotated[str | None, Header(alias=LEASE_HEADER)] = None) -> dict:
        st = lease(x_lease_token, touch=False)
        return {"remaining_seconds": max(0.0, svc.cfg.session_ttl_s - (time.monotonic() - st.last_active)),
                "idle_timeout_seconds": svc.cfg.session_ttl_s}

    @r.post("/set_image")
    async def set_image(request: Request, x_lease_token: Annotated[str | None, Header(alias=LEASE_HEADER)] = None):
        st = lease(x_lease_token)
        props = _meta(request).get("image_properties") or {}
        image = await array_body(request, "image", svc.cfg.max_voxels)
        async with st.lock:
            await st.set_image(svc, image, props.get("spacing"))
        return {"original_image_shape": list(image.shape)}

    @r.post("/set_target_buffer")
    async def set_target_buffer(body: TargetIn,
                                x_lease_token: Annotated[str | None, Header(alias=LEASE_HEADER)] = None) -> dict:
        st = lease(x_lease_token)
        try:
            dtype = np.dtype(body.dtype)
        except TypeError:
            raise HTTPException(400, f"invalid dtype: {body.dtype!r}") from None
        if dtype.kind not in "biu":
            raise HTTPException(400, f"unsupported dtype {dtype}: target buffer must be bool or an integer type")
        async with st.lock:
            st.set_target(body.shape, dtype)
        return {}

    @r.post("/set_do_autozoom")
    async def set_do_autozoom(body: dict, x_lease_token: Annotated[str | None, Header(alias=LEASE_HEADER)] = None):
        # SAM-Med3D's field of view is its fixed 128^3 window at 1.5 mm: the flag is kept, it changes nothing
        lease(x_lease_token).do_autozoom = bool(body.get("do_autozoom", False))
        return {}

    @r.post("/reset_interactions")
    async def reset_interactions(x_lease_token: Annotated[str | None, Header(alias=LEASE_HEADER)] = None) -> dict:
        st = lease(x_lease_token)
        async with st.lock:
            st.reset()
        return {}

    @r.post("/undo")
    async def undo(x_lease_token: Annotated[str | None, Header(alias=LEASE_HEADER)] = None) -> Response:
        st = lease(x_lease_token)
        async with st.lock:
            old = None if st.mask is None else st.mask.copy()
            return await result(st, old, st.undo())

    @r.post("/predict")
    async def predict(x_lease_token: Annotated[str | None, Header(alias=LEASE_HEADER)] = None) -> Response:
        st = lease(x_lease_token)
        async with st.lock:
            if not st.pending:
                return await result(st, st.mask, False)
            old = None if st.mask is None else st.mask.copy()
            await st.predict(svc)
            return await result(st, old, True)

    @r.post("/add_point_interaction")
    async def add_point(body: PointIn, x_lease_token: Annotated[str | None, Header(alias=LEASE_HEADER)] = None):
        st = lease(x_lease_token)
        if len(body.coordinates) != 3:
            raise HTTPException(400, f"coordinates: expected 3 numbers, got {len(body.coordinates)}")
        return await interact(st, body.run_prediction, lambda: st.add_click(body.coordinates,
                                                                            body.include_interaction))

    @r.post("/add_bbox_interaction")
    async def add_bbox(body: BBoxIn, x_lease_token: Annotated[str | None, Header(alias=LEASE_HEADER)] = None):
        st = lease(x_lease_token)
        return await interact(st, body.run_prediction, lambda: st.add_box(body.bbox_coords, body.include_interaction))

    async def mask_interaction(request: Request, token: str | None, kind: str) -> Response:
        st = lease(token)
        meta = _meta(request)
        if not isinstance(meta.get("include_interaction"), bool):
            raise HTTPException(400, f"{META_HEADER}: include_interaction (true/false) is required")
        mask = await array_body(request, kind, svc.cfg.max_voxels)
        return await interact(st, bool(meta.get("run_prediction", True)),
                              lambda: st.add_mask_click(mask, meta["include_interaction"], kind))

    @r.post("/add_scribble_interaction")
    async def add_scribble(request: Request, x_lease_token: Annotated[str | None, Header(alias=LEASE_HEADER)] = None):
        return await mask_interaction(request, x_lease_token, "scribble")

    @r.post("/add_lasso_interaction")
    async def add_lasso(request: Request, x_lease_token: Annotated[str | None, Header(alias=LEASE_HEADER)] = None):
        return await mask_interaction(request, x_lease_token, "lasso")

    @r.post("/add_initial_seg_interaction")
    async def add_initial_seg(request: Request,
                              x_lease_token: Annotated[str | None, Header(alias=LEASE_HEADER)] = None) -> Response:
        st = lease(x_lease_token)
        seg = await array_body(request, "initial segmentation", svc.cfg.max_voxels)
        size, low = window_sizes(await svc.model_info())
        async with st.lock:
            st.set_segment(seg, size, low)  # SAM-Med3D needs a click to refine: the segmentation is the mask prompt
            return await result(st, None, False)

    app.include_router(r)
    _add_slicer_routes(app, svc, slicer_state)


def _add_slicer_routes(app: FastAPI, svc: SamMed3DIngress, st: InteractiveState) -> None:
    """``nninteractive-slicer-server``'s routes: one image per replica, whole-mask bit-packed gzip results."""
    from raylearn.serve.api import ERRORS

    s = APIRouter(prefix=SLICER_PREFIX, tags=["nnInteractive protocol (nninteractive-slicer-server)"],
                  responses=ERRORS)
    no_image = {"status": "error", "message": "No image uploaded"}  # the extension re-uploads on this message

    def bits(mask: np.ndarray) -> Response:
        return Response(gzip_bits(mask), media_type=OCTET, headers={"Content-Encoding": "gzip"})

    async def npy_upload(upload: UploadFile, what: str, gz: bool) -> np.ndarray:
        data = await upload.read()
        limit = svc.cfg.max_voxels * 8 + 4096
        if gz:
            data = await run_in_threadpool(gunzip, data, limit, what)
        return await run_in_threadpool(load_npy, data, svc.cfg.max_voxels, what)

    async def run(add) -> Response:
        async with st.lock:
            add()
            await st.predict(svc)
            return bits(st.mask)

    @s.get("")
    @s.get("/")
    async def root() -> dict:
        return {"status": "ok", "server": "raylearn SAM-Med3D, nninteractive-slicer-server protocol"}

    @s.post("/upload_image")
    async def upload_image(file: Annotated[UploadFile, File()]) -> dict:
        image = await npy_upload(file, "image", gz=False)
        async with st.lock:
            await st.set_image(svc, image)  # the protocol sends no spacing: 1 mm assumed
        return {"status": "ok"}

    @s.post("/upload_segment")
    async def upload_segment(file: Annotated[UploadFile, File()]):
        if st.volume is None:
            return JSONResponse(no_image)
        seg = await npy_upload(file, "segment", gz=True)
        size, low = window_sizes(await svc.model_info())
        async with st.lock:
            st.set_segment(seg, size, low)
        return {"status": "ok"}

    @s.post("/add_point_interaction")
    async def point(body: SlicerPoint):
        if st.volume is None:
            return JSONResponse(no_image)
        if len(body.voxel_coord) != 3:
            raise HTTPException(400, f"voxel_coord: expected 3 integers, got {len(body.voxel_coord)}")
        return await run(lambda: st.add_click(body.voxel_coord, body.positive_click))

    @s.post("/add_bbox_interaction")
    async def bbox(body: SlicerBox):
        if st.volume is None:
            return JSONResponse(no_image)
        a, b = np.asarray(body.outer_point_one), np.asarray(body.outer_point_two)
        if a.shape != (3,) or b.shape != (3,):
            raise HTTPException(400, "outer_point_one/outer_point_two: expected 3 integers each")
        box = np.stack([np.minimum(a, b), np.maximum(a, b) + 1], axis=1).tolist()  # inclusive corners -> half-open
        return await run(lambda: st.add_box(box, body.positive_click))

    async def mask_prompt(file: UploadFile, positive_click: str, kind: str):
        if st.volume is None:
            return JSONResponse(no_image)
        mask = await npy_upload(file, kind, gz=True)
        positive = positive_click.strip().lower() in ("true", "1", "yes")
        return await run(lambda: st.add_mask_click(mask, positive, kind))

    @s.post("/add_lasso_interaction")
    async def lasso(file: Annotated[UploadFile, File()], positive_click: Annotated[str, Form()]):
        return await mask_prompt(file, positive_click, "lasso")

    @s.post("/add_scribble_interaction")
    async def scribble(file: Annotated[UploadFile, File()], positive_click: Annotated[str, Form()]):
        return await mask_prompt(file, positive_click, "scribble")

    app.include_router(s)
