"""Backend-independent construction and loading of segmenters."""

from __future__ import annotations

from pathlib import Path

import torch

from raylearn.models.base import Segmenter, read_torch_file
from raylearn.models.config import ModelConfig

__all__ = ["build_segmenter", "load_segmenter"]


def build_segmenter(cfg: ModelConfig, in_channels: int, num_classes: int, seed: int = 0, device=None) -> Segmenter:
    """A freshly initialised segmenter (MONAI backend only: an nnU-Net model exists only after training)."""
    if cfg.backend != "monai_unet":
        raise ValueError(f"model.backend={cfg.backend!r}: an untrained nnU-Net model cannot be built; train it first")
    from raylearn.models.unet import MonaiSegmenter

    return MonaiSegmenter(cfg, in_channels=in_channels, num_classes=num_classes, seed=seed, device=device)


def load_segmenter(path: str | Path, device: str | torch.device | None = None) -> Segmenter:
    """Load any checkpoint written by ``fit_round`` / ``Segmenter.save`` (MONAI file or nnU-Net bundle)."""
    path = Path(path)
    ckpt = read_torch_file(path)
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    from raylearn.models.nnunet_segmenter import BUNDLE_FORMAT, NnUNetSegmenter
    from raylearn.models.unet import CHECKPOINT_FORMAT, MonaiSegmenter

    if fmt == CHECKPOINT_FORMAT:
        return MonaiSegmenter.from_checkpoint(ckpt, device=device)
    if fmt == BUNDLE_FORMAT:
        return NnUNetSegmenter(ckpt, device=device)
    raise ValueError(f"{path}: unknown checkpoint format {fmt!r} (expected {CHECKPOINT_FORMAT!r} or {BUNDLE_FORMAT!r})")
