"""SAM-Med3D click-prompt segmentation: the official architecture (via ``medim``), checkpoints, inference.

The pipeline follows the official SAM-Med3D inference (``utils/infer_utils.py`` of uni-medical/SAM-Med3D):
resample the volume to 1.5 mm isotropic, crop/pad an ``S^3`` window (``S = 128`` for the released model)
centred on the region of interest, z-score over the window's foreground (voxels > 0), encode the window
once, then decode each click set (+ the previous low-resolution mask) into a mask, upsample, paste back and
map to the original grid (those steps live in :mod:`raylearn.models.sam_med3d_prep`, re-exported here).
Arrays are in SimpleITK order ``[D, H, W]`` (z, y, x); the model sees the same axis order, and point
coordinates are window voxel indices in that order, as in the official code.

The image embedding is cached (:class:`EmbeddingCache`, keyed by a hash of the volume and the window), so a
further click costs only the prompt encoder + mask decoder (see ``benchmarks/serve_latency.py`` for timings).
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import model_validator

from raylearn.config import StrictModel
from raylearn.data.imageio import file_sha256
from raylearn.models.sam_med3d_prep import (  # noqa: F401  (re-exported: the public API of this module)
    Click,
    ClickError,
    Volume,
    combine_class_probabilities,
    crop_window,
    group_clicks,
    prepare_volume,
    upsample_logits,
    window_probability_to_original,
    window_start,
)

log = logging.getLogger(__name__)

#: the released SAM-Med3D (turbo) architecture, as ``medim.create_model("SAM-Med3D")`` builds it
FULL_ARCH = dict(image_size=128, patch_size=16, encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                 encoder_global_attn_indexes=(2, 5, 8, 11), prompt_embed_dim=384, window_size=14)
#: the same classes scaled down for CPU tests (32^3 window, 2 light encoder blocks, 0.7 M parameters)
SMALL_ARCH = dict(image_size=32, patch_size=8, encoder_embed_dim=48, encoder_depth=2, encoder_num_heads=2,
                  encoder_global_attn_indexes=(1,), prompt_embed_dim=48, window_size=2)
_ARCH_KEYS = tuple(FULL_ARCH)


class CheckpointError(ValueError):
    """A SAM-Med3D checkpoint is missing, unreadable or does not match the architecture."""


class SamMed3DConfig(StrictModel):
    """SAM-Med3D model settings. ``preset`` fills every architecture field left unset.

    Attributes:
        preset: ``"full"`` (the released 100.5 M-parameter model, 128^3 input) or ``"small"`` (CPU tests).
        checkpoint: local path to an official checkpoint (``model_state_dict``) or a plain state dict;
            ``None`` keeps the seeded random initialisation (tests, benchmarks).
        target_spacing_mm: isotropic spacing the volume is resampled to before cropping (mm).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        init_seed: seed of the random initialisation when no checkpoint is given.
    """

    preset: Literal["full", "small"] = "full"
    image_size: int | None = None
    patch_size: int | None = None
    encoder_embed_dim: int | None = None
    encoder_depth: int | None = None
    encoder_num_heads: int | None = None
    encoder_global_attn_indexes: tuple[int, ...] | None = None
    prompt_embed_dim: int | None = None
    window_size: int | None = None
    checkpoint: str | None = None
    target_spacing_mm: float = 1.5
    device: Literal["auto", "cpu", "cuda"] = "auto"
    init_seed: int = 0

    @model_validator(mode="after")
    def _check_arch(self) -> SamMed3DConfig:
        a = self.arch()
        if a["image_size"] % a["patch_size"]:
            raise ValueError(f"image_size {a['image_size']} must be a multiple of patch_size {a['patch_size']}")
        if a["encoder_embed_dim"] % a["encoder_num_heads"]:
            raise ValueError("encoder_embed_dim must be divisible by encoder_num_heads")
        if a["prompt_embed_dim"] % 48:
            raise ValueError("prompt_embed_dim must be a multiple of 48 (3-axis positional code, 8 decoder heads)")
        if any(not 0 <= i < a["encoder_depth"] for i in a["encoder_global_attn_indexes"]):
            raise ValueError("encoder_global_attn_indexes must lie in [0, encoder_depth)")
        if self.target_spacing_mm <= 0:
            raise ValueError("target_spacing_mm must be positive")
        return self

    def arch(self) -> dict:
        """The architecture hyperparameters: the preset's, overridden by every field that is set."""
        base = dict(FULL_ARCH if self.preset == "full" else SMALL_ARCH)
        base.update({k: getattr(self, k) for k in _ARCH_KEYS if getattr(self, k) is not None})
        base["encoder_global_attn_indexes"] = tuple(base["encoder_global_attn_indexes"])
        return base

    @property
    def low_res_size(self) -> int:
        """Edge of the decoder's low-resolution mask: the embedding grid upscaled 4x."""
        a = self.arch()
        return 4 * (a["image_size"] // a["patch_size"])


def _import_medim():
    try:
        import medim  # noqa: F401
        from medim.models import sam_med3d as m
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("SAM-Med3D needs medim: pip install 'medim==0.1.2' einops huggingface_hub") from err
    return m


def build_sam_med3d(cfg: SamMed3DConfig) -> torch.nn.Module:
    """Build the SAM-Med3D network (no weights loaded, nothing downloaded).

    The full preset is built by ``medim.create_model("SAM-Med3D", pretrained=False)`` itself; any other
    architecture is assembled from the very classes medim uses (``ImageEncoderViT3D``, ``PromptEncoder3D``,
    ``MaskDecoder3D``, ``SAM_Med3D``) with the same wiring, only scaled. Random init is seeded by
    ``cfg.init_seed`` without touching the global torch RNG state.
    """
    m = _import_medim()
    a = cfg.arch()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        if a == FULL_ARCH:
            import medim

            with contextlib.redirect_stdout(io.StringIO()):  # medim prints "creating model ..."
                return medim.create_model("SAM-Med3D", pretrained=False)
        return build_from_medim_classes(m, a)


def build_from_medim_classes(m, a: dict) -> torch.nn.Module:
    """Mirror of medim's ``build_sam3D_vit_b_ori`` with every size (incl. the attention window) configurable."""
    from functools import partial

    grid = a["image_size"] // a["patch_size"]
    return m.SAM_Med3D(
        image_encoder=m.ImageEncoderViT3D(
            depth=a["encoder_depth"], embed_dim=a["encoder_embed_dim"], img_size=a["image_size"], mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=a["encoder_num_heads"],
            patch_size=a["patch_size"], qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=list(a["encoder_global_attn_indexes"]), window_size=a["window_size"],
            out_chans=a["prompt_embed_dim"]),
        prompt_encoder=m.PromptEncoder3D(
            embed_dim=a["prompt_embed_dim"], image_embedding_size=(grid, grid, grid),
            input_image_size=(a["image_size"],) * 3, mask_in_chans=16),
        mask_decoder=m.MaskDecoder3D(num_multimask_outputs=3, transformer_dim=a["prompt_embed_dim"],
                                     iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    )


def load_checkpoint(model: torch.nn.Module, path: str | Path) -> None:
    """Load an official SAM-Med3D checkpoint (``{"model_state_dict": ...}``) or a plain state dict, strictly.

    Raises:
        CheckpointError: file missing/unreadable, or keys/shapes that do not match the architecture.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint file not found")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception:  # official checkpoints also pickle training args; trusted local file
        try:
            obj = torch.load(p, map_location="cpu", weights_only=False)
        except Exception as err:
            raise CheckpointError(f"{p}: not a readable torch checkpoint ({type(err).__name__}: {err})") from None
    if isinstance(obj, dict) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{p}: expected a state dict or a dict with key 'model_state_dict'")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
           if k in state and state[k].shape != v.shape]
    if missing or unexpected or bad:
        parts = []
        for name, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", bad)):
            if items:
                parts.append(f"{len(items)} {name} (e.g. {', '.join(items[:3])})")
        raise CheckpointError(f"{p}: does not match the configured SAM-Med3D architecture: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def save_checkpoint(model: torch.nn.Module, path: str | Path, cfg: SamMed3DConfig | None = None) -> Path:
    """Write ``{"model_state_dict": ..., "arch": ...}`` in the official layout; :func:`load_checkpoint` reads it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_state_dict": model.state_dict(), "arch": cfg.arch() if cfg else None}, p)
    return p


class EmbeddingCache:
    """Thread-safe LRU cache ``key -> embedding`` (keys: volume hash + window start)."""

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = max(1, int(capacity))
        self._data: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
            return None

    def put(self, key: str, value: np.ndarray) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


# ------------------------------------------------------------------------------------------------- the model


class SamMed3D:
    """SAM-Med3D for inference: batched encoder / decoder calls plus a cached click-to-mask pipeline.

    Args:
        cfg: model settings (architecture preset, local checkpoint, device).
    """

    def __init__(self, cfg: SamMed3DConfig | None = None) -> None:
        self.cfg = cfg or SamMed3DConfig()
        dev = self.cfg.device
        self.device = torch.device("cuda" if dev == "cuda" or (dev == "auto" and torch.cuda.is_available()) else "cpu")
        self.net = build_sam_med3d(self.cfg)
        self.checkpoint_sha256: str | None = None
        if self.cfg.checkpoint:
            load_checkpoint(self.net, self.cfg.checkpoint)
            self.checkpoint_sha256 = file_sha256(self.cfg.checkpoint)
        else:
            log.warning("SAM-Med3D runs with random weights (no checkpoint configured)")
        self.net.to(self.device).eval()
        self.image_size: int = self.cfg.arch()["image_size"]
        self.low_res_size: int = self.cfg.low_res_size
        self.cache = EmbeddingCache()
        self.encoder_calls = 0  # windows encoded
        self.decoder_calls = 0  # masks decoded

    @property
    def num_parameters(self) -> int:
        return int(sum(p.numel() for p in self.net.parameters()))

    @torch.no_grad()
    def encode(self, windows: np.ndarray) -> np.ndarray:
        """Image encoder. ``windows [B,S,S,S]`` float32 (z-scored) -> embeddings ``[B,C,g,g,g]`` float32."""
        x = torch.tensor(np.asarray(windows), dtype=torch.float32, device=self.device)[:, None]
        self.encoder_calls += x.shape[0]
        return self.net.image_encoder(x).float().cpu().numpy()

    @torch.no_grad()
    def decode(self, embeddings: np.ndarray, points: Sequence[np.ndarray], labels: Sequence[np.ndarray],
               masks: Sequence[np.ndarray | None]) -> np.ndarray:
        """Prompt encoder + mask decoder for a batch of prompt sets.

        Args:
            embeddings: ``[B,C,g,g,g]`` image embeddings.
            points: B arrays ``[N_i, 3]`` of window voxel coordinates (d, h, w).
            labels: B arrays ``[N_i]`` (1 positive, 0 negative); shorter sets are padded with "not a point" (-1).
            masks: B previous low-resolution logits ``[L,L,L]`` or None (zeros, as the official first click).

        Returns:
            Low-resolution mask logits ``[B, L, L, L]`` float32 (``L = 4 g``).
        """
        b, n = len(points), max(len(p) for p in points)
        coords = torch.zeros((b, n, 3), dtype=torch.float32)
        labs = -torch.ones((b, n), dtype=torch.float32)
        for i, (p, lab) in enumerate(zip(points, labels, strict=True)):
            coords[i, : len(p)] = torch.tensor(np.asarray(p, np.float32))
            labs[i, : len(lab)] = torch.tensor(np.asarray(lab, np.float32))
        lr = self.low_res_size
        mask_in = torch.stack([torch.zeros((1, lr, lr, lr)) if m is None
                               else torch.tensor(np.asarray(m), dtype=torch.float32).reshape(1, lr, lr, lr)
                               for m in masks])
        dev = self.device
        sparse, dense = self.net.prompt_encoder(points=[coords.to(dev), labs.to(dev)], boxes=None,
                                                masks=mask_in.to(dev))
        low_res, _ = self.net.mask_decoder(
            image_embeddings=torch.tensor(np.asarray(embeddings), device=dev),
            image_pe=self.net.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
        self.decoder_calls += b
        return low_res[:, 0].float().cpu().numpy()

    def upsample(self, low_res: np.ndarray) -> np.ndarray:
        """Low-res logits ``[L,L,L]`` -> window probability ``[S,S,S]``."""
        return upsample_logits(low_res, self.image_size)

    def embedding(self, volume: Volume, start: Sequence[int]) -> np.ndarray:
        """Cached embedding ``[C,g,g,g]`` of the window at ``start`` (encoder runs only on a cache miss)."""
        key = f"{volume.sha256}:{tuple(start)}:{self.image_size}"
        emb = self.cache.get(key)
        if emb is None:
            emb = self.encode(crop_window(volume.array, start, self.image_size)[None])[0]
            self.cache.put(key, emb)
        return emb

    def segment(self, volume: Volume, clicks: Sequence[Click], prev_low_res: dict[int, np.ndarray] | None = None,
                start: Sequence[int] | None = None) -> SamResult:
        """Clicks (several classes) -> label map on the original grid; one decoder pass per class.

        Args:
            volume: from :func:`prepare_volume`.
            clicks: all clicks so far (accumulated, as in the official iterative inference).
            prev_low_res: per class, the previous low-res logits (iterative refinement).
            start: window start; default: centred on the centroid of all clicks.
        """
        grouped = group_clicks(volume, clicks, self.image_size, start)
        prev_low_res = prev_low_res or {}
        low = {}
        for k, (st, pts, labs) in grouped.items():
            emb = self.embedding(volume, st)
            low[k] = self.decode(emb[None], [pts], [labs], [prev_low_res.get(k)])[0]
        probs = {k: window_probability_to_original(volume, grouped[k][0], self.upsample(v)) for k, v in low.items()}
        return SamResult(label_map=combine_class_probabilities(probs), low_res=low,
                         starts={k: g[0] for k, g in grouped.items()})


@dataclass
class SamResult:
    """``label_map uint8 [D,H,W]`` on the original grid; ``low_res`` per class logits for the next round."""

    label_map: np.ndarray
    low_res: dict[int, np.ndarray]
    starts: dict[int, tuple[int, int, int]]
