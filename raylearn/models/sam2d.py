"""SUGFW's SAM extractor on 3D volumes, slice by slice: SAM-ensemble uncertainty and PGDR features.

Checked against HiLab-git/SUGFW (commit 6979278), ``UC-SAM/get_uncertainty.py``: K = 10 augmented copies of
each image, ``SamAutomaticMaskGenerator`` on SAM ViT-B, masks kept when predicted IoU > 0.95, stability > 0.95
and area < H*W/4, their union per copy, mapped back by the inverse rotation and flip, mean over copies ``M``,
``U = M(1 - M) + 0.5`` (the paper prints ``0.5 - M(1 - M)``; we follow the code); image-encoder features of the
unaugmented image; ``select_samples.py``: PGDR = uncertainty-weighted pooling of those features, and the image's
uncertainty = mean U. Here an image is a slice of the volume along ``axis`` (zero-padded to a square), and a
volume's PGDR pools the features of all its processed slices with their U weights, its uncertainty is the mean U
over their (unpadded) pixels.

Weights come from a local checkpoint (``checkpoint``, e.g. ``sam_vit_b_01ec64.pth``); nothing is downloaded.
``random_weights: true`` builds randomly initialised weights instead (tests and smoke runs: the uncertainty is
then meaningless), optionally at a small ``img_size`` / ``encoder_depth`` to keep CPU time small.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from raylearn.config import StrictModel
from raylearn.scoring.coldstart import augment_slice, invert_geometry, pgdr_pool, sam_uncertainty

__all__ = ["SugfwParams", "build_sam", "sam_blob", "load_sam", "union_mask", "volume_features"]

_INSTALL = "segment-anything is needed for SUGFW's extractor: pip install segment-anything==1.0"


class SugfwParams(StrictModel):
    """Settings of the SUGFW extractor (``gscu``'s ``extractor:`` parameter); they key its cache.

    Attributes:
        checkpoint: local SAM ViT-B checkpoint (``sam_vit_b_01ec64.pth``); required unless ``random_weights``.
        random_weights: build randomly initialised weights (seeded by ``seed``) instead of loading a checkpoint.
        img_size: SAM's input size (1024 with a checkpoint; smaller only with ``random_weights``).
        encoder_depth: ViT blocks (12 = ViT-B; fewer only with ``random_weights``).
        axis: slicing axis of the volume ``[D, H, W]`` (0, 1 or 2).
        max_slices: process this many evenly spaced slices per volume (None = all).
        n_aug: augmented copies per slice (K = 10 in the paper).
        points_per_side: the automatic mask generator's point grid (32 = SAM's default).
        pred_iou, stability: the authors' filter of the generated masks (both 0.95).
        max_area_fraction: keep masks smaller than this share of the slice (1/4).
        seed: seed of the augmentations (and of random weights).
    """

    checkpoint: str | None = None
    random_weights: bool = False
    img_size: int = Field(1024, ge=32)
    encoder_depth: int = Field(12, ge=1, le=12)
    axis: int = Field(0, ge=0, le=2)
    max_slices: int | None = Field(8, ge=1)
    n_aug: int = Field(10, ge=2)
    points_per_side: int = Field(32, ge=1)
    pred_iou: float = 0.95
    stability: float = 0.95
    max_area_fraction: float = Field(0.25, gt=0, le=1)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> SugfwParams:
        if self.img_size % 16:
            raise ValueError(f"img_size: must be a multiple of 16 (SAM's patch), got {self.img_size}")
        if self.checkpoint is None and not self.random_weights:
            raise ValueError("checkpoint: a local SAM ViT-B checkpoint path is required (e.g. sam_vit_b_01ec64.pth; "
                             "nothing is downloaded), or set random_weights: true for a smoke run")
        if self.checkpoint is not None and (self.img_size != 1024 or self.encoder_depth != 12):
            raise ValueError("img_size / encoder_depth: a SAM ViT-B checkpoint needs img_size 1024 and "
                             f"encoder_depth 12, got {self.img_size} / {self.encoder_depth}")
        return self


def build_sam(params: SugfwParams) -> Any:
    """SAM ViT-B's architecture (segment-anything's ``_build_sam`` with ``img_size`` / ``encoder_depth`` as set),
    randomly initialised (seeded) and in eval mode."""
    from functools import partial

    try:
        from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    except ImportError as err:
        raise ImportError(_INSTALL) from err
    depth, size = params.encoder_depth, params.img_size
    glob = [i for i in (2, 5, 8, 11) if i < depth] or [depth - 1]
    torch.manual_seed(params.seed)
    sam = Sam(
        image_encoder=ImageEncoderViT(depth=depth, embed_dim=768, img_size=size, mlp_ratio=4,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=12, patch_size=16,
                                      qkv_bias=True, use_rel_pos=True, global_attn_indexes=glob, window_size=14,
                                      out_chans=256),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(size // 16, size // 16),
                                     input_image_size=(size, size), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
            depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256, iou_head_depth=3,
            iou_head_hidden_dim=256),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def sam_blob(params: SugfwParams) -> bytes:
    """The weights the shards load: the checkpoint file's bytes, or seeded random weights (``random_weights``).

    Raises:
        FileNotFoundError: ``checkpoint`` names no file (the message names the key).
    """
    if params.checkpoint is not None:
        path = Path(params.checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"extractor.checkpoint: SAM checkpoint not found: {path} (nothing is downloaded; "
                                    "place sam_vit_b_01ec64.pth there)")
        return path.read_bytes()
    buf = io.BytesIO()
    torch.save(build_sam(params).state_dict(), buf)
    return buf.getvalue()


def load_sam(blob: bytes, params: SugfwParams, device: str | torch.device = "cpu") -> Any:
    """SAM with the weights of :func:`sam_blob`, on ``device``, eval mode."""
    sam = build_sam(params)
    sam.load_state_dict(torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True))
    return sam.to(device).eval()


def union_mask(records: list[dict], shape: tuple[int, int], params: SugfwParams) -> np.ndarray:
    """Union ``uint8 [H, W]`` of the generated masks the authors keep (IoU, stability, area filters)."""
    h, w = shape
    out = np.zeros((h, w), dtype=np.uint8)
    for r in records:
        if r["predicted_iou"] > params.pred_iou and r["stability_score"] > params.stability and \
                r["area"] < h * w * params.max_area_fraction:
            out |= np.asarray(r["segmentation"], dtype=np.uint8)
    return out


def _slice_indices(n: int, max_slices: int | None) -> list[int]:
    if max_slices is None or max_slices >= n:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, max_slices + 2)[1:-1]})


@torch.no_grad()
def _encode(sam: Any, sq01: np.ndarray) -> torch.Tensor:
    """SAM image-encoder features ``[256, E, E]`` of a square slice in [0, 1]."""
    size = sam.image_encoder.img_size
    dev = next(sam.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(sq01, dtype=np.float32))[None, None].to(dev)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1) * 255.0
    return sam.image_encoder(sam.preprocess(x))[0]


def volume_features(sam: Any, image: np.ndarray, params: SugfwParams, seed: int = 0) -> dict[str, np.ndarray]:
    """SUGFW's uncertainty and PGDR embedding of one volume.

    Args:
        sam: from :func:`load_sam`.
        image: ``float32 [C, D, H, W]`` (the first channel is used).
        params: the extractor settings.
        seed: the case's augmentation seed.

    Returns:
        ``{"sugfw_uncertainty": float32 0-d (mean U), "sugfw_embedding": float16 [256] (PGDR)}``.
    """
    try:
        from segment_anything import SamAutomaticMaskGenerator
    except ImportError as err:
        raise ImportError(_INSTALL) from err
    gen = SamAutomaticMaskGenerator(sam, points_per_side=params.points_per_side)
    vol = np.moveaxis(np.asarray(image, dtype=np.float64)[0], params.axis, 0)
    rng = np.random.default_rng([params.seed, seed])
    feats, weights = [], []
    u_sum, u_n = 0.0, 0
    for s in _slice_indices(vol.shape[0], params.max_slices):
        sl = vol[s]
        h, w = sl.shape
        side = max(h, w)
        sq = np.zeros((side, side))
        sq[:h, :w] = (sl - sl.min()) / (sl.max() - sl.min() + 1e-6)  # the authors' per-image scaling
        msum = np.zeros((side, side))
        for _ in range(params.n_aug):
            aug, p = augment_slice(sq, rng)
            rgb = np.repeat((aug * 255).astype(np.uint8)[..., None], 3, axis=-1)
            msum += invert_geometry(union_mask(gen.generate(rgb), (side, side), params), p)
        u = sam_uncertainty(msum / params.n_aug)
        u_sum += float(u[:h, :w].sum())
        u_n += h * w
        u[h:, :] = 0.0  # the padding takes no weight in PGDR
        u[:, w:] = 0.0
        f = _encode(sam, sq)
        wt = F.adaptive_avg_pool2d(torch.from_numpy(u)[None, None].float(), tuple(f.shape[-2:]))[0, 0]
        feats.append(f.cpu().numpy())
        weights.append(wt.numpy())
    pooled, _ = pgdr_pool(np.stack(feats), np.stack(weights))
    return {"sugfw_uncertainty": np.asarray(u_sum / u_n, dtype=np.float32),
            "sugfw_embedding": pooled.astype(np.float16)}
