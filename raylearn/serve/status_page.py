"""The status page of the annotation service: ``GET /`` (HTML), its data in ``GET /v1/annotation/status``.

The page (:mod:`raylearn.serve.status_html`) is one HTML file with no build step; its plotting library is
plotly.js from the ``plotly`` Python wheel (``plotly/package_data/plotly.min.js``, served at
``/ui/plotly.min.js``), so it works with no network. The HTML and the library carry no data and are served without
a token; everything on the page comes from the API with the same bearer token as any client (typed into the page
or given once as ``/#token=...``; the fragment never reaches the server), and the page refreshes itself.

This module holds the parts that are not HTTP: :func:`status_details` (what the page shows beyond the base status:
state, the full-pool line, cost, suggestions with their scores, leases per annotator, label history) and
:func:`thumbnail_png` (a case's middle axial slice with the current model's prediction overlaid).
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, Response

from raylearn.serve.api import ERRORS

__all__ = ["PLOTLY_JS", "add_status_routes", "status_details", "thumbnail_png"]

#: overlay colours of classes 1, 2, ... (RGB); the page's curve uses the same order
CLASS_COLOURS = ((230, 75, 53), (77, 187, 213), (0, 160, 135), (243, 155, 127), (132, 145, 180), (145, 209, 194))
HISTORY_N = 50


def _plotly_js() -> Path:
    import plotly

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


PLOTLY_JS = "/ui/plotly.min.js"


def _reference(run: Mapping[str, Any]) -> float | None:
    """The full-pool Dice once known: the run's ``summary.json``, else its cached reference (``compare`` shares one
    from the comparison's folder, two levels above the run's ``<strategy>/seed_<s>``)."""
    out = Path(run.get("output_dir") or Path(run["ledger"]).parent)
    try:
        ref = json.loads((out / "summary.json").read_text()).get("full_data_dice")
        if ref is not None:
            return float(ref)
    except (OSError, ValueError):
        pass
    paths = [out / "reference" / "reference.json"]
    if out.name.startswith("seed_"):  # <compare>/<strategy>/seed_<s>: the comparison's shared reference
        paths.append(out.parent.parent / "reference" / "reference.json")
    for path in paths:
        try:
            return float(json.loads(path.read_text())["metrics"]["dice_mean"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _state(run: Mapping[str, Any]) -> str:
    """``finished`` when the run wrote its summary after it (re)started, else ``running``."""
    summary = Path(run.get("output_dir") or Path(run["ledger"]).parent) / "summary.json"
    try:
        return "finished" if summary.stat().st_mtime >= float(run.get("started") or 0) else "running"
    except OSError:
        return "running"


def _suggestion_scores(ledger: Sequence[Mapping[str, Any]], round_index: int | None) -> dict[str, dict[str, float]]:
    """``{case: {feature: score}}`` of the strategy's selection of ``round_index`` (the ledger's ``selected``)."""
    sel = next((r for r in reversed(ledger) if r.get("kind") == "selected" and r.get("round") == round_index), None)
    if sel is None or not sel.get("scores"):
        return {}
    out: dict[str, dict[str, float]] = {}
    for name, values in sel["scores"].items():
        for cid, v in zip(sel["ids"], values, strict=False):
            out.setdefault(str(cid), {})[name] = float(v)
    return out


def status_details(run: Mapping[str, Any], queue: Mapping[str, Any], leases: Mapping[str, Any],
                   labels: Sequence[Any], ledger: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What the status page shows beyond the base status (see ``AnnotationService.status``).

    Args:
        run: ``run.json`` of the workspace; queue: ``queue.json``; leases: active leases by case
            (:class:`~raylearn.annotation.workspace.Lease`).
        labels: every :class:`~raylearn.annotation.labels.LabelRecord` of the run's label store, oldest first.
        ledger: every record of the run's ledger (``round`` and ``selected`` kinds are read).

    Returns:
        ``state`` (``running`` / ``finished``), ``updated`` (the queue's time, epoch s), ``reference_dice`` (None
        until known), ``cost`` (labelled cases and % of the pool, labelled foreground voxels and their % of the
        pool's foreground from the last round, seconds annotators spent between taking a case and its upload),
        ``suggestions`` (queued cases nobody labelled, ranked, with the strategy's scores and who holds them),
        ``leases_by_user`` (``{user: [{case_id, expires_in_s}]}``), ``history`` (the newest label versions first,
        at most 50) and ``curve_classes`` (per-class Dice of each round, ``{metric: [values by round]}``).
    """
    rounds = [r for r in ledger if r.get("kind") == "round"]
    final = [r for r in labels if r.tag == "final"]
    labelled = {r.case_id for r in final}
    human_s = [r.time - r.info["lease_acquired"] for r in labels if r.info.get("lease_acquired")]
    last = rounds[-1] if rounds else {}
    pool = len(run.get("pool_ids", []))
    fg = last.get("fraction_fg_labelled")
    cost = {"labelled": len(labelled), "pool": pool, "labelled_pct": 100.0 * len(labelled) / pool if pool else None,
            "fg_labelled_voxels": last.get("fg_labelled_voxels"), "fg_labelled_pct": None if fg is None else 100 * fg,
            "label_versions": len(labels), "annotation_s": float(sum(human_s)), "timed_labels": len(human_s)}
    scores = _suggestion_scores(ledger, queue.get("round"))
    published = queue.get("scores") or {}
    suggestions = []
    for rank, cid in enumerate(c for c in queue.get("candidates", []) if c not in labelled):
        s = dict(scores.get(cid, {}))
        if cid in published:
            s.setdefault("score", float(published[cid]))
        lease = leases.get(cid)
        suggestions.append({"rank": rank + 1, "case_id": cid, "scores": s, "leased_by": lease.user if lease else None})
    by_user: dict[str, list[dict[str, Any]]] = {}
    for cid, lease in sorted(leases.items()):
        by_user.setdefault(lease.user, []).append({"case_id": cid,
                                                   "expires_in_s": round(lease.expires - time.time(), 1)})
    history = [{"case_id": r.case_id, "version": r.version, "tag": r.tag, "annotator": r.annotator, "source": r.source,
                "time": r.time, "foreground_voxels": r.foreground_voxels}
               for r in reversed(labels[-HISTORY_N:])]
    keys = sorted({k for r in rounds for k in r["metrics"] if k.startswith("dice_") and k != "dice_mean"})
    per_class = {k: [r["metrics"].get(k) for r in rounds] for k in keys}
    return {"state": _state(run), "updated": queue.get("updated"), "reference_dice": _reference(run), "cost": cost,
            "suggestions": suggestions, "leases_by_user": by_user, "history": history, "curve_classes": per_class}


def _normalise(slice2d: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(slice2d, [1, 99]) if slice2d.size else (0.0, 1.0)
    scaled = (slice2d - lo) / (hi - lo) if hi > lo else np.zeros_like(slice2d)
    return (255 * np.clip(scaled, 0, 1)).astype(np.uint8)


def thumbnail_png(image: np.ndarray, prediction: np.ndarray | None, size: int = 160, alpha: float = 0.45) -> bytes:
    """The middle axial slice of ``image`` (float ``[C, D, H, W]``, channel 0) as a PNG, ``prediction`` (uint8
    ``[D, H, W]`` class map, or None) overlaid in :data:`CLASS_COLOURS`; upscaled (nearest) so the longer side is
    about ``size`` pixels."""
    from PIL import Image

    d = image.shape[1] // 2
    grey = _normalise(np.asarray(image[0, d], dtype=np.float32))
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    if prediction is not None:
        pred = np.asarray(prediction)[d]
        for k in range(1, int(pred.max()) + 1 if pred.size else 1):
            colour = np.asarray(CLASS_COLOURS[(k - 1) % len(CLASS_COLOURS)], dtype=np.float32)
            mask = pred == k
            rgb[mask] = (1 - alpha) * rgb[mask] + alpha * colour
    img = Image.fromarray(rgb.astype(np.uint8), "RGB")
    scale = max(1, round(size / max(img.size)))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def add_status_routes(app, svc, annotation, who) -> None:
    """Mount ``GET /`` (the page), ``GET /ui/plotly.min.js`` and ``GET /v1/annotation/thumbnail/{case_id}``.

    Args:
        app: the ingress's FastAPI app; svc: the ingress; annotation: ``() -> AnnotationService`` (503 when off);
        who: ``(request, role) -> User`` (403 naming the role).
    """
    from raylearn.serve.status_html import PAGE

    cache: dict[tuple, bytes] = {}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        """The status page (no data in it: it asks the API, with the user's token)."""
        return HTMLResponse(PAGE, headers={"Cache-Control": "no-store"})

    @app.get(PLOTLY_JS, include_in_schema=False)
    async def plotly_js() -> FileResponse:
        return FileResponse(_plotly_js(), media_type="application/javascript",
                            headers={"Cache-Control": "public, max-age=86400"})

    def render(case_id: str) -> tuple[bytes, int | None]:
        a = annotation()
        a.pool_case(case_id)
        try:
            seg, path, version = a.segmenter()
            key = (case_id, path, Path(path).stat().st_mtime)
        except HTTPException:  # no model yet: the image alone
            seg, version, key = None, None, (case_id, None, None)
        if key not in cache:
            image = a.store().get(case_id).image
            pred = np.asarray(seg.predict_label(image), dtype=np.uint8) if seg is not None else None
            if len(cache) > 256:
                cache.clear()
            cache[key] = thumbnail_png(image, pred)
        return cache[key], version

    @app.get("/v1/annotation/thumbnail/{case_id}", tags=["annotation"],
             responses={**ERRORS, 403: ERRORS[401], 200: {"content": {"image/png": {}}}})
    async def thumbnail(case_id: str, request: Request) -> Response:
        """The case's middle axial slice (preprocessed grid) with the current model's prediction overlaid (PNG)."""
        who(request, "annotator")
        data, version = await asyncio.to_thread(render, case_id)
        return Response(data, media_type="image/png",
                        headers={"Cache-Control": "no-store", "X-Model-Version": str(version)})
