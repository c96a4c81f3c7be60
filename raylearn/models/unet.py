"""MONAI 3D U-Net backend: network construction, sliding-window inference, MC dropout, embeddings, checkpoints.

Training helpers (patch sampling, loss, schedule, epoch loop, validation) live in
:mod:`raylearn.models.training`; Ray Train drives them from :mod:`raylearn.train`.

Shapes: an image is ``float32 [C, D, H, W]``; probabilities ``float32 [K, D, H, W]``; a label map
``uint8 [D, H, W]``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raylearn.config import ConfigError, parse_config
from raylearn.models.base import Segmenter, read_torch_file
from raylearn.models.config import ModelConfig

__all__ = ["CHECKPOINT_FORMAT", "MonaiSegmenter", "build_network", "bottleneck_module", "default_device"]

logger = logging.getLogger(__name__)

#: tag stored in every checkpoint written by :meth:`MonaiSegmenter.save`
CHECKPOINT_FORMAT = "raylearn.monai_segmenter/1"


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_network(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    """The MONAI network described by ``cfg``: ``[B, in_channels, D, H, W] -> logits [B, num_classes, D, H, W]``."""
    from monai.networks.nets import DynUNet, UNet

    if cfg.arch in ("unet", "sbc_unet"):
        unet = UNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=num_classes,
            channels=tuple(cfg.channels),
            strides=tuple(cfg.strides),
            kernel_size=cfg.kernel_size,
            up_kernel_size=cfg.kernel_size,
            num_res_units=cfg.num_res_units,
            norm=cfg.norm,
            dropout=cfg.train_dropout,  # a float even at 0: the dropout layers exist for MC sampling
        )
        if cfg.arch == "unet":
            return unet
        from raylearn.models.sbc import SBCUNet

        return SBCUNet(unet, cfg.channels, num_classes, head_channels=cfg.sbc.head_channels, norm=cfg.norm,
                       output=cfg.sbc.output, head_resolution=cfg.sbc.head_resolution)
    n = len(cfg.channels)
    return DynUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=num_classes,
        kernel_size=[cfg.kernel_size] * n,
        strides=[1, *cfg.strides],
        upsample_kernel_size=list(cfg.strides),
        filters=list(cfg.channels),
        dropout=cfg.train_dropout,
        norm_name=cfg.norm,
        res_block=cfg.num_res_units > 0,
    )


def bottleneck_module(net: nn.Module) -> nn.Module:
    """The deepest block of a MONAI ``UNet`` or ``DynUNet`` (its output is the bottleneck feature map)."""
    from monai.networks.layers.simplelayers import SkipConnection

    net = getattr(net, "module", net)  # unwrap DistributedDataParallel
    net = getattr(net, "unet", net)  # the U-Net inside an SBC U-Net (raylearn.models.sbc)
    if hasattr(net, "bottleneck"):  # DynUNet
        return net.bottleneck
    seq = net.model  # UNet: Sequential(down, SkipConnection(Sequential(down, SkipConnection(...), up)), up)
    while True:
        skip = seq[1]
        if not isinstance(skip, SkipConnection):
            raise TypeError(f"unexpected MONAI UNet layout at {type(skip).__name__}")
        sub = skip.submodule
        if isinstance(sub, nn.Sequential) and len(sub) == 3 and isinstance(sub[1], SkipConnection):
            seq = sub
            continue
        return sub


class _StopForward(Exception):
    """Raised by the embedding hook to skip the decoder once the bottleneck is computed."""

    def __init__(self, features: torch.Tensor):
        super().__init__("bottleneck reached")
        self.features = features


class MonaiSegmenter(Segmenter):
    """A MONAI UNet/DynUNet segmenter with sliding-window inference.

    Args:
        cfg: network and inference settings (``backend`` must be ``"monai_unet"``).
        in_channels: image channels ``C``.
        num_classes: output classes ``K`` including background.
        seed: seeds the weight initialisation (deterministic network for a seed).
        device: torch device; default CUDA when available, else CPU.
    """

    def __init__(
        self,
        cfg: ModelConfig | None = None,
        in_channels: int = 1,
        num_classes: int = 2,
        seed: int = 0,
        device: str | torch.device | None = None,
    ):
        self.cfg = cfg if cfg is not None else ModelConfig()
        if self.cfg.backend != "monai_unet":
            raise ConfigError(f"model.backend: MonaiSegmenter needs 'monai_unet', got {self.cfg.backend!r}")
        if in_channels < 1 or num_classes < 2:
            raise ValueError(f"need in_channels >= 1 and num_classes >= 2, got {in_channels} and {num_classes}")
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.device = torch.device(device) if device is not None else default_device()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.network = build_network(self.cfg, self.in_channels, self.num_classes)
        self.network.to(self.device).eval()

    # ------------------------------------------------------------------ inference
    def window(self, spatial_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """The inference window: ``patch_size``, or with ``patch_size: auto`` the image padded to the stride."""
        if self.cfg.patch_size != "auto":
            return tuple(int(p) for p in self.cfg.patch_size)
        f = self.cfg.stride_factor
        return tuple(-(-int(s) // f) * f for s in spatial_shape[-3:])

    def inferer(self, spatial_shape: tuple[int, ...] | None = None):
        """MONAI sliding-window inferer over ``window(spatial_shape)`` windows, gaussian (or constant) blending.

        With a fixed ``patch_size`` the shape is not needed; with ``auto`` it is (one window covers the image).
        """
        from monai.inferers import SlidingWindowInferer

        if self.cfg.patch_size == "auto" and spatial_shape is None:
            raise ValueError("patch_size is 'auto': pass the image's spatial shape to inferer()")
        return SlidingWindowInferer(
            roi_size=self.window(spatial_shape or ()),
            sw_batch_size=self.cfg.sw_batch_size,
            overlap=self.cfg.sw_overlap,
            mode=self.cfg.sw_mode,
            padding_mode="constant",
        )

    def _as_input(self, image: np.ndarray) -> torch.Tensor:
        """Validate ``image [C,D,H,W]`` and return a ``[1,C,D,H,W]`` float32 tensor on the device."""
        arr = np.asarray(image)
        if arr.ndim != 4 or arr.shape[0] != self.in_channels:
            raise ValueError(f"image must be [C={self.in_channels}, D, H, W], got shape {tuple(arr.shape)}")
        return torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))[None].to(self.device)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.inferer(tuple(x.shape[2:]))(x, self.network)

    def predict_proba(self, image: np.ndarray) -> np.ndarray:
        """Softmax probabilities ``float32 [K, D, H, W]`` (sums to 1 over K) by sliding-window inference."""
        x = self._as_input(image)
        self.network.eval()
        with torch.no_grad():
            probs = torch.softmax(self._logits(x).float(), dim=1)[0]
        return probs.cpu().numpy().astype(np.float32, copy=False)

    def predict_heads(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """SBC-AL's three outputs by sliding-window inference (``model.arch: sbc_unet`` only).

        Returns:
            ``(coarse [K,D,H,W], sfp [K-1,D,H,W], refined [K,D,H,W])`` float32: the U-Net's softmax, the SFP head's
            normalised signed distance maps (in ``[-1, 1]``) and the ASR module's softmax.
        """
        if self.cfg.arch != "sbc_unet":
            raise NotImplementedError(f"model.arch {self.cfg.arch!r} has no SFP/ASR heads; use model.arch: sbc_unet")
        x = self._as_input(image)
        self.network.eval()
        with torch.no_grad():
            coarse, sfp, refined = self.inferer(tuple(x.shape[2:]))(x, self.network, heads=True)
            coarse, refined = (torch.softmax(t.float(), dim=1)[0].cpu().numpy() for t in (coarse, refined))
        return coarse, sfp.float()[0].cpu().numpy(), refined

    def predict_mc(self, image: np.ndarray, n_samples: int, seed: int = 0) -> np.ndarray:
        """MC-dropout samples ``float32 [T, K, D, H, W]``: dropout active at ``model.mc_dropout``, normalisation
        in eval mode.

        The sampling probability is set apart from the training dropout (``model.dropout``, often 0 for
        strategies that never sample). Deterministic for a ``seed``; the global torch RNG is left untouched.
        Raises ``NotImplementedError`` when the network has no dropout layers (DynUNet built without dropout).
        """
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        drops = [m for m in self.network.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
        if not drops:
            raise NotImplementedError("this network has no dropout layers: MC dropout needs model.arch 'unet' "
                                      "or a DynUNet with model.dropout > 0")
        x = self._as_input(image)
        self.network.eval()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        out = []
        trained_p = [m.p for m in drops]
        try:
            for m in drops:
                m.p = float(self.cfg.mc_dropout)
                m.train()
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                torch.manual_seed(seed)
                for _ in range(n_samples):
                    out.append(torch.softmax(self._logits(x).float(), dim=1)[0].cpu())
        finally:
            for m, p in zip(drops, trained_p, strict=True):
                m.p = p
            self.network.eval()
        return torch.stack(out).numpy().astype(np.float32, copy=False)

    def embed(self, image: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """Globally pooled bottleneck features ``float32 [F]`` (``F = channels[-1]``).

        The whole image (zero-padded to a multiple of the total down-sampling) goes through the encoder;
        the decoder is skipped. Pooling is a mean over the bottleneck cells covering the image (padding excluded);
        with ``weights [D, H, W]`` (e.g. a voxel uncertainty map, >= 0) it is a weighted mean, the weights
        zero-padded like the image and area-averaged to the bottleneck grid
        (:func:`raylearn.scoring.reduce.weighted_pool`); all-zero weights fall back to the plain mean.
        """
        from raylearn.scoring.reduce import weighted_pool

        x = self._as_input(image)
        factor = int(np.prod(self.cfg.strides))
        pads = [(-s) % factor for s in x.shape[2:]]
        x = F.pad(x, [0, pads[2], 0, pads[1], 0, pads[0]])
        block = bottleneck_module(self.network)

        def hook(_module, _inp, output):
            raise _StopForward(output)

        handle = block.register_forward_hook(hook)
        self.network.eval()
        try:
            with torch.no_grad():
                self.network(x)
            raise RuntimeError("bottleneck hook did not fire")  # pragma: no cover
        except _StopForward as stop:
            feats = stop.features.float()[0]  # [F, d, h, w]
        finally:
            handle.remove()
        shape = tuple(np.asarray(image).shape[1:])
        w = np.ones(shape, np.float32) if weights is None else np.asarray(weights, dtype=np.float32)
        if w.shape != shape:
            raise ValueError(f"weights must be [D, H, W] = {shape}, got {w.shape}")
        if not w.any():
            w = np.ones(shape, np.float32)
        # the zero padding gets weight 0, so plain pooling averages over the image itself
        w = np.pad(w, [(0, p) for p in pads])
        return weighted_pool(feats.cpu().numpy(), w)

    # ------------------------------------------------------------------ weights and checkpoints
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The network weights (CPU tensors)."""
        return {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Load network weights; a ``module.`` prefix (from DDP) is stripped. Mismatches raise ``ValueError``."""
        state = {k.removeprefix("module."): v for k, v in state.items()}
        try:
            self.network.load_state_dict(state, strict=strict)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[:3]
            raise ValueError("checkpoint weights do not fit this network: " + " | ".join(first)) from None

    def to_checkpoint(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The in-memory checkpoint dictionary :meth:`save` writes."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model_config": self.cfg.model_dump(mode="json"),
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "state_dict": self.state_dict(),
            "extra": dict(extra or {}),
        }

    def save(self, path: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
        """Write a single-file checkpoint (config + weights + shapes); returns the path written."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.to_checkpoint(extra), tmp)
        tmp.replace(path)
        return path

    @staticmethod
    def read_checkpoint(path: str | Path) -> dict[str, Any]:
        """Read and validate a checkpoint file written by :meth:`save` (raises ``ValueError`` naming the file)."""
        path = Path(path)
        ckpt = read_torch_file(path)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: not a raylearn MONAI checkpoint (expected format {CHECKPOINT_FORMAT!r})")
        missing = [k for k in ("model_config", "in_channels", "num_classes", "state_dict") if k not in ckpt]
        if missing:
            raise ValueError(f"{path}: checkpoint lacks keys {missing}")
        return ckpt

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping[str, Any], device: str | torch.device | None = None) -> MonaiSegmenter:
        """Rebuild a segmenter from a checkpoint dictionary (see :meth:`to_checkpoint`)."""
        cfg = parse_config(ckpt["model_config"], ModelConfig, source="checkpoint model_config")
        seg = cls(cfg, in_channels=int(ckpt["in_channels"]), num_classes=int(ckpt["num_classes"]), device=device)
        seg.load_state_dict(ckpt["state_dict"])
        return seg

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> MonaiSegmenter:
        """Restore a segmenter written by :meth:`save` (identical predictions)."""
        return cls.from_checkpoint(cls.read_checkpoint(path), device=device)

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.network.parameters())
        return (
            f"MonaiSegmenter(arch={self.cfg.arch}, channels={list(self.cfg.channels)}, in_channels={self.in_channels}, "
            f"num_classes={self.num_classes}, params={n}, device={self.device})"
        )
