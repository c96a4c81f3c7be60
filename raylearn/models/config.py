"""Model and training configuration (the ``model:`` and ``train:`` sections of an experiment YAML).

Defaults suit a CPU run on small volumes (the 48^3 phantoms, MSD hippocampus at ~35x50x36 voxels);
a GPU cluster raises ``channels``, ``patch_size``, ``batch_size`` and ``num_workers``. Example::

    model:
      backend: monai_unet          # or nnunet
      arch: unet
      channels: [16, 32, 64, 128]
      strides: [2, 2, 2]
      dropout: 0.1                 # > 0 enables MC-dropout sampling
      patch_size: [32, 48, 32]
    train:
      epochs: 20
      iterations_per_epoch: 50
      num_workers: 2               # Ray Train workers (DDP when > 1)
      use_gpu: false
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raylearn.config import StrictModel

__all__ = ["ModelConfig", "NnUNetConfig", "TrainConfig"]

PositiveInt = Field(gt=0)


class NnUNetConfig(StrictModel):
    """nnU-Net v2 backend settings (``model.nnunet``); used when ``model.backend == "nnunet"``.

    The dataset fingerprint and plans are made once (round 0) under ``work_dir`` and reused every round.
    """

    configuration: Literal["3d_fullres", "3d_lowres", "2d"] = "3d_fullres"
    #: nnU-Net dataset id (``DatasetXXX_<dataset_name>``), 1..999
    dataset_id: int = Field(default=501, ge=1, le=999)
    dataset_name: str = Field(default="RaylearnAL", pattern=r"^[A-Za-z0-9_]+$")
    #: root holding nnUNet_raw / nnUNet_preprocessed / nnUNet_results; default ``<train.storage_path>/nnunet``
    work_dir: str | None = None
    plans_identifier: str = "nnUNetPlans"
    fold: int | Literal["all"] = "all"
    #: per-round schedule (the paper: 50 epochs x 100 iterations)
    epochs: int = Field(default=50, gt=0)
    iterations_per_epoch: int = Field(default=100, gt=0)
    val_iterations_per_epoch: int = Field(default=20, gt=0)
    initial_lr: float = Field(default=1e-2, gt=0)
    #: override the plans' batch size (None keeps nnU-Net's choice)
    batch_size: int | None = Field(default=None, gt=0)
    #: prediction: flip mirroring (off for fast pool scoring) and sliding-window step (fraction of the patch)
    use_mirroring: bool = False
    tile_step_size: float = Field(default=0.5, gt=0, le=1)
    #: processes for fingerprint extraction / preprocessing
    num_processes: int = Field(default=2, gt=0)


class ModelConfig(StrictModel):
    """The segmentation network and how it predicts (``model:``)."""

    backend: Literal["monai_unet", "nnunet"] = "monai_unet"
    # --- MONAI backend -----------------------------------------------------------------------------
    arch: Literal["unet", "dynunet"] = "unet"
    #: feature channels per level (length L); ``strides`` has length L-1 (down-sampling between levels)
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    #: residual units per block (MONAI UNet only)
    num_res_units: int = Field(default=2, ge=0)
    kernel_size: int = Field(default=3, ge=1)
    norm: Literal["instance", "batch"] = "instance"
    #: dropout probability inside every block; > 0 makes :meth:`predict_mc` sample different masks
    dropout: float = Field(default=0.1, ge=0, lt=1)
    #: training patch and sliding-window size, array order (D, H, W) in voxels
    patch_size: tuple[int, int, int] = (32, 48, 32)
    sw_batch_size: int = Field(default=4, gt=0)
    sw_overlap: float = Field(default=0.25, ge=0, lt=1)
    sw_mode: Literal["gaussian", "constant"] = "gaussian"
    # --- nnU-Net backend ---------------------------------------------------------------------------
    nnunet: NnUNetConfig = Field(default_factory=NnUNetConfig)

    @model_validator(mode="after")
    def _check_levels(self) -> ModelConfig:
        if self.backend == "monai_unet":
            if len(self.channels) < 2:
                raise ValueError(f"channels needs at least 2 levels, got {list(self.channels)}")
            if len(self.strides) != len(self.channels) - 1:
                raise ValueError(
                    f"strides must have len(channels) - 1 = {len(self.channels) - 1} entries, got {list(self.strides)}"
                )
            if any(c <= 0 for c in self.channels) or any(s <= 0 for s in self.strides):
                raise ValueError("channels and strides must be positive")
            factor = 1
            for s in self.strides:
                factor *= s
            if any(p % factor for p in self.patch_size):
                raise ValueError(
                    f"patch_size {list(self.patch_size)} must be divisible by the total down-sampling {factor}"
                )
        return self


class TrainConfig(StrictModel):
    """How one active-learning round fine-tunes the model (``train:``)."""

    #: epochs per round and optimiser steps per epoch (per worker; a step sees batch_size patches)
    epochs: int = Field(default=20, gt=0)
    iterations_per_epoch: int = Field(default=50, gt=0)
    batch_size: int = Field(default=2, gt=0)
    #: fraction of sampled patches centred on foreground (foreground-biased cropping)
    pos_fraction: float = Field(default=0.67, ge=0, le=1)
    augment: bool = True
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=1e-5, ge=0)
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    #: held-out share of the labelled cases used for validation Dice (at least one case)
    val_fraction: float = Field(default=0.2, ge=0, lt=1)
    #: explicit validation case ids (overrides ``val_fraction``); must be among the labelled ids
    val_ids: list[str] | None = None
    #: validate every N epochs (the last epoch always validates)
    val_every: int = Field(default=1, gt=0)
    # --- Ray Train ---------------------------------------------------------------------------------
    num_workers: int = Field(default=1, gt=0)
    use_gpu: bool = False
    #: resources per Ray Train worker, e.g. {"CPU": 2, "GPU": 1}; None = Ray's default (1 CPU [+ 1 GPU])
    resources_per_worker: dict[str, float] | None = None
    storage_path: str = "runs/train"
    max_failures: int = Field(default=1, ge=-1)
    num_to_keep: int = Field(default=2, gt=0)
    seed: int = 0
    #: mixed precision (only takes effect on CUDA)
    amp: bool = True
    #: torch intra-op threads inside each worker (None = leave torch's default)
    torch_threads: int | None = Field(default=None, gt=0)
    #: DataLoader worker processes feeding each training worker (0 = in-process, deterministic)
    loader_workers: int = Field(default=0, ge=0)
