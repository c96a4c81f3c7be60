"""Loading any backend's segmenter checkpoint: the one ``load_segmenter``."""

from __future__ import annotations

from pathlib import Path

import torch

from raylearn.models.base import Segmenter, read_torch_file

__all__ = ["load_segmenter"]


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
