"""``NnUNetSegmenter``: a trained nnU-Net v2 model behind the :class:`~raylearn.models.base.Segmenter` interface.

The checkpoint is one file (a *bundle*): nnU-Net's network weights plus the plans, dataset.json,
configuration and trainer name needed to rebuild the network without any nnU-Net folders. Prediction goes
through ``nnUNetPredictor.predict_single_npy_array`` (nnU-Net's own preprocessing, sliding window with
gaussian weighting, resampling back), mirroring off by default for fast pool scoring.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from raylearn.models.base import Segmenter, read_torch_file
from raylearn.scoring.reduce import area_resize, weighted_pool

__all__ = ["BUNDLE_FORMAT", "NnUNetSegmenter", "require_nnunet"]

BUNDLE_FORMAT = "raylearn.nnunet_segmenter/1"
_HINT = "the nnU-Net backend needs nnunetv2: pip install 'nnunetv2==2.8.1'"


def require_nnunet() -> None:
    """Raise ``ImportError`` with an install hint when nnunetv2 is missing."""
    try:
        import nnunetv2  # noqa: F401
    except ImportError as err:  # pragma: no cover - nnunetv2 is a declared dependency
        raise ImportError(_HINT) from err


@contextlib.contextmanager
def _quiet():
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


class NnUNetSegmenter(Segmenter):
    """Predict with a bundled nnU-Net v2 model.

    Args:
        bundle: the dictionary :meth:`bundle` writes (see :meth:`read_bundle`).
        device: torch device; default CUDA when available, else CPU.
        use_mirroring: flip test-time augmentation inside nnU-Net (default: the bundle's ``use_mirroring``).
        tile_step_size: sliding-window step as a fraction of the patch (default: the bundle's).
    """

    def __init__(
        self,
        bundle: Mapping[str, Any],
        device: str | torch.device | None = None,
        use_mirroring: bool | None = None,
        tile_step_size: float | None = None,
    ):
        require_nnunet()
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        self._bundle = dict(bundle)
        self.plans_manager = PlansManager(json.loads(json.dumps(bundle["plans"])))
        self.configuration_manager = self.plans_manager.get_configuration(bundle["configuration"])
        self.dataset_json = bundle["dataset_json"]
        self.in_channels = int(determine_num_input_channels(self.plans_manager, self.configuration_manager,
                                                            self.dataset_json))
        self.num_classes = int(self.plans_manager.get_label_manager(self.dataset_json).num_segmentation_heads)
        self.spacing = tuple(float(s) for s in bundle["default_spacing"])
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu"
        )
        self.network = nnUNetTrainer.build_network_architecture(
            self.plans_manager, self.configuration_manager, self.in_channels, self.num_classes,
            enable_deep_supervision=False,
        )
        self.network.load_state_dict(bundle["network_weights"])
        self.network.to(self.device).eval()
        mirror = bool(bundle.get("use_mirroring", False)) if use_mirroring is None else use_mirroring
        step = float(bundle.get("tile_step_size", 0.5)) if tile_step_size is None else tile_step_size
        with _quiet():
            self.predictor = nnUNetPredictor(
                tile_step_size=step, use_gaussian=True, use_mirroring=mirror,
                perform_everything_on_device=self.device.type == "cuda", device=self.device,
                verbose=False, allow_tqdm=False,
            )
            self.predictor.manual_initialization(
                self.network, self.plans_manager, self.configuration_manager, [bundle["network_weights"]],
                self.dataset_json, bundle["trainer_name"], bundle.get("inference_allowed_mirroring_axes"),
            )

    # ------------------------------------------------------------------ prediction
    def _check(self, image: np.ndarray) -> np.ndarray:
        arr = np.asarray(image)
        if arr.ndim != 4 or arr.shape[0] != self.in_channels:
            raise ValueError(f"image must be [C={self.in_channels}, D, H, W], got shape {tuple(arr.shape)}")
        return np.array(arr, dtype=np.float32, copy=True)

    def predict_proba(self, image: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
        """Class probabilities ``float32 [K, D, H, W]`` on the input grid.

        ``spacing`` is (D, H, W) in mm; default the bundle's (that of the training cases).
        """
        arr = self._check(image)
        props = {"spacing": [float(s) for s in (spacing if spacing is not None else self.spacing)]}
        with _quiet():
            _, probs = self.predictor.predict_single_npy_array(arr, props, None, None, True)
        probs = np.asarray(probs, dtype=np.float32)
        return probs / np.clip(probs.sum(axis=0, keepdims=True), 1e-8, None)

    def embed(self, image: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """Globally pooled deepest encoder features ``float32 [F]`` after nnU-Net's own preprocessing.

        ``weights [D, H, W]`` (>= 0) give uncertainty-weighted pooling: they are transposed and cropped like the
        image, area-resized to nnU-Net's resampled grid and zero-padded like the network input, then pooled by
        :func:`raylearn.scoring.reduce.weighted_pool`. The padding is never pooled; all-zero weights give the
        plain mean.
        """
        arr = self._check(image)
        w = np.ones(arr.shape[1:], np.float32) if weights is None else np.asarray(weights, dtype=np.float32)
        if w.shape != arr.shape[1:]:
            raise ValueError(f"weights must be [D, H, W] = {arr.shape[1:]}, got {w.shape}")
        if not w.any():
            w = np.ones(arr.shape[1:], np.float32)
        props = {"spacing": list(self.spacing)}
        pre = self.configuration_manager.preprocessor_class(verbose=False)
        with _quiet():
            data, _, props = pre.run_case_npy(arr, None, props, self.plans_manager, self.configuration_manager,
                                              self.dataset_json)
        x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None].to(self.device)
        factors = np.prod(np.asarray(self.configuration_manager.pool_op_kernel_sizes), axis=0)
        pads = [int((-s) % f) for s, f in zip(x.shape[2:], factors, strict=True)]
        x = F.pad(x, [0, pads[2], 0, pads[1], 0, pads[0]])
        with torch.no_grad():
            feats = self.network.encoder(x)[-1].float()[0]  # [F, d, h, w]
        w = np.transpose(w, self.plans_manager.transpose_forward)
        w = w[tuple(slice(int(a), int(b)) for a, b in props["bbox_used_for_cropping"])]
        w = np.pad(area_resize(w, data.shape[1:]), [(0, p) for p in pads])
        return weighted_pool(feats.cpu().numpy(), w)

    # ------------------------------------------------------------------ weights and checkpoints
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The network weights (CPU tensors)."""
        return {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the network weights (also those the predictor uses)."""
        self.network.load_state_dict(state)
        self._bundle["network_weights"] = self.state_dict()
        self.predictor.list_of_parameters = [self._bundle["network_weights"]]

    def save(self, path: str | Path) -> Path:
        """Write the bundle (one file); :meth:`load` restores identical predictions."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self._bundle, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> NnUNetSegmenter:
        """Restore a segmenter from a bundle written by :meth:`save` or :meth:`bundle`."""
        return cls(cls.read_bundle(path), device=device)

    @staticmethod
    def read_bundle(path: str | Path) -> dict[str, Any]:
        """Read and validate a bundle file (``ValueError`` naming the file when it is not one)."""
        path = Path(path)
        bundle = read_torch_file(path, "nnU-Net bundle")
        if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"{path}: not a raylearn nnU-Net bundle (expected format {BUNDLE_FORMAT!r})")
        return bundle

    @staticmethod
    def bundle(
        checkpoint_file: str | Path,
        model_dir: str | Path,
        out_path: str | Path,
        default_spacing: Sequence[float],
        use_mirroring: bool = False,
        tile_step_size: float = 0.5,
    ) -> Path:
        """Bundle an nnU-Net ``checkpoint_*.pth`` with ``model_dir``'s plans.json and dataset.json into one file."""
        ckpt = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
        model_dir = Path(model_dir)
        bundle = {
            "format": BUNDLE_FORMAT,
            "plans": json.loads((model_dir / "plans.json").read_text()),
            "dataset_json": json.loads((model_dir / "dataset.json").read_text()),
            "configuration": ckpt["init_args"]["configuration"],
            "trainer_name": ckpt["trainer_name"],
            "network_weights": ckpt["network_weights"],
            "inference_allowed_mirroring_axes": ckpt.get("inference_allowed_mirroring_axes"),
            "epoch": int(ckpt.get("current_epoch", 0)),
            "default_spacing": [float(s) for s in default_spacing],
            "use_mirroring": bool(use_mirroring),
            "tile_step_size": float(tile_step_size),
        }
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(out_path.name + ".tmp")
        torch.save(bundle, tmp)
        tmp.replace(out_path)
        return out_path

    def __repr__(self) -> str:
        return (
            f"NnUNetSegmenter(configuration={self._bundle['configuration']}, in_channels={self.in_channels}, "
            f"num_classes={self.num_classes}, patch={list(self.configuration_manager.patch_size)}, "
            f"device={self.device})"
        )
