"""STAR's two-stage training (seed paper 002; see :mod:`raylearn.models.star` for the network and where raylearn
adapts the paper). Pure torch: no Ray.

- stage 1 (:func:`train_stage1`): ``f_U`` + decoder as a slice segmenter, MONAI's focal loss on the labelled slices;
- stage 2 (:func:`train_stage2`): the propagation loss: one labelled slice (with its label) as memory, the nearest
  labelled slice of the same case as the query, cross-entropy against its label.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from raylearn.models.star import StarNet

__all__ = ["StarTrainParams", "train_stage1", "train_stage2"]


@dataclass(frozen=True)
class StarTrainParams:
    """Two-stage training settings. Defaults follow the authors' code where it has one.

    Attributes:
        stage1_steps: optimiser steps of stage 1 (focal loss on labelled slices); the code: <= 100 epochs.
        stage2_steps: optimiser steps of stage 2 (propagation between nearest labelled slices).
        batch_size: slices (stage 1) or slice pairs (stage 2) per step (the code: 2).
        lr1: Adam learning rate of stage 1 (the code: 1e-4).
        lr2: Adam learning rate of stage 2 (the code: 5e-5).
        focal_gamma: focusing parameter of the focal loss (the code: 2).
        focal_alpha: MONAI ``FocalLoss`` alpha (class re-weighting); None = off (see the module docstring).
        reinit_label_encoder: copy ``f_U`` into ``f_L`` before each stage 2 (the code does, every round).
    """

    stage1_steps: int = 100
    stage2_steps: int = 100
    batch_size: int = 2
    lr1: float = 1e-4
    lr2: float = 5e-5
    focal_gamma: float = 2.0
    focal_alpha: float | None = None
    reinit_label_encoder: bool = True

    def __post_init__(self) -> None:
        for name in ("stage1_steps", "stage2_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        for name in ("lr1", "lr2"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not v > 0:
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if not isinstance(self.focal_gamma, int | float) or self.focal_gamma < 0:
            raise ValueError(f"focal_gamma must be >= 0, got {self.focal_gamma!r}")
        if self.focal_alpha is not None and not 0 <= self.focal_alpha <= 1:
            raise ValueError(f"focal_alpha must be in [0, 1] or None, got {self.focal_alpha!r}")


def _batch(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], idx: np.ndarray, stride: int,
           device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack slices ``[C_in, h, w]`` / labels ``[h, w]`` of possibly different sizes, zero-padded to a common
    multiple of ``stride``; returns images ``[B, C_in, H, W]``, labels ``long [B, H, W]`` and ``valid [B, H, W]``."""
    h = max(images[i].shape[-2] for i in idx)
    w = max(images[i].shape[-1] for i in idx)
    h, w = h + (-h) % stride, w + (-w) % stride
    x = np.zeros((len(idx), images[idx[0]].shape[0], h, w), np.float32)
    y = np.zeros((len(idx), h, w), np.int64)
    valid = np.zeros((len(idx), h, w), bool)
    for b, i in enumerate(idx):
        sh, sw = images[i].shape[-2:]
        x[b, :, :sh, :sw], y[b, :sh, :sw], valid[b, :sh, :sw] = images[i], labels[i], True
    return (torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), torch.from_numpy(valid).to(device))


def train_stage1(net: StarNet, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], params: StarTrainParams,
                 generator: np.random.Generator, device: str = "cpu") -> float:
    """Stage 1: ``f_U`` + decoder as a slice segmenter, MONAI focal loss (softmax) on labelled slices.

    Args:
        net: the network (trained in place).
        images: labelled slices, each ``float32 [C_in, h, w]``.
        labels: their labels, each ``int [h, w]`` in ``[0, K)``.
        params: see :class:`StarTrainParams`.
        generator: draws the batches.
        device: torch device.

    Returns:
        mean loss over the last (up to) 10 steps (NaN when there was nothing to train).
    """
    if len(images) != len(labels):
        raise ValueError(f"train_stage1: {len(images)} images but {len(labels)} labels")
    if not images or params.stage1_steps == 0:
        return float("nan")
    from monai.losses import FocalLoss

    loss_fn = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=params.focal_gamma, alpha=params.focal_alpha,
                        reduction="none")
    opt = torch.optim.Adam(net.parameters(), lr=params.lr1)
    net.train()
    losses: list[float] = []
    for _ in range(params.stage1_steps):
        idx = generator.choice(len(images), size=min(params.batch_size, len(images)), replace=False)
        x, y, valid = _batch(images, labels, idx, net.stride, device)
        per_pixel = loss_fn(net.segment(x), y[:, None]).sum(dim=1)  # [B, H, W]
        losses.append(_masked_step(opt, per_pixel, valid))
    return float(np.mean(losses[-10:]))


def _masked_step(opt: torch.optim.Optimizer, per_pixel: torch.Tensor, valid: torch.Tensor) -> float:
    """One optimiser step on the mean of ``per_pixel`` loss ``[B, H, W]`` over the ``valid`` pixels; the loss."""
    loss = (per_pixel * valid).sum() / valid.sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def train_stage2(net: StarNet, images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                 pairs: Sequence[tuple[int, int]], params: StarTrainParams, generator: np.random.Generator,
                 device: str = "cpu") -> float:
    """Stage 2: the propagation loss. For a pair ``(a, b)`` of nearest labelled slices of one case, slice ``a`` with
    its label is the memory and slice ``b`` the query; cross-entropy of the propagated logits against ``b``'s label.

    Args:
        net: the network (trained in place; ``f_L`` is first copied from ``f_U`` when
            ``params.reinit_label_encoder``).
        images: labelled slices, each ``float32 [C_in, h, w]`` (the two slices of a pair share ``h, w``).
        labels: their labels, each ``int [h, w]``.
        pairs: ``(memory index, query index)`` into ``images``; give both directions to train both.
        params: see :class:`StarTrainParams`.
        generator: draws the batches.
        device: torch device.

    Returns:
        mean loss over the last (up to) 10 steps (NaN when there was nothing to train).
    """
    if params.reinit_label_encoder:
        net.init_label_encoder()
    if not pairs or params.stage2_steps == 0:
        return float("nan")
    for a, b in pairs:
        if images[a].shape != images[b].shape:
            raise ValueError(f"train_stage2: pair ({a}, {b}) has slices of shapes {images[a].shape} and "
                             f"{images[b].shape}")
    opt = torch.optim.Adam(net.parameters(), lr=params.lr2)
    net.train()
    pairs_arr = np.asarray(pairs, dtype=np.int64)
    losses: list[float] = []
    for _ in range(params.stage2_steps):
        chosen = pairs_arr[generator.choice(len(pairs_arr), size=min(params.batch_size, len(pairs_arr)),
                                            replace=False)]
        xm, ym, _ = _batch(images, labels, chosen[:, 0], net.stride, device)
        xq, yq, valid = _batch(images, labels, chosen[:, 1], net.stride, device)
        keys, values = net.memorize(xm, F.one_hot(ym, net.num_classes).permute(0, 3, 1, 2))
        allowed = torch.eye(len(chosen), dtype=torch.bool, device=xq.device)  # each query sees its own memory
        logits = net.propagate(xq, keys, values, allowed)
        losses.append(_masked_step(opt, F.cross_entropy(logits, yq, reduction="none"), valid))
    return float(np.mean(losses[-10:]))
