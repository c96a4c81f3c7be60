"""One object segmented interactively with SAM-Med3D: the state behind nnInteractive's protocols.

nnInteractive's clients (the 3D Slicer extension, ``nninteractive-client``) keep one image and one binary target
per session and send interactions (points, boxes, scribbles, lassos, an initial segmentation) in voxel indices of
the array they uploaded. :class:`InteractiveState` turns each interaction into SAM-Med3D prompts:

- a point is a click (``include_interaction`` = positive);
- a box is a click at its centre: SAM-Med3D has no box prompt (its box embedding is 2D and was never trained);
- a scribble or lasso mask is a click at its most interior voxel (largest distance to the mask's border; of
  several, the one nearest their centroid);
- an initial segmentation becomes the current mask and SAM-Med3D's mask prompt (the previous low-res logits) in a
  window centred on it; an empty one resets the session.

All clicks so far and the previous low-res logits go to the decoder, in an ``S^3`` window (1.5 mm) centred on the
first interaction and re-centred (the mask prompt dropped) when a click falls outside it. Encoder and decoder run
in the model deployment through the ingress (:meth:`raylearn.serve.ingress.SamMed3DIngress.embedding` / ``decode``),
so the embedding cache and batching are shared with the ``/v1`` sessions. Undo restores the state before the last
interaction.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import math
import struct
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from fastapi import HTTPException
from scipy import ndimage

from raylearn.models.sam_med3d import Click, ClickError, Volume, group_clicks, prepare_volume, window_start
from raylearn.p2p import crop_labels, reference_on_grid
from raylearn.prompts import class_window_start
from raylearn.serve.volumes import VolumeError, VolumeLimits, check_grid

#: label the one interactive object has in SAM-Med3D's per-class calls
OBJECT = 1
#: logit magnitude of an uploaded segmentation used as the mask prompt
MASK_LOGIT = 6.0


@dataclass
class Snapshot:
    clicks: list[Click]
    low_res: np.ndarray | None
    start: tuple[int, int, int] | None
    mask: np.ndarray | None


@dataclass
class InteractiveState:
    """The image, the target, the clicks, the previous low-res logits and the undo stack of one client."""

    volume: Volume | None = None
    target_dtype: np.dtype = field(default_factory=lambda: np.dtype(np.uint8))
    clicks: list[Click] = field(default_factory=list)
    low_res: np.ndarray | None = None
    start: tuple[int, int, int] | None = None
    mask: np.ndarray | None = None  # uint8 [D,H,W] 0/1, the current object
    history: list[Snapshot] = field(default_factory=list)
    pending: bool = False  # interactions added with run_prediction=False
    do_autozoom: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    last_active: float = field(default_factory=time.monotonic)

    # ------------------------------------------------------------------ image and target
    def require_image(self) -> Volume:
        if self.volume is None:
            raise HTTPException(400, "no image: upload one first (set_image / upload_image)")
        return self.volume

    def reset(self) -> None:
        self.clicks, self.low_res, self.start, self.history, self.pending = [], None, None, [], False
        self.mask = None if self.volume is None else np.zeros(self.volume.shape, np.uint8)

    async def set_image(self, svc, array: np.ndarray, spacing=None) -> tuple[int, ...]:
        """A ``[D,H,W]`` or ``[C,D,H,W]`` array (the first channel is used) with per-axis spacing in mm (default 1)."""
        arr = np.asarray(array)
        if arr.ndim == 4:
            arr = arr[0]
        if arr.ndim != 3 or min(arr.shape) < 1:
            raise HTTPException(400, f"image: expected a 3D [x, y, z] or 4D [c, x, y, z] array, got shape "
                                     f"{tuple(np.shape(array))}")
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)) or arr.dtype == bool:
            raise HTTPException(400, f"image: unsupported dtype {arr.dtype} (expected integers or floats)")
        sp = [1.0, 1.0, 1.0] if spacing is None else [float(s) for s in spacing]
        if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
            raise HTTPException(400, f"image_properties.spacing: expected 3 positive numbers, got {spacing!r}")
        info = await svc.model_info()
        cfg = svc.cfg
        try:
            check_grid("image", arr.shape[::-1], sp[::-1],
                       VolumeLimits(cfg.max_voxels, cfg.max_resampled_voxels, info["target_spacing_mm"]), "array")
        except VolumeError as err:
            raise HTTPException(err.status, str(err)) from None
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr, dtype=np.float32))
        img.SetSpacing(sp[::-1])
        self.volume = await svc._bounded("image: resampling the volume", prepare_volume, img,
                                         info["target_spacing_mm"])
        self.reset()
        return self.volume.shape

    def set_target(self, shape, dtype) -> None:
        vol = self.require_image()
        if tuple(shape) != vol.shape:
            raise HTTPException(400, f"target buffer shape {tuple(shape)} != image shape {vol.shape}")
        self.target_dtype = np.dtype(dtype)
        self.reset()

    # ------------------------------------------------------------------ interactions -> clicks
    def _snapshot(self) -> None:
        self.history.append(Snapshot(list(self.clicks), self.low_res, self.start,
                                     None if self.mask is None else self.mask.copy()))
        del self.history[:-32]  # bounded undo depth

    def add_click(self, voxel, positive: bool, what: str = "point") -> None:
        vol = self.require_image()
        try:
            idx = [float(v) for v in voxel]
        except (TypeError, ValueError):
            raise HTTPException(400, f"{what}: coordinates must be 3 numbers, got {voxel!r}") from None
        click = Click(label=OBJECT, positive=bool(positive), voxel=tuple(idx))
        try:
            vol.click_index(click, name=what)
        except ClickError as err:
            raise HTTPException(400, str(err)) from None
        self._snapshot()
        self.clicks.append(click)
        self.pending = True

    def add_box(self, bbox, positive: bool) -> None:
        try:
            b = np.asarray(bbox, dtype=float)
        except (TypeError, ValueError):
            b = np.zeros(0)
        if b.shape != (3, 2) or not np.all(np.isfinite(b)):
            raise HTTPException(400, f"bbox: expected [[x0, x1], [y0, y1], [z0, z1]], got {bbox!r}")
        if np.any(b[:, 1] <= b[:, 0]):
            raise HTTPException(400, f"bbox: the box {bbox!r} has zero size in at least one dimension")
        self.add_click((b[:, 0] + b[:, 1] - 1) / 2.0, positive, what="bbox centre")

    def add_mask_click(self, mask: np.ndarray, positive: bool, what: str) -> None:
        vol = self.require_image()
        m = np.asarray(mask) > 0
        if m.shape != vol.shape:
            raise HTTPException(400, f"{what}: shape {m.shape} != image shape {vol.shape}")
        if not m.any():
            raise HTTPException(400, f"{what}: the mask is empty")
        dist = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1, 1:-1]
        core = np.argwhere(dist == dist.max())  # thin masks (a scribble, a one-slice lasso) tie: take the middle
        best = core[np.argmin(((core - core.mean(axis=0)) ** 2).sum(axis=1))]
        self.add_click(best, positive, what=f"{what} centre")

    def set_segment(self, seg: np.ndarray, size: int, low_res_size: int) -> None:
        """An initial segmentation: the current mask and the mask prompt (``low_res_size^3`` logits); empty = reset."""
        vol = self.require_image()
        s = np.asarray(seg)
        if s.shape != vol.shape:
            raise HTTPException(400, f"segmentation: shape {s.shape} != image shape {vol.shape}")
        if not s.any():
            self.reset()
            return
        self._snapshot()
        grid = reference_on_grid(vol, (s > 0).astype(np.uint8)) > 0
        if grid.any():
            self.start = class_window_start(grid, size)
        else:  # thinner than the 1.5 mm grid: a window centred on its voxels
            centre = vol.click_index(Click(label=OBJECT, voxel=tuple(np.argwhere(s > 0).mean(axis=0))))
            self.start = window_start(vol, centre, size)
        window = crop_labels(grid, self.start, size).astype(np.float32)[None, None]
        import torch

        t = torch.from_numpy(window)
        # the segmentation at the low-res cell centres (as SAM-Med3D's 4x upsampling places them); a structure
        # thinner than a cell: present wherever it touches the cell
        low = torch.nn.functional.interpolate(t, size=(low_res_size,) * 3, mode="trilinear", align_corners=False)
        if not (low > 0.5).any():
            low = torch.nn.functional.adaptive_max_pool3d(t, low_res_size)
        self.low_res = (MASK_LOGIT * (2.0 * low[0, 0].numpy() - 1.0)).astype(np.float32)
        self.clicks, self.mask, self.pending = [], (s > 0).astype(np.uint8), False

    def undo(self) -> bool:
        if not self.history:
            return False
        snap = self.history.pop()
        self.clicks, self.low_res, self.start, self.mask = snap.clicks, snap.low_res, snap.start, snap.mask
        self.pending = False
        return True

    # ------------------------------------------------------------------ prediction
    async def predict(self, svc) -> np.ndarray:
        """Decode all clicks (+ the previous low-res logits) into the new mask ``uint8 [D,H,W]``; returns it."""
        vol = self.require_image()
        if not self.clicks:
            raise HTTPException(400, "nothing to predict: add a point, box, scribble or lasso first")
        info = await svc.model_info()
        size = info["input_size"]
        idx = np.stack([vol.click_index(c) for c in self.clicks])
        inside = lambda st: bool(np.all((idx >= np.asarray(st) - 0.5) & (idx < np.asarray(st) + size - 0.5)))  # noqa: E731
        if self.start is None or not inside(self.start):
            self.start, self.low_res = window_start(vol, idx.mean(axis=0), size), None  # new window: no mask prompt
        try:
            grouped = group_clicks(vol, self.clicks, size, self.start)
        except ClickError:
            raise HTTPException(400, f"the interactions span more than SAM-Med3D's field of view ({size} voxels at "
                                     f"{info['target_spacing_mm']:g} mm); reset the interactions") from None
        emb = await svc.embedding(vol, self.start, size, info.get("encoder_digest"))
        low = await svc.decode(grouped, {self.start: emb}, {OBJECT: self.low_res})
        label = await asyncio.to_thread(svc.to_label, vol, {OBJECT: self.start}, low, size)
        self.low_res, self.pending = low[OBJECT], False
        self.mask = (label == OBJECT).astype(np.uint8)
        return self.mask


def window_sizes(info: dict) -> tuple[int, int]:
    """``(S, L)``: the model's window edge and its low-res mask edge (4x the embedding grid), from ``/v1/info``."""
    a = info["architecture"]
    return int(info["input_size"]), 4 * (int(a["image_size"]) // int(a["patch_size"]))


def changed_bbox(old: np.ndarray | None, new: np.ndarray) -> list[list[int]] | None:
    """Half-open ``[[lo, hi], ...]`` box of the voxels that differ (None when nothing changed)."""
    diff = new != 0 if old is None else old != new
    if not diff.any():
        return None
    nz = np.argwhere(diff)
    return [[int(lo), int(hi) + 1] for lo, hi in zip(nz.min(axis=0), nz.max(axis=0), strict=True)]


# ---------------------------------------------------------------------------------------- safe array decoding
def gunzip(data: bytes, limit: int, what: str) -> bytes:
    """gzip-decompress at most ``limit`` bytes (400 on corrupt data, 413 beyond the limit)."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as err:
        raise HTTPException(400, f"{what}: not gzip data ({err})") from None
    if len(out) > limit or d.unconsumed_tail:
        raise HTTPException(413, f"{what}: decompresses to more than {limit:,} bytes")
    return out


def load_npy(data: bytes, max_voxels: int, what: str) -> np.ndarray:
    """A ``.npy`` payload (no pickles), its header checked against ``max_voxels`` before the data is read."""
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"unsupported .npy version {version}")
        shape, _, dtype = readers[version](buf)
    except (ValueError, OSError) as err:
        raise HTTPException(400, f"{what}: not a .npy array ({err})") from None
    if dtype.hasobject:
        raise HTTPException(400, f"{what}: object arrays are refused")
    if math.prod(shape) > max_voxels:
        raise HTTPException(413, f"{what}: {shape} = {math.prod(shape):,} elements, above max_voxels = {max_voxels:,}")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as err:
        raise HTTPException(400, f"{what}: corrupt .npy array ({err})") from None


def nnia_shape(buf: bytes, what: str) -> tuple[int, ...]:
    """The shape an nnInteractive wire array declares (``NNIA`` header), read before it is decompressed."""
    try:
        magic, _version, _codec, ndim, name_len = struct.unpack_from("<4sBBBB", buf, 0)
        if magic != b"NNIA":
            raise ValueError(f"bad magic {magic!r}")
        return tuple(struct.unpack_from(f"<{ndim}q", buf, 8 + name_len))
    except (struct.error, ValueError) as err:
        raise HTTPException(400, f"{what}: not an nnInteractive array ({err})") from None


def gzip_bits(mask: np.ndarray) -> bytes:
    """nninteractive-slicer-server's result: the mask packed to bits, gzip-compressed."""
    return gzip.compress(np.packbits(np.asarray(mask).astype(bool), axis=None).tobytes())
