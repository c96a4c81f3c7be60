"""CSAL-3D's self-supervised 3D pretext model: masked-patch inpainting + rotation classification + cross-view
consistency, and what the cold start reads from it (reconstruction-variance uncertainty, latent features).

Checked against HiLab-git/CSAL-3D (commit e91b607): ``network_training/TrainerV2_Recon.py`` (two rotated,
masked copies; each also seen in a random permuted view whose reconstruction is permuted back; losses
``Loss_V2`` = rotation cross-entropy + MSE reconstruction / mask ratio, twice (original and permuted views),
plus ``MutualLoss`` = MSE between the permuted-view and original-view reconstructions / mask ratio),
``models/SSL_Head.py`` (SwinViT encoder + rotation head + upsampling decoder) and
``inference/FeatureExtracter_v2.py`` (uncertainty from 9 reconstructions, features = encoder's last stage,
global average pooled, then ``AdaptiveAvgPool1d(256)``). Differences, on purpose: the rotation head reads the
globally pooled latent (the authors' head reads the first token); rotations are the 3 used at inference
(0, 90, 180 degrees; 3 classes); the 9 reconstructions are all aligned to the un-rotated frame (the authors'
code aligns the third rotation with the second's angle, a slip); the volume is covered by sliding cubic windows.

Encoders (``encoder``): ``light`` (a small strided CNN for CPU) or ``swin_unetr`` (MONAI's SwinUNETR
transformer, the paper's; patch a multiple of 32, at least 64).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from raylearn.config import StrictModel
from raylearn.scoring.coldstart import VIEW_PERMUTATIONS, reconstruction_variance, window_starts

__all__ = ["Csal3dParams", "PretextNet", "mask_patches", "pretext_loss", "case_features", "N_ROT"]

#: rotations used by the pretext task and the uncertainty (quarter turns in the (Y, Z) plane)
N_ROT = 3


class Csal3dParams(StrictModel):
    """Settings of the CSAL-3D extractor (``urds``'s ``extractor:`` parameter); they key its cache.

    Attributes:
        encoder: ``light`` (CPU) or ``swin_unetr`` (the paper's).
        channels: widths of the light encoder's 3 stride-2 stages.
        feature_size: SwinUNETR's embedding size (48 in the paper).
        patch: cubic crop / window edge in voxels (a multiple of 8; of 32 and at least 64 for ``swin_unetr``).
        mask_ratio: share of masked cells (0.3 in the paper).
        mask_cell: masked cell edge in voxels.
        steps: optimiser steps of the pretext training; batch_size: crops per step and worker.
        lr: Adam learning rate. num_workers: Ray Train workers. use_gpu: train on GPUs.
        overlap: sliding-window overlap used for the uncertainty (the stride adapts to each volume).
        embed_dim: length of the feature vector (the latent pooled as the authors do, ``AdaptiveAvgPool1d``).
        seed: seed of initialisation, crops, masks.
    """

    encoder: Literal["light", "swin_unetr"] = "light"
    channels: tuple[int, int, int] = (16, 32, 64)
    feature_size: int = Field(48, ge=12)
    patch: int = Field(32, ge=8)
    mask_ratio: float = Field(0.3, gt=0, lt=1)
    mask_cell: int = Field(4, ge=1)
    steps: int = Field(300, ge=1)
    batch_size: int = Field(2, ge=1)
    lr: float = Field(1e-3, gt=0)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    overlap: float = Field(0.5, ge=0, lt=1)
    embed_dim: int = Field(256, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> Csal3dParams:
        mult = 32 if self.encoder == "swin_unetr" else 8
        if self.patch % mult:
            raise ValueError(f"patch: must be a multiple of {mult} for encoder {self.encoder}, got {self.patch}")
        if self.encoder == "swin_unetr" and self.patch < 64:  # its last stage is patch/32 a side; the decoder's
            # instance norm needs more than one voxel there (the paper's patch is 96)
            raise ValueError(f"patch: must be at least 64 for encoder swin_unetr (its deepest features are "
                             f"patch/32 voxels a side), got {self.patch}")
        if self.patch % self.mask_cell:
            raise ValueError(f"mask_cell: must divide patch ({self.patch}), got {self.mask_cell}")
        return self


class _Light(nn.Module):
    def __init__(self, in_ch: int, channels: tuple[int, int, int]) -> None:
        super().__init__()
        layers, c = [], in_ch
        for w in channels:
            layers += [nn.Conv3d(c, w, 3, stride=2, padding=1), nn.InstanceNorm3d(w, affine=True), nn.LeakyReLU(),
                       nn.Conv3d(w, w, 3, padding=1), nn.InstanceNorm3d(w, affine=True), nn.LeakyReLU()]
            c = w
        self.net = nn.Sequential(*layers)
        self.out_dim = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Swin(nn.Module):
    def __init__(self, in_ch: int, feature_size: int) -> None:
        super().__init__()
        from monai.networks.nets.swin_unetr import SwinTransformer

        self.vit = SwinTransformer(in_chans=in_ch, embed_dim=feature_size, window_size=(7, 7, 7),
                                   patch_size=(2, 2, 2), depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24),
                                   spatial_dims=3)
        self.out_dim = feature_size * 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x.contiguous())[4]


class PretextNet(nn.Module):
    """Encoder + rotation head + reconstruction decoder.

    ``forward(x [B, C, P, P, P]) -> (rotation logits [B, 3], reconstruction [B, C, P, P, P], latent [B, F, p, p, p])``.
    """

    def __init__(self, params: Csal3dParams, in_channels: int = 1) -> None:
        super().__init__()
        self.params = params
        self.encoder = _Light(in_channels, params.channels) if params.encoder == "light" else \
            _Swin(in_channels, params.feature_size)
        dim = self.encoder.out_dim
        self.rotation_head = nn.Linear(dim, N_ROT)
        n_up = 3 if params.encoder == "light" else 5
        ups, c = [], dim
        for _ in range(n_up):  # the authors' "vae" decoder: conv, norm, LeakyReLU, trilinear x2
            w = max(c // 2, 8)
            ups += [nn.Conv3d(c, w, 3, padding=1), nn.InstanceNorm3d(w, affine=True), nn.LeakyReLU(),
                    nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)]
            c = w
        ups.append(nn.Conv3d(c, in_channels, 1))
        self.decoder = nn.Sequential(*ups)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return self.rotation_head(z.mean(dim=(2, 3, 4))), self.decoder(z), z


def mask_patches(x: torch.Tensor, cell: int, ratio: float,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero a random ``ratio`` of the ``cell``-sized cubes of each sample.

    Args:
        x: ``[B, C, P, P, P]`` with ``P % cell == 0``.

    Returns:
        ``(masked x, mask bool [B, 1, P, P, P])`` (True = masked).
    """
    b, _, *sp = x.shape
    grid = [s // cell for s in sp]
    n = int(np.prod(grid))
    k = max(1, int(round(ratio * n)))
    scores = torch.rand((b, n), generator=generator, device="cpu")
    idx = scores.argsort(dim=1)[:, :k]
    m = torch.zeros((b, n), dtype=torch.bool)
    m.scatter_(1, idx, True)
    m = m.view(b, 1, *grid)
    for ax in range(2, 5):
        m = m.repeat_interleave(cell, dim=ax)
    m = m.to(x.device)
    return x.masked_fill(m, 0.0), m


def _rot(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.rot90(x, k, dims=(-2, -1))


def _perm(x: torch.Tensor, view: int) -> torch.Tensor:
    return x.permute(*VIEW_PERMUTATIONS[view])


def pretext_loss(model: nn.Module, x: torch.Tensor, params: Csal3dParams, generator: torch.Generator
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """The pretext loss of one batch of cubic crops ``x [B, C, P, P, P]`` (one forward over 4B inputs).

    Two rotated copies ``x1, x2`` (random of the 3 rotations), each masked; each also in a random non-identity
    view, whose reconstruction is permuted back. Loss = 2 x rotation CE + MSE/ratio of the original-view
    reconstructions + MSE/ratio of the permuted-view ones + cross-view consistency MSE/ratio between the
    two reconstructions of ``x1`` (the authors' ``loss1 + loss2 + mutual_loss1``).
    """
    b = x.shape[0]
    r = torch.randint(0, N_ROT, (2, b), generator=generator)
    views = torch.randint(1, 3, (2,), generator=generator).tolist()
    xs = [torch.stack([_rot(x[i], int(r[j, i])) for i in range(b)]) for j in range(2)]
    masked = [mask_patches(xj, params.mask_cell, params.mask_ratio, generator)[0] for xj in xs]
    inp = torch.cat([masked[0], masked[1], _perm(masked[0], views[0]), _perm(masked[1], views[1])])
    logits, rec, _ = model(inp)
    rec1, rec2, rec3, rec4 = rec.split(b)
    rec3, rec4 = _perm(rec3, views[0]), _perm(rec4, views[1])
    target = torch.cat(xs)
    rots = torch.cat([r[0], r[1]]).to(x.device)
    rot_loss = F.cross_entropy(logits[: 2 * b], rots)
    ratio = params.mask_ratio
    rec_loss = F.mse_loss(torch.cat([rec1, rec2]), target) / ratio
    rec_view_loss = F.mse_loss(torch.cat([rec3, rec4]), target) / ratio
    mutual = F.mse_loss(rec3, rec1) / ratio
    loss = 2 * rot_loss + rec_loss + rec_view_loss + mutual
    parts = {"loss": loss, "rot": rot_loss, "rec": rec_loss, "rec_view": rec_view_loss, "mutual": mutual}
    return loss, {k: float(v.detach()) for k, v in parts.items()}


def _pad_to(image: np.ndarray, size: int) -> np.ndarray:
    pads = [(0, 0)] + [(0, max(0, size - s)) for s in image.shape[1:]]
    return np.pad(image, pads, mode="constant", constant_values=float(image.min())) if any(p[1] for p in pads) \
        else image


@torch.no_grad()
def case_features(model: PretextNet, image: np.ndarray, params: Csal3dParams, seed: int = 0
                  ) -> dict[str, np.ndarray]:
    """CSAL-3D's uncertainty and features of one volume.

    Each cubic window (stride adapted to the volume, :func:`window_starts`) is seen in 3 rotations x 3 views,
    each rotation with its own random mask; the 9 reconstructions are mapped back (permutation, then
    rotation) and their per-voxel variance accumulated; the score is the mean over covered voxels of the
    per-voxel mean variance. Features: the encoder's latent of the whole volume (padded to a multiple of the
    patch), globally average-pooled, then ``adaptive_avg_pool1d`` to ``embed_dim`` when longer.

    Args:
        model: a trained :class:`PretextNet` (eval mode is set here).
        image: ``float32 [C, D, H, W]``.
        params: the extractor settings.
        seed: mask seed (the case's, so the score is reproducible).

    Returns:
        ``{"csal3d_uncertainty": float32 0-d, "csal3d_embedding": float16 [F]}``.
    """
    model.eval()
    dev = next(model.parameters()).device
    p = params.patch
    img = _pad_to(np.asarray(image, dtype=np.float32), p)
    shape = img.shape[1:]
    var_sum = np.zeros(shape, dtype=np.float64)
    count = np.zeros(shape, dtype=np.int32)
    gen = torch.Generator().manual_seed(int(seed))
    starts = [window_starts(s, p, params.overlap) for s in shape]
    for z0 in starts[0]:
        for y0 in starts[1]:
            for x0 in starts[2]:
                win = torch.from_numpy(np.ascontiguousarray(img[None, :, z0:z0 + p, y0:y0 + p, x0:x0 + p])).to(dev)
                inputs = []
                for rot in range(N_ROT):
                    m, _ = mask_patches(_rot(win, rot), params.mask_cell, params.mask_ratio, gen)
                    inputs += [_perm(m, v) for v in range(3)]
                _, rec, _ = model(torch.cat(inputs))
                aligned = [_rot(_perm(rec[k: k + 1], k % 3), -(k // 3)) for k in range(len(inputs))]
                v = reconstruction_variance(torch.cat(aligned).cpu().numpy()).mean(axis=0)  # [p, p, p]
                var_sum[z0:z0 + p, y0:y0 + p, x0:x0 + p] += v
                count[z0:z0 + p, y0:y0 + p, x0:x0 + p] += 1
    orig = tuple(slice(0, s) for s in image.shape[1:])
    covered = count[orig] > 0
    score = float((var_sum[orig][covered] / count[orig][covered]).mean())
    full = _pad_to(img, p)
    full = np.pad(full, [(0, 0)] + [(0, (-s) % p) for s in full.shape[1:]], mode="edge")
    z = model.encoder(torch.from_numpy(np.ascontiguousarray(full[None])).to(dev))
    feat = z.mean(dim=(2, 3, 4))
    if feat.shape[1] > params.embed_dim:
        feat = F.adaptive_avg_pool1d(feat[:, None], params.embed_dim)[:, 0]
    return {"csal3d_uncertainty": np.asarray(score, dtype=np.float32),
            "csal3d_embedding": feat[0].cpu().numpy().astype(np.float16)}
