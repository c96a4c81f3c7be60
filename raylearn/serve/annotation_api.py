"""The annotation routes: MONAI Label-compatible endpoints plus raylearn's own ``/v1/annotation/*``.

Paths and payloads follow MONAI Label's server (``monailabel/endpoints/{info,activelearning,datastore,infer}.py``
and ``user/auth.py``) and what its ``MONAILabelClient`` sends (``monailabel/client/client.py``), so 3D Slicer's
and OHIF's MONAI Label plugins and the client talk to raylearn unchanged:

| MONAI Label | here |
|---|---|
| ``GET /info/`` | labels, the ``segmenter`` model, strategies ``raylearn`` (the run's queue) and ``random`` |
| ``POST /activelearning/{strategy}`` (JSON params) | next case ``{"id", ...}``, leased to the caller; ``{}`` if none |
| ``GET /datastore/?output=stats|all|train`` | counts / ``LocalDatastoreModel`` JSON / datalist |
| ``GET|HEAD /datastore/image?image=ID``, ``GET /datastore/image/info`` | the source image file |
| ``PUT /datastore/label?image=ID&tag=final`` (multipart ``label``, ``params``) | validated, stored, versioned |
| ``GET /datastore/label?label=ID&tag=final`` | the latest label, on the source grid |
| ``POST /infer/{model}?image=ID[&output=image|json|all]`` | the current model's prediction (multipart by default) |
| ``GET /auth/``, ``POST /auth/token``, ``GET /auth/token/valid`` | bearer tokens (password = the user's token) |

raylearn's own: ``GET /v1/annotation/status`` (round, labelled count, model version, learning curve, queue,
leases; and what the status page at ``GET /`` shows: :mod:`raylearn.serve.status_page`), ``GET
/v1/annotation/thumbnail/{case}`` (PNG), ``POST|DELETE /v1/annotation/leases/{case}`` (take / renew / release),
and for admins ``POST /v1/annotation/pause|resume``, ``PUT /v1/annotation/strategy``, ``GET /v1/annotation/export``.
Roles: ``annotator`` (images, suggestions, labels, inference) and ``admin`` (everything); 403 names the role.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from raylearn.serve.api import ERRORS
from raylearn.serve.guard import User

if TYPE_CHECKING:
    from raylearn.serve.ingress import SamMed3DIngress

__all__ = ["add_annotation_routes"]

STRATEGIES = {"raylearn": "the run's query strategy: the driver's ranked suggestions, skipping leased and "
                          "labelled cases", "random": "a random pool case nobody labelled or holds"}


class StrategyUpdate(BaseModel):
    name: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)


def _params(raw: str | None) -> dict:
    try:
        out = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        raise HTTPException(422, "params: not valid JSON") from None
    if not isinstance(out, dict):
        raise HTTPException(422, "params: expected a JSON object")
    return out


def _multipart(params: dict, filename: str, data: bytes) -> Response:
    """MONAI Label's default infer answer: a ``params`` JSON field and the result file (``image``)."""
    from urllib3 import encode_multipart_formdata

    body, content_type = encode_multipart_formdata(
        [("params", json.dumps(params)), ("image", (filename, data, "application/octet-stream"))])
    return Response(body, media_type=content_type)


def add_annotation_routes(app: FastAPI, svc: SamMed3DIngress) -> None:
    """Mount the annotation routes on ``app`` (503 while ``annotation`` is not configured)."""

    def annotation():
        if svc.annotation is None:
            raise HTTPException(503, "the annotation API is off: set SamMed3DIngress.user_config.annotation.run_dir")
        return svc.annotation

    def who(request: Request, role: str) -> User:
        user = svc.guard.identify(request.headers.get("authorization"))
        if user is None:  # the middleware answers 401 first; kept for direct calls
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
        if not user.has(role):
            raise HTTPException(403, f"role {role!r} is required (user {user.name!r} is {user.role!r})")
        return user

    async def off_loop(fn, *args):
        return await asyncio.to_thread(fn, *args)

    ml = APIRouter(responses=ERRORS)  # MONAI Label's paths; every error body is {"detail": str}

    # -- auth ---------------------------------------------------------------------------------------
    @ml.get("/auth/", tags=["MONAI Label"])
    async def auth_info() -> dict:
        """Whether bearer tokens are required (MONAI Label's ``auth_enabled``)."""
        return {"enabled": svc.guard.enabled, "client_id": "raylearn", "realm": "raylearn"}

    @ml.post("/auth/token", tags=["MONAI Label"])
    async def auth_token(username: Annotated[str, Form()], password: Annotated[str, Form()]) -> dict:
        """Exchange a user name and its token (as the password) for the bearer token MONAI Label clients send."""
        user = svc.guard.identify(f"Bearer {password}")
        if user is None or (svc.guard.enabled and user.name != username and user.name != "service"):
            raise HTTPException(401, "unknown user or wrong token", headers={"WWW-Authenticate": "Bearer"})
        return {"access_token": password, "token_type": "Bearer"}

    @ml.get("/auth/token/valid", tags=["MONAI Label"])
    async def auth_valid(request: Request) -> dict:
        return {"user": who(request, "annotator").name}

    # -- info / active learning -----------------------------------------------------------------------
    @ml.get("/info/", tags=["MONAI Label"])
    async def info(request: Request) -> dict:
        """MONAI Label's app info: labels, the ``segmenter`` model, strategies, datastore counts."""
        who(request, "annotator")
        a = annotation()
        classes = await off_loop(a.classes)
        labels = {v: k for k, v in sorted(classes.items()) if k}
        run = a.run()
        return {"name": f"raylearn: {run.get('name')}", "description": "raylearn active learning (MONAI Label API)",
                "version": "raylearn", "labels": labels,
                "models": {"segmenter": {"type": "segmentation", "labels": labels, "dimension": 3,
                                         "description": "the run's current segmenter (newest finished round)"}},
                "trainers": {}, "strategies": {k: {"description": v} for k, v in STRATEGIES.items()},
                "scoring": {}, "train_stats": {}, "datastore": await off_loop(a.datastore_stats)}

    @ml.post("/activelearning/{strategy}", tags=["MONAI Label"])
    async def next_sample(strategy: str, request: Request) -> dict:
        """The next case for the caller, leased to them (their open case first); ``{}`` when none is free."""
        user = who(request, "annotator")
        a = annotation()
        if strategy not in STRATEGIES:
            raise HTTPException(404, f"unknown strategy {strategy!r} (available: {', '.join(STRATEGIES)})")
        if (a.ws.read("control") or {}).get("paused"):
            return {}
        labelled = set(await off_loop(a.labels().labelled_ids))
        run = a.run()
        lease = await off_loop(lambda: a.ws.next_case(user.name, labelled, a.lease_s(),
                                                      "random" if strategy == "random" else "queue",
                                                      run["pool_ids"]))
        if lease is None:
            return {}
        q = a.ws.queue()
        return {"id": lease.case_id, "weight": q.get("scores", {}).get(lease.case_id, 1.0), "strategy": strategy,
                "round": q.get("round"), "model_version": q.get("model_version"), "lease": lease.as_json(),
                "name": lease.case_id}

    # -- datastore --------------------------------------------------------------------------------------
    @ml.get("/datastore/", tags=["MONAI Label"])
    async def datastore(request: Request, output: Literal["stats", "all", "train"] | None = None):
        who(request, "annotator")
        a = annotation()
        if output == "all":
            return await off_loop(a.datastore)
        if output == "train":
            ids = await off_loop(a.labels().labelled_ids)
            return [{"image": c, "label": c} for c in ids]
        return await off_loop(a.datastore_stats)

    @ml.get("/datastore/image", tags=["MONAI Label"])
    async def download_image(request: Request, image: str):
        who(request, "annotator")
        path = await off_loop(annotation().image_path, image)
        ext = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
        return FileResponse(path, media_type="application/octet-stream", filename=f"{image}{ext}")

    @ml.head("/datastore/image", tags=["MONAI Label"])
    async def check_image(request: Request, image: str) -> Response:
        who(request, "annotator")
        await off_loop(annotation().image_path, image)
        return Response(status_code=200)

    @ml.get("/datastore/image/info", tags=["MONAI Label"])
    async def image_info(request: Request, image: str) -> dict:
        who(request, "annotator")
        a = annotation()
        await off_loop(a.pool_case, image)
        meta = await off_loop(a.store().meta, image)
        rec = await off_loop(a.labels().latest, image)
        return {"name": image, "size": meta["source"]["size"], "spacing": meta["source"]["spacing"],
                "origin": meta["source"]["origin"], "direction": meta["source"]["direction"],
                "labelled": rec is not None, "label_version": rec.version if rec else None}

    @ml.put("/datastore/label", tags=["MONAI Label"])
    async def save_label(request: Request, image: str, label: Annotated[UploadFile, File()],
                         tag: str = "final", params: Annotated[str, Form()] = "{}") -> dict:
        """Upload a label (NIfTI / MetaImage / NRRD on the image's grid); validated, then stored durably."""
        user = who(request, "annotator")
        a = annotation()
        p = _params(params)
        data = await label.read()
        from raylearn.serve.volumes import VolumeLimits

        # a label is never resampled to the model's spacing: only the stored-voxel cap applies
        limits = VolumeLimits(svc.cfg.max_voxels, 1 << 62, 1.0)
        return await svc._bounded("label: validating and storing", a.save_label, image, data, tag or "final",
                                  user, p, limits)

    @ml.get("/datastore/label", tags=["MONAI Label"])
    async def download_label(request: Request, label: str, tag: str = "final",
                             version: Annotated[int | None, Query(ge=1)] = None) -> Response:
        who(request, "annotator")
        data = await off_loop(annotation().label_nifti, label, tag, version)
        return Response(data, media_type="application/gzip",
                        headers={"Content-Disposition": f'attachment; filename="{label}.nii.gz"'})

    # -- inference --------------------------------------------------------------------------------------
    @ml.post("/infer/{model}", tags=["MONAI Label"])
    async def infer(request: Request, model: str, image: str = "",
                    output: Literal["image", "json", "all"] | None = None,
                    params: Annotated[str, Form()] = "{}") -> Response:
        """The current model's prediction of a pool case (a NIfTI to correct instead of drawing from scratch)."""
        who(request, "annotator")
        a = annotation()
        if model != "segmenter":
            raise HTTPException(404, f"unknown model {model!r} (available: segmenter)")
        if not image:
            raise HTTPException(422, "image: the case id to infer is required (?image=ID)")
        _params(params)
        data, out = await svc._bounded("infer", a.infer, image)
        if output == "json":
            return JSONResponse(out)
        if output == "image":
            return Response(data, media_type="application/gzip",
                            headers={"Content-Disposition": f'attachment; filename="{image}.nii.gz"'})
        return _multipart(out, f"{image}.nii.gz", data)

    # -- raylearn's own ---------------------------------------------------------------------------------
    app.include_router(ml)
    v1 = APIRouter(prefix="/v1/annotation", tags=["annotation"], responses={**ERRORS, 403: ERRORS[401],
                                                                            409: ERRORS[401], 410: ERRORS[401]})

    @v1.get("/status")
    async def status(request: Request) -> dict:
        """Round, labelled count, model version, learning curve, open queue and leases."""
        who(request, "annotator")
        return await off_loop(annotation().status)

    @v1.post("/leases/{case_id}")
    async def take_lease(case_id: str, request: Request) -> dict:
        """Take or renew the caller's lease on a case (409 while another user holds it)."""
        from raylearn.annotation.workspace import LeaseError

        user = who(request, "annotator")
        a = annotation()
        await off_loop(a.pool_case, case_id)
        if case_id in a.labels() and not user.has("admin"):
            raise HTTPException(409, f"case {case_id!r} is labelled already (corrections: upload a new version)")
        try:
            return (await off_loop(a.ws.acquire, case_id, user.name, a.lease_s())).as_json()
        except LeaseError as err:
            raise HTTPException(err.status, str(err)) from None

    @v1.delete("/leases/{case_id}", status_code=204)
    async def drop_lease(case_id: str, request: Request) -> Response:
        user = who(request, "annotator")
        await off_loop(annotation().ws.release, case_id, None if user.has("admin") else user.name)
        return Response(status_code=204)

    @v1.post("/pause")
    async def pause(request: Request) -> dict:
        """Admin: hand out no new suggestions and start no new round (labels in progress are still accepted)."""
        who(request, "admin")
        return await off_loop(lambda: annotation().ws.update("control", paused=True))

    @v1.post("/resume")
    async def resume(request: Request) -> dict:
        who(request, "admin")
        return await off_loop(lambda: annotation().ws.update("control", paused=False))

    @v1.put("/strategy")
    async def set_strategy(body: StrategyUpdate, request: Request) -> dict:
        """Admin: the query strategy of the next rounds (validated against the registry)."""
        from raylearn.strategies import build_strategy

        who(request, "admin")
        try:
            build_strategy(body.name, **body.params)
        except (ValueError, TypeError, KeyError) as err:
            raise HTTPException(422, f"strategy: {err}") from None
        return await off_loop(lambda: annotation().ws.update("control", strategy=body.model_dump()))

    @v1.get("/export")
    async def export(request: Request) -> Response:
        """Admin: every latest final label (NIfTI on the source grid) and the label record, as a zip."""
        who(request, "admin")
        data = await off_loop(annotation().export)
        return Response(data, media_type="application/zip",
                        headers={"Content-Disposition": 'attachment; filename="labels.zip"'})

    app.include_router(v1)
    from raylearn.serve.status_page import add_status_routes

    add_status_routes(app, svc, annotation, who)  # GET / (the status page), its plotly.js, case thumbnails
