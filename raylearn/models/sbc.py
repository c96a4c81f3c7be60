"""SBC-AL's network (``model: {arch: sbc_unet}``): a MONAI ``UNet`` with a structure-aware feature prediction (SFP)
head and an attentional segmentation refinement (ASR) module on its decoder features, and the joint loss.

The U-Net is MONAI's own, unchanged (checkpoints of its weights keep their ``unet.`` names); a forward hook on its
top decoder block (``UNet.model[2]``, the transposed convolution that returns to full resolution) captures that
block's input, the last decoder feature map ``F [B, Cf, D/s, H/s, W/s]`` (``Cf = 2 * channels[0]``, or
``channels[0] + channels[1]`` for a 2-level net; ``s = strides[0]``). ``F`` is upsampled (trilinear) to the input
size once and feeds both heads:

- **SFP**: 4 DisBlocks (3^3 conv + norm + PReLU, MONAI ``Convolution``; ``Cf -> c -> c -> c -> c`` with
  ``c = model.sbc.head_channels`` or ``channels[0]``), then a 1^3 conv to ``K-1`` maps and ``tanh``: per foreground
  class the normalised signed distance map of :func:`raylearn.scoring.sbc.signed_distance_map` (in ``[-1, 1]``).
- **ASR**: ``h = PReLU(norm(conv3([F, softmax(coarse)])))``; a 1^3 conv + norm gives attention logits over ``h``'s
  channels, ``A = softmax(., dim=channels)`` per voxel; refined features ``h * (c * A)`` (``c`` channels, so a
  uniform attention ``A = 1/c`` leaves ``h`` as it is); a 1^3 conv to ``K`` logits added to the coarse logits
  (the module learns a correction of the coarse segmentation).

The paper (2D, no code) gives the blocks by name only; the layer widths, the upsampling point and the residual
refinement are this implementation's reading. In 3D the heads run at full resolution on the upsampled features
(``model.sbc.head_resolution: full``, the default) or, about 8x cheaper, on the decoder's half-resolution grid with
their outputs upsampled (``half``).

Outputs: in training mode (or ``forward(x, heads=True)``) the tuple ``(coarse [B,K,...], sfp [B,K-1,...],
refined [B,K,...])`` (MONAI's sliding-window inferer handles tuple outputs); in eval mode the logits selected by
``model.sbc.output`` (``refined`` by default), so every other code path (inference, MC dropout, evaluation) sees a
plain segmentation network.

Loss: ``alpha * DiceCE(coarse) + beta * MSE(sfp, signed distance maps of the label) + gamma * DiceCE(refined)``
(MONAI ``DiceCELoss``, ``torch.nn.MSELoss``); the distance targets are computed from each (augmented) label batch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ASRModule", "DisBlock", "SBCLoss", "SBCUNet", "SFPHead", "distance_targets", "top_decoder_channels"]


def top_decoder_channels(channels) -> int:
    """Channels of the feature map entering a MONAI UNet's top decoder block (skip + upsampled features)."""
    channels = list(channels)
    return 2 * channels[0] if len(channels) > 2 else channels[0] + channels[1]


class DisBlock(nn.Sequential):
    """3^3 convolution + normalisation + PReLU (MONAI ``Convolution``), ``[B, cin, ...] -> [B, cout, ...]``."""

    def __init__(self, cin: int, cout: int, norm: str = "instance") -> None:
        from monai.networks.blocks import Convolution

        super().__init__(Convolution(3, cin, cout, kernel_size=3, norm=norm, act="prelu"))


class SFPHead(nn.Module):
    """4 DisBlocks and a 1^3 projection: features ``[B, cin, ...]`` -> distance maps ``tanh [B, K-1, ...]``."""

    def __init__(self, cin: int, num_classes: int, hidden: int, norm: str = "instance", n_blocks: int = 4) -> None:
        super().__init__()
        widths = [cin] + [hidden] * n_blocks
        self.blocks = nn.Sequential(*(DisBlock(a, b, norm) for a, b in zip(widths[:-1], widths[1:], strict=True)))
        self.out = nn.Conv3d(hidden, num_classes - 1, kernel_size=1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.out(self.blocks(feats)))


class ASRModule(nn.Module):
    """Attentional refinement: features ``[B, cin, ...]`` and coarse logits ``[B, K, ...]`` -> refined logits
    ``[B, K, ...]`` (see the module docstring for the layers)."""

    def __init__(self, cin: int, num_classes: int, hidden: int, norm: str = "instance") -> None:
        super().__init__()
        from monai.networks.blocks import Convolution

        self.embed = Convolution(3, cin + num_classes, hidden, kernel_size=3, norm=norm, act="prelu")
        self.attend = Convolution(3, hidden, hidden, kernel_size=1, norm=norm, act=None)
        self.out = nn.Conv3d(hidden, num_classes, kernel_size=1)
        self.hidden = hidden

    def forward(self, feats: torch.Tensor, coarse_logits: torch.Tensor) -> torch.Tensor:
        """The correction ``[B, K, ...]`` added to the coarse logits (on the grid of ``feats``)."""
        h = self.embed(torch.cat([feats, torch.softmax(coarse_logits, dim=1)], dim=1))
        attn = torch.softmax(self.attend(h), dim=1)
        return self.out(h * (self.hidden * attn))  # uniform attention (1/c): h itself


class SBCUNet(nn.Module):
    """A MONAI ``UNet`` with SFP and ASR heads on its last decoder features (see the module docstring).

    Args:
        unet: a ``monai.networks.nets.UNet`` (3D) with ``out_channels = num_classes``.
        channels: the UNet's ``channels`` (to size the heads).
        num_classes: ``K`` including background (>= 2).
        head_channels: width of the DisBlocks and of the ASR features (None = ``channels[0]``).
        norm: ``instance`` or ``batch``.
        output: what eval-mode ``forward`` returns: ``refined`` (ASR) or ``coarse`` (U-Net) logits.
        head_resolution: ``full``: the heads run on the decoder features upsampled to the input grid; ``half``:
            on the decoder's own grid (``1 / strides[0]`` per axis, about 8x cheaper in 3D), their outputs
            (distance maps, ASR correction) upsampled trilinearly.
    """

    def __init__(self, unet: nn.Module, channels, num_classes: int, head_channels: int | None = None,
                 norm: str = "instance", output: str = "refined", head_resolution: str = "full") -> None:
        super().__init__()
        if output not in ("refined", "coarse"):
            raise ValueError(f"model.sbc.output must be 'refined' or 'coarse', got {output!r}")
        self.unet = unet
        cin = top_decoder_channels(channels)
        hidden = int(head_channels or list(channels)[0])
        self.sfp = SFPHead(cin, num_classes, hidden, norm)
        self.asr = ASRModule(cin, num_classes, hidden, norm)
        if head_resolution not in ("full", "half"):
            raise ValueError(f"model.sbc.head_resolution must be 'full' or 'half', got {head_resolution!r}")
        self.output = output
        self.head_resolution = head_resolution
        self._feats: torch.Tensor | None = None
        unet.model[2].register_forward_hook(self._capture)

    def _capture(self, _module: nn.Module, inputs: tuple, _output: torch.Tensor) -> None:
        self._feats = inputs[0]

    def forward(self, x: torch.Tensor, heads: bool | None = None):
        """``x [B, C, D, H, W]`` -> ``(coarse, sfp, refined)`` with heads, else the ``output`` logits."""
        heads = self.training if heads is None else heads
        coarse = self.unet(x)
        if not heads and self.output == "coarse":
            self._feats = None
            return coarse
        feats, self._feats = self._feats, None
        if feats is None:
            raise RuntimeError("SBCUNet: the decoder hook did not fire (not a MONAI UNet layout?)")
        size = tuple(x.shape[2:])

        def resize(t: torch.Tensor, to: tuple[int, ...]) -> torch.Tensor:
            return t if tuple(t.shape[2:]) == to else F.interpolate(t, size=to, mode="trilinear", align_corners=False)

        if self.head_resolution == "full":
            feats = resize(feats, size)
        grid = tuple(feats.shape[2:])
        refined = coarse + resize(self.asr(feats, resize(coarse, grid)), size)
        if not heads:
            return refined
        return coarse, resize(self.sfp(feats), size), refined


def distance_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """SFP regression targets: ``int labels [B, 1, D, H, W]`` -> ``float32 [B, K-1, D, H, W]`` normalised signed
    distance maps per foreground class (:func:`raylearn.scoring.sbc.signed_distance_map`), on the labels' device."""
    from raylearn.scoring.sbc import signed_distance_map

    lab = labels.detach().cpu().numpy()[:, 0]
    out = np.stack([np.stack([signed_distance_map(lab[b] == c) for c in range(1, num_classes)])
                    for b in range(lab.shape[0])])
    return torch.from_numpy(out).to(labels.device)


class SBCLoss(nn.Module):
    """``alpha * DiceCE(coarse, y) + beta * MSE(sfp, sdm(y)) + gamma * DiceCE(refined, y)``.

    ``forward(outputs, y)`` with ``outputs = (coarse [B,K,...], sfp [B,K-1,...], refined [B,K,...])`` and integer
    labels ``y [B, 1, ...]``; a plain logits tensor (a model in eval mode) gets the segmentation term only.
    The weights have no defaults here: ``model.sbc`` (:class:`raylearn.models.config.SBCConfig`) holds them.
    """

    def __init__(self, alpha: float, beta: float, gamma: float) -> None:
        super().__init__()
        from monai.losses import DiceCELoss

        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.seg = DiceCELoss(to_onehot_y=True, softmax=True)
        self.mse = nn.MSELoss()
        self.last: dict[str, float] = {}

    def forward(self, outputs, y: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.seg(outputs, y)
        coarse, sfp, refined = outputs
        l_seg = self.seg(coarse, y)
        l_sfp = self.mse(sfp.float(), distance_targets(y, coarse.shape[1]))
        l_asr = self.seg(refined, y)
        self.last = {"seg": float(l_seg.detach()), "sfp": float(l_sfp.detach()), "asr": float(l_asr.detach())}
        return self.alpha * l_seg + self.beta * l_sfp + self.gamma * l_asr
