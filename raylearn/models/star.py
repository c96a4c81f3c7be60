"""STAR's spatial cross-attention network (seed paper 002: Ma et al., "Spatial Aggregation for Semi-supervised
Active Learning in 3D Medical Image Segmentation", MICCAI 2025; the authors' code, HelenMa9998/STAR ``nets.py``,
was read, not copied). Pure torch: no Ray.

The network is a space-time-memory style propagator over the slices of one volume:

- ``f_U`` (:attr:`StarNet.enc_u`) encodes an image slice ``[C_in, H, W]`` into multi-scale features
  ``r2, r3, r4`` (``r4`` has ``D`` channels);
- ``f_L`` (:attr:`StarNet.enc_l`) encodes an image slice together with its one-hot label ``[C_in + K, H, W]``;
- key/value projections (3x3 convolutions, key ``D/8`` channels, value ``D/2``) of ``f_L``'s ``r4`` (the
  labelled "memory" slices) and of ``f_U``'s ``r4`` (the unlabelled "query" slice);
- attention from every position of an unlabelled slice to every position of the labelled slices *of its group*
  (:func:`memory_read`), the read-out concatenated with the slice's own value (``D/2 + D/2 = D`` channels) and
  decoded (with ``f_U``'s ``r3``/``r2`` skips) into ``K``-class logits.

Because the concatenation has ``D`` channels like ``r4``, the same decoder also segments a slice on its own
(``f_U`` -> ``r4`` -> decoder): that is stage 1 of the two-stage training (:mod:`raylearn.models.star_train`,
focal loss on the labelled slices); stage 2 trains the propagation on pairs of nearest labelled slices of a case
(memory = one, target = the other).

Where raylearn adapts the paper:

- The paper slices BraTS / MSD volumes into 2D images up front; here a volume ``[C, D, H, W]`` is sliced along the
  run's axis (:mod:`raylearn.units`) and every slice is zero-padded to a multiple of the backbone's stride.
- The paper (and its code) uses an ImageNet-pretrained ResNet-50 up to ``layer3`` (``D = 1024``, key 128,
  value 512) and binary masks with a sigmoid. Here ``backbone: resnet50`` builds the same torchvision layers with
  no downloaded weights (nothing downloads here), and the default ``backbone: small`` is a 4-stage conv net with
  GroupNorm (``D = 8 * width``, stride 8) that trains on 2 CPU cores; labels are ``K``-class with a softmax,
  stage 2's binary cross-entropy becomes cross-entropy, and the focal loss is MONAI's ``FocalLoss`` (the authors'
  ``alpha = 0.6`` is a constant factor of the loss there, which Adam ignores; MONAI's ``alpha`` would instead
  re-weight classes, so it is off by default).
- The code trains up to 100 epochs per stage with early stopping on a validation split; here a fixed number of
  optimiser steps per stage (``stage1_steps``, ``stage2_steps``), so a round's cost is bounded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "BACKBONES",
    "StarNet",
    "cosine_to_memory",
    "build_star_net",
    "memory_read",
    "pad_slices",
    "slice_entropy",
]

BACKBONES = ("small", "resnet18", "resnet50")


class _SmallEncoder(nn.Module):
    """Four conv stages (strides 1, 2, 2, 2) with GroupNorm: ``r2`` 2w ch at 1/2, ``r3`` 4w at 1/4, ``r4`` 8w at 1/8."""

    stride = 8

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.GroupNorm(min(8, cout), cout),
                nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.GroupNorm(min(8, cout), cout), nn.ReLU(inplace=True),
            )

        self.stem = block(in_channels, width, 1)
        self.s2, self.s3, self.s4 = block(width, 2 * width, 2), block(2 * width, 4 * width, 2), block(
            4 * width, 8 * width, 2)
        self.channels = (8 * width, 4 * width, 2 * width)  # r4, r3, r2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r2 = self.s2(self.stem(x))
        r3 = self.s3(r2)
        return self.s4(r3), r3, r2


class _ResNetEncoder(nn.Module):
    """torchvision ResNet up to ``layer3`` (the paper's cut): ``r2`` = layer1 (1/4), ``r3`` = layer2 (1/8),
    ``r4`` = layer3 (1/16; 1024 channels for ResNet-50). Randomly initialised: no weights are downloaded."""

    stride = 16

    def __init__(self, in_channels: int, arch: str) -> None:
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None)
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        exp = 4 if arch == "resnet50" else 1
        self.channels = (256 * exp, 128 * exp, 64 * exp)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r2 = self.layer1(self.stem(x))
        r3 = self.layer2(r2)
        return self.layer3(r3), r3, r2


class _ResBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(dim, dim, 3, padding=1), nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class _Refine(nn.Module):
    """Skip features at a finer scale + the upsampled coarser decoder state (the STM decoder's refine step)."""

    def __init__(self, skip_channels: int, dim: int) -> None:
        super().__init__()
        self.conv, self.res_skip, self.res_out = nn.Conv2d(skip_channels, dim, 3, padding=1), _ResBlock(dim), \
            _ResBlock(dim)

    def forward(self, skip: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        s = self.res_skip(self.conv(skip))
        return self.res_out(s + F.interpolate(coarse, size=s.shape[2:], mode="bilinear", align_corners=False))


class _Decoder(nn.Module):
    def __init__(self, in_dim: int, r3_ch: int, r2_ch: int, dim: int, num_classes: int) -> None:
        super().__init__()
        self.conv_in, self.res = nn.Conv2d(in_dim, dim, 3, padding=1), _ResBlock(dim)
        self.ref3, self.ref2 = _Refine(r3_ch, dim), _Refine(r2_ch, dim)
        self.pred = nn.Conv2d(dim, num_classes, 3, padding=1)

    def forward(self, m4: torch.Tensor, r3: torch.Tensor, r2: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        m = self.ref2(r2, self.ref3(r3, self.res(self.conv_in(m4))))
        return F.interpolate(self.pred(F.relu(m)), size=tuple(size), mode="bilinear", align_corners=False)


def memory_read(
    q_key: torch.Tensor, m_key: torch.Tensor, m_value: torch.Tensor, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """Spatial cross-attention from query slices to memory (labelled) slices.

    Every query position attends over all positions of the memory slices it is allowed to see:
    ``softmax_j(k_m[j] . k_q[i] / sqrt(Kd))`` over the ``M * h * w`` memory positions, then a weighted sum of the
    memory values.

    Args:
        q_key: ``[U, Kd, h, w]`` keys of the query slices.
        m_key: ``[M, Kd, h, w]`` keys of the memory slices.
        m_value: ``[M, Vd, h, w]`` values of the memory slices.
        allowed: ``bool [U, M]``, which memory slices each query may attend to (its group's labelled slices);
            None = all. Every row needs at least one True.

    Returns:
        ``[U, Vd, h, w]`` the memory read-out for each query slice.
    """
    u, kd, h, w = q_key.shape
    m = m_key.shape[0]
    if m_key.shape[1:] != (kd, h, w) or m_value.shape[0] != m or m_value.shape[2:] != (h, w):
        raise ValueError(f"memory_read: keys {tuple(q_key.shape)} / {tuple(m_key.shape)} and values "
                         f"{tuple(m_value.shape)} do not match ([U, Kd, h, w], [M, Kd, h, w], [M, Vd, h, w])")
    mk = m_key.permute(0, 2, 3, 1).reshape(m * h * w, kd)  # [Mhw, Kd]
    qk = q_key.reshape(u, kd, h * w)  # [U, Kd, hw]
    logits = torch.einsum("jc,uci->uji", mk, qk) / float(kd) ** 0.5  # [U, Mhw, hw]
    if allowed is not None:
        allowed = torch.as_tensor(allowed, dtype=torch.bool, device=q_key.device)
        if allowed.shape != (u, m):
            raise ValueError(f"memory_read: allowed must be bool [{u}, {m}], got {tuple(allowed.shape)}")
        if not bool(allowed.any(dim=1).all()):
            raise ValueError("memory_read: a query slice is allowed no memory slice")
        pos_ok = allowed.repeat_interleave(h * w, dim=1)  # [U, Mhw]
        logits = logits.masked_fill(~pos_ok[:, :, None], float("-inf"))
    p = torch.softmax(logits, dim=1)
    mv = m_value.permute(0, 2, 3, 1).reshape(m * h * w, -1)  # [Mhw, Vd]
    return torch.einsum("jv,uji->uvi", mv, p).reshape(u, -1, h, w)


def slice_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel entropy (nats) of each slice's class probabilities: ``[U, K, H, W]`` -> ``[U]``."""
    if probs.ndim != 4:
        raise ValueError(f"slice_entropy expects probabilities [U, K, H, W], got shape {tuple(probs.shape)}")
    p = probs.clamp_min(1e-12)
    return -(p * p.log()).sum(dim=1).mean(dim=(1, 2))


def cosine_to_memory(feat_u: torch.Tensor, feat_m: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cosine similarity of each query slice's features to its allowed memory slices' features.

    As the authors' code: cosine over channels at each position, averaged over positions and memory slices.

    Args:
        feat_u: ``[U, F, h, w]`` query slice features.
        feat_m: ``[M, F, h, w]`` memory slice features.
        allowed: ``bool [U, M]`` (None = all).

    Returns:
        ``[U]`` mean cosine similarity in ``[-1, 1]``.
    """
    if feat_u.ndim != 4 or feat_m.ndim != 4 or feat_u.shape[1:] != feat_m.shape[1:]:
        raise ValueError(f"cosine_to_memory: features {tuple(feat_u.shape)} and {tuple(feat_m.shape)} must be "
                         "[U, F, h, w] and [M, F, h, w]")
    a = F.normalize(feat_u.flatten(2), dim=1)  # [U, F, hw]
    b = F.normalize(feat_m.flatten(2), dim=1)  # [M, F, hw]
    sim = torch.einsum("ufi,mfi->umi", a, b).mean(dim=2)  # [U, M]
    if allowed is None:
        return sim.mean(dim=1)
    allowed = torch.as_tensor(allowed, dtype=sim.dtype, device=sim.device)
    return (sim * allowed).sum(dim=1) / allowed.sum(dim=1).clamp_min(1.0)


class StarNet(nn.Module):
    """STAR's propagation network (see the module docstring).

    Args:
        in_channels: image channels ``C_in``.
        num_classes: classes ``K`` including background.
        backbone: ``small`` (default, CPU), ``resnet18`` or ``resnet50`` (the paper's; torchvision, random init).
        width: ``small`` only: base channels ``w`` (``D = 8 w``).
        decoder_dim: decoder channels (the paper's code: 256).
    """

    def __init__(self, *, in_channels: int = 1, num_classes: int = 2, backbone: str = "small", width: int = 16,
                 decoder_dim: int = 64) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"StarNet: backbone must be one of {', '.join(BACKBONES)}, got {backbone!r}")
        for name, v, low in (("in_channels", in_channels, 1), ("num_classes", num_classes, 2), ("width", width, 2),
                             ("decoder_dim", decoder_dim, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"StarNet: {name} must be an integer >= {low}, got {v!r}")

        def encoder(cin: int) -> nn.Module:
            return _SmallEncoder(cin, width) if backbone == "small" else _ResNetEncoder(cin, backbone)

        self.in_channels, self.num_classes, self.backbone = in_channels, num_classes, backbone
        self.enc_u, self.enc_l = encoder(in_channels), encoder(in_channels + num_classes)
        d, c3, c2 = self.enc_u.channels
        self.feature_dim, self.key_dim, self.value_dim = d, d // 8, d // 2
        self.stride = self.enc_u.stride

        def key_value() -> nn.ModuleDict:  # key D/8, value D/2 channels (the paper's 128 / 512 of D = 1024)
            return nn.ModuleDict({"key": nn.Conv2d(d, d // 8, 3, padding=1),
                                  "value": nn.Conv2d(d, d // 2, 3, padding=1)})

        self.kv_u, self.kv_l = key_value(), key_value()
        self.decoder = _Decoder(2 * (d // 2), c3, c2, decoder_dim, num_classes)

    def _check(self, x: torch.Tensor, channels: int, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"StarNet.{what}: expected [B, {channels}, H, W], got {tuple(x.shape)}")
        if x.shape[2] % self.stride or x.shape[3] % self.stride:
            raise ValueError(f"StarNet.{what}: H, W {tuple(x.shape[2:])} must be multiples of {self.stride} "
                             "(pad the slices, see pad_slices)")

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Stage-1 segmentation of single slices: ``[B, C_in, H, W]`` -> logits ``[B, K, H, W]``."""
        self._check(x, self.in_channels, "segment")
        r4, r3, r2 = self.enc_u(x)
        return self.decoder(r4, r3, r2, x.shape[2:])

    def memorize(self, x: torch.Tensor, onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys ``[M, D/8, h, w]`` and values ``[M, D/2, h, w]`` of labelled slices ``x [M, C_in, H, W]`` with
        their one-hot labels ``[M, K, H, W]``."""
        xl = torch.cat([x, onehot.to(x.dtype)], dim=1)
        self._check(xl, self.in_channels + self.num_classes, "memorize")
        r4 = self.enc_l(xl)[0]
        return self.kv_l["key"](r4), self.kv_l["value"](r4)

    def propagate(self, x: torch.Tensor, m_key: torch.Tensor, m_value: torch.Tensor,
                  allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Pseudo-label logits ``[U, K, H, W]`` of unlabelled slices ``x [U, C_in, H, W]`` from the memory of
        :meth:`memorize`; ``allowed bool [U, M]`` restricts each slice to its group's labelled slices."""
        self._check(x, self.in_channels, "propagate")
        r4, r3, r2 = self.enc_u(x)
        read = memory_read(self.kv_u["key"](r4), m_key, m_value, allowed)
        return self.decoder(torch.cat([read, self.kv_u["value"](r4)], dim=1), r3, r2, x.shape[2:])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``f_U``'s multi-scale features for the similarity query (the authors' concatenation): ``r4`` and ``r3``
        upsampled to ``r2``'s grid and ``r2``, ``[B, D + c3 + c2, H/s2, W/s2]``."""
        self._check(x, self.in_channels, "features")
        r4, r3, r2 = self.enc_u(x)
        size = r2.shape[2:]
        up = [F.interpolate(r, size=size, mode="bilinear", align_corners=False) for r in (r4, r3)]
        return torch.cat([*up, r2], dim=1)

    def init_label_encoder(self) -> None:
        """Copy ``f_U``'s weights into ``f_L`` (as the authors' code before each stage 2): every tensor of equal
        shape; the first convolution's image channels (its label channels keep their values)."""
        src, dst = self.enc_u.state_dict(), self.enc_l.state_dict()
        for k, v in src.items():
            if dst[k].shape == v.shape:
                dst[k] = v.clone()
            elif dst[k].ndim == 4 and dst[k].shape[1] == self.in_channels + self.num_classes:
                dst[k][:, : self.in_channels] = v
        self.enc_l.load_state_dict(dst)


def pad_slices(x: np.ndarray, multiple: int) -> np.ndarray:
    """Zero-pad the last two axes of ``x [..., H, W]`` up to multiples of ``multiple`` (bottom/right)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not ph and not pw:
        return x
    return np.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, ph), (0, pw)])


def build_star_net(num_classes: int, in_channels: int = 1, backbone: Literal["small", "resnet18", "resnet50"] = "small",
                   width: int = 16, decoder_dim: int | None = None) -> StarNet:
    """A :class:`StarNet` with the decoder width of the paper's code (256) for ResNets and 4 w for ``small``."""
    dim = decoder_dim if decoder_dim is not None else (256 if backbone != "small" else 4 * width)
    return StarNet(in_channels=in_channels, num_classes=num_classes, backbone=backbone, width=width, decoder_dim=dim)
