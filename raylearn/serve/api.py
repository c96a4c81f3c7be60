"""The HTTP routes of the SAM-Med3D API, built per ingress replica around a :class:`SamMed3DIngress` instance.

Every error body is ``{"detail": str}`` (HTTP errors, 422 validation errors and unexpected 500s alike); the
:class:`raylearn.serve.guard.GuardMiddleware` answers 401 / 413 before a body is read.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
from fastapi import APIRouter, FastAPI, File, Form, HTTPException, Query, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from raylearn.models.sam_med3d import Click, ClickError, group_clicks, window_start
from raylearn.serve.config import INGRESS_NAME
from raylearn.serve.guard import GuardMiddleware
from raylearn.serve.schemas import (
    CLICK_LIST,
    ROI_CENTER,
    ClickIn,
    ClicksRequest,
    ErrorResponse,
    InfoResponse,
    MaskResponse,
    ModelInfo,
    SessionInfo,
)
from raylearn.serve.sessions import Session, SessionNotFound, short_id

if TYPE_CHECKING:
    from raylearn.serve.ingress import SamMed3DIngress

log = logging.getLogger(__name__)

DESCRIPTION = (
    "Click-prompt 3D segmentation with SAM-Med3D and prediction-to-prompt pre-annotation. Volumes: NIfTI "
    "(.nii/.nii.gz), MetaImage (.mha, data inline) or NRRD (data inline). Voxel clicks are array indices [d, h, w] "
    "(z, y, x); world clicks are physical [x, y, z] in mm. Masks come back as compressed JSON (default) or NIfTI "
    "(`format=nifti` or `Accept: application/gzip`). Every error body is {\"detail\": \"...\"}.")
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 503)}
Fmt = Annotated[Literal["json", "nifti"] | None, Query(description="mask format; default from Accept, else json")]
VolumeFile = Annotated[UploadFile, File(description="NIfTI, MetaImage or NRRD volume")]


def validation_detail(errors: list[dict]) -> str:
    """pydantic errors as one line: ``clicks.0.label: Input should be a valid integer; ...`` (no input echoed)."""
    parts = []
    for e in errors[:3]:
        if e.get("type") == "json_invalid":
            parts.append("the request body is not valid JSON")
            continue
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "request"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail)}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_detail(list(exc.errors()))}, 422)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal server error (details in the ingress replica's log)"}, 500)


def build_api(svc: SamMed3DIngress) -> FastAPI:
    """The FastAPI app of one ingress replica: routes bound to ``svc``, its guard in front."""
    app = FastAPI(title="raylearn SAM-Med3D", version="0.2.0", description=DESCRIPTION)
    _error_handlers(app)
    app.add_middleware(GuardMiddleware, guard=svc.guard)
    # documents the bearer scheme for /docs; the GuardMiddleware does the checking
    v1 = APIRouter(prefix="/v1", dependencies=[Security(HTTPBearer(auto_error=False))], responses=ERRORS)

    @app.get("/healthz")
    async def healthz() -> dict:
        """Liveness: the ingress answers (no auth)."""
        return {"status": "ok"}

    @v1.get("/info", response_model=InfoResponse)
    async def info() -> InfoResponse:
        """Model (architecture, checkpoint SHA-256, input size), classes, auth, limits, warnings, call counters."""
        c = svc.cfg
        limits = {k: getattr(c, k) for k in ("max_upload_mb", "max_voxels", "max_resampled_voxels", "read_timeout_s",
                                             "max_clicks_per_request", "max_clicks_per_session", "max_sessions")}
        return InfoResponse(model=ModelInfo(**await svc.model_info()), classes=c.classes,
                            segmenter_checkpoint=c.segmenter_checkpoint,
                            segmenter_checkpoint_sha256=svc.segmenter_sha256, auth=svc.guard.enabled,
                            warnings=list(svc.guard.warnings), limits=limits, max_upload_mb=c.max_upload_mb,
                            session_ttl_s=c.session_ttl_s, sessions=len(svc.sessions),
                            encoder_requests=svc.encoder_requests, decoder_requests=svc.decoder_requests)

    @v1.post("/sessions", status_code=201, response_model=SessionInfo)
    async def create_session(file: VolumeFile,
                             roi_center: Annotated[str | None, Form(description="JSON [d, h, w] voxel centre of the "
                                                                   "model window; default: volume centre")] = None,
                             ) -> SessionInfo:
        """Upload a volume; its image embedding is computed once and reused by every click of the session."""
        centre = None
        if roi_center:
            try:
                centre = ROI_CENTER.validate_json(roi_center)
            except ValidationError:
                raise HTTPException(422, "roi_center: expected a JSON list of 3 finite numbers [d, h, w]") from None
        info = await svc.model_info()
        _, volume = await svc.prepare(file, info)
        if centre is not None:
            try:
                centre = volume.click_index(Click(label=0, voxel=centre), name="roi_center")
            except ClickError as err:
                raise HTTPException(422, str(err)) from None
        start = window_start(volume, centre, info["input_size"])
        before = svc.encoder_requests
        emb = await svc.embedding(volume, start, info["input_size"], info.get("encoder_digest"))
        s = Session(volume=volume, start=start, size=info["input_size"], embedding=emb,
                    encoder_digest=info.get("encoder_digest"), encoder_calls=svc.encoder_requests - before)
        return svc.session_info(svc.sessions.add(s))

    @v1.get("/sessions/{session_id}", response_model=SessionInfo)
    async def get_session(session_id: str) -> SessionInfo:
        """Session state: clicks so far, encoder/decoder calls, time to expiry."""
        return svc.session_info(svc.session(session_id))

    @v1.post("/sessions/{session_id}/clicks", response_model=MaskResponse)
    async def add_clicks(session_id: str, body: ClicksRequest, request: Request, format: Fmt = None):
        """Add clicks and refine: decoder only (cached embedding + previous low-res mask per class).

        Clicks and DELETE of one session are serialised: a click queued behind a DELETE answers 404.
        """
        s = svc.session(session_id)
        new = [c.to_click() for c in body.clicks]
        svc.check_clicks(new)
        try:
            for i, c in enumerate(new):
                s.volume.click_index(c, name=f"click {i}")
        except ClickError as err:
            raise HTTPException(422, str(err)) from None
        async with s.lock:
            if s.closed:
                raise HTTPException(404, f"session {short_id(session_id)} was deleted")
            reset = {c.label for c in new} if body.reset else set()
            clicks = [c for c in s.clicks if c.label not in reset] + new
            cap = svc.cfg.max_clicks_per_session
            if len(clicks) > cap:
                raise HTTPException(422, f"the session would hold {len(clicks)} clicks, above max_clicks_per_session "
                                         f"= {cap}; send reset=true for a class or start a new session")
            try:
                grouped = group_clicks(s.volume, clicks, s.size, s.start)
            except ClickError as err:
                raise HTTPException(422, str(err)) from None
            await _refresh_embedding(s)
            todo = {k: grouped[k] for k in {c.label for c in new}}
            prev = {k: v for k, v in s.low_res.items() if k not in reset}
            low = await svc.decode(todo, {s.start: s.embedding}, prev)
            s.clicks, s.low_res = clicks, {**prev, **low}
            s.decoder_calls += len(low)
            starts = {k: s.start for k in s.low_res}
            label = await asyncio.to_thread(svc.to_label, s.volume, starts, s.low_res, s.size)
        return svc.respond(request, format, label, s.volume.original, session_id=s.session_id,
                           clicks=[ClickIn.from_click(c) for c in clicks])

    async def _refresh_embedding(s: Session) -> None:
        """The model took new weights (``raylearn run`` publishes the promptable model each round): a session
        keeps its clicks and masks; its window is encoded again when the image encoder changed."""
        info = await svc.model_info()
        if info.get("encoder_digest") == s.encoder_digest:
            return
        if info["input_size"] != s.size:
            raise HTTPException(409, f"the model's window changed from {s.size} to {info['input_size']} voxels since "
                                     "this session began; start a new session")
        before = svc.encoder_requests
        s.embedding = await svc.embedding(s.volume, s.start, s.size, info.get("encoder_digest"))
        s.encoder_digest = info.get("encoder_digest")
        s.encoder_calls += svc.encoder_requests - before

    @v1.delete("/sessions/{session_id}", status_code=204)
    async def delete_session(session_id: str) -> Response:
        """Drop a session and its embedding (after any click in progress on it)."""
        s = svc.session(session_id)
        async with s.lock:
            if s.closed:
                raise HTTPException(404, f"unknown or expired session {short_id(session_id)}")
            s.closed = True
            try:
                svc.sessions.delete(session_id)
            except SessionNotFound:  # expired while the lock was held: gone either way
                pass
        return Response(status_code=204)

    @v1.post("/segment", response_model=MaskResponse)
    async def segment(request: Request, file: VolumeFile,
                      clicks: Annotated[str, Form(description='JSON list, e.g. [{"label": 1, "voxel": [18, 24, 17]}]')],
                      format: Fmt = None):
        """One shot: volume + clicks -> mask (the embedding is cached for a later request on the same volume)."""
        try:
            parsed = [c.to_click() for c in CLICK_LIST.validate_json(clicks)]
        except ValidationError as err:
            raise HTTPException(422, "clicks: " + validation_detail(err.errors())) from None
        svc.check_clicks(parsed)
        info = await svc.model_info()
        image, volume = await svc.prepare(file, info)
        try:
            label, _ = await svc.segment(volume, parsed, info)
        except ClickError as err:
            raise HTTPException(422, str(err)) from None
        return svc.respond(request, format, label, image)

    @v1.post("/preannotate", response_model=MaskResponse)
    async def preannotate(request: Request, file: VolumeFile,
                          label: Annotated[UploadFile | None, File(description="ground truth")] = None,
                          n_clicks: Annotated[int | None, Form(ge=1, le=50)] = None,
                          seed: Annotated[int | None, Form(ge=0, le=2**32 - 1)] = None,
                          reference: Annotated[Literal["prediction", "label"], Form(
                              description="clicks simulated against the segmenter's prediction (pre-annotation) "
                                          "or against the uploaded label (an expert's clicks)")] = "prediction",
                          click_method: Annotated[Literal["random", "center"] | None, Form()] = None,
                          format: Fmt = None):
        """Segmenter prediction -> per class, N clicks added one at a time from the error region between
        SAM-Med3D's mask and the reference (missed voxel: positive, extra voxel: negative), the previous low-res
        mask fed back -> SAM-Med3D mask. Segmenter and SAM-Med3D run in the model deployment (its device)."""
        if svc.cfg.segmenter_checkpoint is None:
            raise HTTPException(503, "pre-annotation needs a segmenter: set segmenter_checkpoint in the "
                                     f"{INGRESS_NAME} user_config")
        pc, cfg = svc.cfg.preannotate, svc.cfg
        info = await svc.model_info()
        image = await svc.read(file, "file", info)
        gt = None
        if label is not None and label.filename:
            gt_img = await svc.read(label, "label", info)
            if gt_img.GetSize() != image.GetSize():
                raise HTTPException(422, f"label: size {gt_img.GetSize()} != the image's size {image.GetSize()}")
            import SimpleITK as sitk

            gt = sitk.GetArrayFromImage(gt_img).astype(np.int64)
            unknown = sorted(set(np.unique(gt).tolist()) - set(cfg.classes) - {0})
            if unknown:
                raise HTTPException(422, f"label: unknown class(es) {unknown[:5]} (known classes: "
                                         f"{', '.join(str(k) for k in sorted(cfg.classes))})")
        if reference == "label" and gt is None:
            raise HTTPException(422, "reference=label needs the ground truth: upload it as 'label'")
        n = n_clicks or pc.n_clicks
        try:
            out = await svc.model.preannotate.remote(
                image, None if gt is None else gt.astype(np.uint8), segmenter_checkpoint=cfg.segmenter_checkpoint,
                preprocess=cfg.segmenter_preprocess.model_dump(mode="json"), classes=sorted(cfg.classes),
                n_clicks=n, seed=pc.seed if seed is None else seed, reference=reference,
                method=click_method or pc.click_method)
        except ValueError as err:  # e.g. a multi-channel segmenter; Ray re-raises the replica's ValueError
            raise HTTPException(422, f"pre-annotation: {str(err).splitlines()[-1]}") from None
        from raylearn.prompts import compare_symdiff_pct

        symdiff = compare_symdiff_pct(out["label_map"], out["segmenter_label_map"], gt, cfg.classes) \
            if gt is not None else None
        return svc.respond(request, format, out["label_map"], image, clicks=[ClickIn.from_click(c) for c in
                                                                             out["clicks"]],
                           symdiff_pct=symdiff, timing_ms=out["timing_ms"])

    app.include_router(v1)
    from raylearn.serve.annotation_api import add_annotation_routes

    add_annotation_routes(app, svc)
    from raylearn.serve.nninteractive import add_nninteractive_routes

    add_nninteractive_routes(app, svc)  # nnInteractive's protocols (3D Slicer): /nninteractive, /nninteractive-slicer
    return app
