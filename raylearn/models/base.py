"""The small interface every segmentation backend implements.

Shapes: an image is ``float32 [C, D, H, W]`` (channels first, preprocessed grid); probabilities are
``float32 [K, D, H, W]`` with ``K`` classes including background; a label map is ``uint8 [D, H, W]``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np


class Segmenter(ABC):
    """A trained 3D segmenter: predicts class probabilities (optionally MC-dropout or flip-TTA samples), embeds an
    image as a feature vector, and saves/loads itself as one checkpoint file.

    Training is not part of this interface: :mod:`raylearn.train` fine-tunes each round's model (Ray Train) and
    writes a checkpoint, which :func:`raylearn.models.loading.load_segmenter` turns back into a ``Segmenter``.
    Backends: :class:`raylearn.models.unet.MonaiSegmenter` (default) and
    :class:`raylearn.models.nnunet_segmenter.NnUNetSegmenter` (nnU-Net v2).
    """

    #: number of output classes including background
    num_classes: int
    #: number of input channels
    in_channels: int

    @abstractmethod
    def predict_proba(self, image: np.ndarray) -> np.ndarray:
        """Class probabilities. ``image [C,D,H,W] -> probs [K,D,H,W]`` (float32, sums to 1 over K)."""

    def predict_mc(self, image: np.ndarray, n_samples: int, seed: int = 0) -> np.ndarray:
        """MC-dropout samples ``[T,K,D,H,W]``. Backends without dropout raise ``NotImplementedError``."""
        raise NotImplementedError(f"{type(self).__name__} has no MC-dropout sampling")

    def predict_tta(self, image: np.ndarray, flips: Sequence[tuple[int, ...]] | None = None) -> np.ndarray:
        """Flip test-time augmentation: probabilities per flip, mapped back, ``[A,K,D,H,W]``."""
        flips = list(flips) if flips is not None else [(), (1,), (2,), (3,)]
        out = []
        for axes in flips:
            x = np.flip(image, axis=axes).copy() if axes else image
            p = self.predict_proba(x)
            out.append(np.flip(p, axis=axes).copy() if axes else p)
        return np.stack(out)

    def predict_heads(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """SBC-AL outputs ``(coarse [K,D,H,W], sfp [K-1,D,H,W], refined [K,D,H,W])``; only networks with SFP and
        ASR heads (``model.arch: sbc_unet``) have them, others raise ``NotImplementedError``."""
        raise NotImplementedError(f"{type(self).__name__} has no SFP/ASR heads")

    def embed(self, image: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """A global feature vector ``[F]`` for the image (e.g. pooled bottleneck features)."""
        raise NotImplementedError(f"{type(self).__name__} has no embedding")

    def predict_label(self, image: np.ndarray) -> np.ndarray:
        """Arg-max label map ``[D,H,W]`` (uint8)."""
        return np.argmax(self.predict_proba(image), axis=0).astype(np.uint8)

    @abstractmethod
    def save(self, path: str | Path) -> Path:
        """Write a checkpoint that :meth:`load` restores exactly; returns the path written."""

    @classmethod
    @abstractmethod
    def load(cls, path: str | Path) -> Segmenter:
        """Restore a segmenter written by :meth:`save`."""


def read_torch_file(path: str | Path, what: str = "checkpoint"):
    """``torch.load`` a checkpoint file on the CPU, with errors that name the file.

    Raises:
        FileNotFoundError: when ``path`` is not a file.
        ValueError: when it cannot be unpickled.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ValueError(f"{path}: not a readable torch {what} ({type(err).__name__}: {err})") from None
