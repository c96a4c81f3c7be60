"""Model and training configuration (the ``model:`` and ``train:`` sections of an experiment YAML).

The defaults are the recipe of a plain MONAI training script that trains well on small volumes (MSD
hippocampus, ~35x50x36 voxels; the 48^3 phantoms): whole volumes as one patch (``patch_size: auto``), batch
4, Adam 2e-3 with a short warm-up and no decay, left-right flips only, no dropout unless the strategy
samples MC dropout, every labelled case trains. A GPU cluster raises ``channels``, ``batch_size`` and
``num_workers``. Example::

    model:
      backend: monai_unet          # or nnunet
      channels: [16, 32, 64, 128]
      strides: [2, 2, 2]
      patch_size: auto             # whole (padded) volumes when they fit, else large patches
      dropout: auto                # mc_dropout for MC strategies (bald, mc_entropy), else 0
    train:
      first_round_steps: 400       # optimiser steps of round 0 (cold start, from scratch)
      steps: 200                   # optimiser steps of every later round (warm: weights, optimiser, schedule)
      batch_size: 4
      augment: {flip_axes: [2]}    # array axes (z, y, x) after RAS: 2 = left-right
      num_workers: 1               # Ray Train workers (DDP when > 1)
      use_gpu: false
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raylearn.config import StrictModel

__all__ = ["AugmentConfig", "ModelConfig", "NnUNetConfig", "SBCConfig", "TrainConfig", "resolve_model_config"]

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


class SBCConfig(StrictModel):
    """SBC-AL heads and joint loss (``model.sbc``), used when ``model.arch == "sbc_unet"``
    (:mod:`raylearn.models.sbc`): ``alpha * L_seg + beta * L_SFP (MSE) + gamma * L_ASR (Dice + CE)``.

    The paper gives no weights. The defaults are the choice of the sweep ``raylearn tune deployments/sweep_sbc.yaml``
    (beta in {0.5, 1, 2} x gamma in {0.5, 1}, alpha 1, by ALC on hippocampus, one seed): beta 2, gamma 0.5. gamma 0.5
    beat 1 at every beta; beta's effect was within one seed's noise (README, SBC-AL section)."""

    alpha: float = Field(default=1.0, ge=0)
    beta: float = Field(default=2.0, ge=0)
    gamma: float = Field(default=0.5, ge=0)
    #: width of the SFP DisBlocks and the ASR features (None = ``channels[0]``)
    head_channels: int | None = Field(default=None, gt=0)
    #: the segmentation the model predicts (evaluation, every feature but ``sbc_consistency``)
    output: Literal["refined", "coarse"] = "refined"
    #: ``full``: heads on the decoder features upsampled to the input grid; ``half``: on the decoder's grid
    #: (about 8x cheaper in 3D), outputs upsampled
    head_resolution: Literal["full", "half"] = "full"

    @model_validator(mode="after")
    def _some_weight(self) -> SBCConfig:
        if self.alpha + self.gamma == 0:
            raise ValueError("model.sbc: alpha and gamma are both 0, so no segmentation loss trains the network")
        return self


class ModelConfig(StrictModel):
    """The segmentation network and how it predicts (``model:``)."""

    backend: Literal["monai_unet", "nnunet"] = "monai_unet"
    # --- MONAI backend -----------------------------------------------------------------------------
    #: ``sbc_unet``: MONAI's UNet with SBC-AL's SFP and ASR heads (the ``sbc`` strategy needs it)
    arch: Literal["unet", "dynunet", "sbc_unet"] = "unet"
    #: feature channels per level (length L); ``strides`` has length L-1 (down-sampling between levels)
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    #: residual units per block (MONAI UNet only)
    num_res_units: int = Field(default=2, ge=0)
    kernel_size: int = Field(default=3, ge=1)
    norm: Literal["instance", "batch"] = "instance"
    #: dropout probability while training; ``auto`` = ``mc_dropout`` when the experiment's strategy samples MC
    #: dropout (``bald``, ``mc_entropy``), else 0 (dropout only costs quality when nothing samples it)
    dropout: float | Literal["auto"] = "auto"
    #: dropout probability when sampling MC-dropout predictions (:meth:`MonaiSegmenter.predict_mc`)
    mc_dropout: float = Field(default=0.1, gt=0, lt=1)
    #: training patch and sliding-window size, array order (D, H, W) in voxels; ``auto`` = the pool's largest
    #: volume padded to the network's stride when it has at most ``whole_volume_max_voxels`` voxels (whole-volume
    #: training and one-window inference), else that shape capped at ``auto_patch_max`` per axis
    patch_size: tuple[int, int, int] | Literal["auto"] = "auto"
    whole_volume_max_voxels: int = Field(default=192**3, gt=0)
    auto_patch_max: int = Field(default=128, gt=0)
    sw_batch_size: int = Field(default=4, gt=0)
    sw_overlap: float = Field(default=0.25, ge=0, lt=1)
    sw_mode: Literal["gaussian", "constant"] = "gaussian"
    #: SBC-AL heads and loss weights (``arch: sbc_unet``)
    sbc: SBCConfig = Field(default_factory=SBCConfig)
    # --- nnU-Net backend ---------------------------------------------------------------------------
    nnunet: NnUNetConfig = Field(default_factory=NnUNetConfig)

    @property
    def stride_factor(self) -> int:
        """Total down-sampling of the network (product of ``strides``)."""
        factor = 1
        for s in self.strides:
            factor *= int(s)
        return factor

    @property
    def train_dropout(self) -> float:
        """The training dropout as a number (``auto`` unresolved counts as 0)."""
        return 0.0 if self.dropout == "auto" else float(self.dropout)

    @model_validator(mode="after")
    def _check_levels(self) -> ModelConfig:
        if self.dropout != "auto" and not 0 <= float(self.dropout) < 1:
            raise ValueError(f"dropout must be 'auto' or in [0, 1), got {self.dropout}")
        if self.backend == "monai_unet":
            if len(self.channels) < 2:
                raise ValueError(f"channels needs at least 2 levels, got {list(self.channels)}")
            if len(self.strides) != len(self.channels) - 1:
                raise ValueError(
                    f"strides must have len(channels) - 1 = {len(self.channels) - 1} entries, got {list(self.strides)}"
                )
            if any(c <= 0 for c in self.channels) or any(s <= 0 for s in self.strides):
                raise ValueError("channels and strides must be positive")
            factor = self.stride_factor
            if self.patch_size != "auto" and any(p % factor for p in self.patch_size):
                raise ValueError(
                    f"patch_size {list(self.patch_size)} must be divisible by the total down-sampling {factor}"
                )
        return self


class AugmentConfig(StrictModel):
    """Training augmentation, declared per array axis (``train.augment``).

    Axes are array axes ``(D, H, W)`` = ``(z, y, x)`` after RAS reorientation: 0 inferior-superior,
    1 posterior-anterior, 2 left-right. Only left-right is flipped by default: anatomy is not symmetric
    along the other axes (flipping axis 1 swaps anterior and posterior hippocampus).
    """

    flip_axes: tuple[int, ...] = (2,)
    flip_prob: float = Field(default=0.5, ge=0, le=1)
    #: maximum rotation per axis in degrees (0 = none), applied with probability ``affine_prob``
    rotate_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    #: maximum isotropic scaling (0.1 = +-10 %), with probability ``affine_prob``
    scale: float = Field(default=0.0, ge=0, lt=1)
    affine_prob: float = Field(default=0.2, ge=0, le=1)
    #: intensity scale and shift (+- factor, + offset), each with probability 0.5; 0 = off
    intensity_scale: float = Field(default=0.0, ge=0)
    intensity_shift: float = Field(default=0.0, ge=0)
    #: gaussian noise standard deviation (0 = off), with probability 0.15
    noise_std: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _axes(self) -> AugmentConfig:
        bad = [a for a in self.flip_axes if a not in (0, 1, 2)]
        if bad or len(set(self.flip_axes)) != len(self.flip_axes):
            raise ValueError(f"flip_axes must be distinct array axes among 0, 1, 2, got {list(self.flip_axes)}")
        return self


class TrainConfig(StrictModel):
    """How the persistent training service fits the model round after round (``train:``).

    Budgets are optimiser steps: round 0 trains ``first_round_steps`` from scratch, every later round
    ``steps`` more, warm (weights, optimiser state and the LR schedule continue). The full-pool
    reference trains the run's total (``first_round_steps + rounds * steps``) on every pool case.
    """

    #: optimiser steps of every round after the first (per worker; a step sees ``batch_size`` volumes/patches)
    steps: int = Field(default=200, gt=0)
    #: optimiser steps of round 0 (None = ``steps``)
    first_round_steps: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=4, gt=0)
    #: fraction of sampled patches centred on foreground, when patches are smaller than the volumes
    pos_fraction: float = Field(default=0.67, ge=0, le=1)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    #: LR schedule over the whole run's step budget after a linear warm-up: ``constant``, ``cosine`` or
    #: ``poly`` (both decay to ``min_lr_ratio * lr`` at the run's last step, never per round)
    schedule: Literal["constant", "cosine", "poly"] = "constant"
    warmup_steps: int = Field(default=20, ge=0)
    min_lr_ratio: float = Field(default=0.05, ge=0, le=1)
    #: keep an exponential moving average of the weights and publish it (None = publish the last weights)
    ema_decay: float | None = Field(default=None, gt=0, lt=1)
    #: held-out share of the labelled cases for a validation Dice per round (0 = every labelled case trains)
    val_fraction: float = Field(default=0.0, ge=0, lt=1)
    #: explicit validation case ids (overrides ``val_fraction``); must be among the labelled ids
    val_ids: list[str] | None = None
    #: report a Ray Train checkpoint every N steps inside a round (a killed run resumes from there)
    checkpoint_every: int = Field(default=100, gt=0)
    #: log a line every N steps
    log_every: int = Field(default=50, gt=0)
    # --- Ray Train ---------------------------------------------------------------------------------
    num_workers: int = Field(default=1, gt=0)
    use_gpu: bool = False
    #: resources per Ray Train worker, e.g. {"CPU": 2, "GPU": 1}; None = 1 CPU (+ 1 GPU with use_gpu)
    resources_per_worker: dict[str, float] | None = None
    storage_path: str = "runs/train"
    max_failures: int = Field(default=2, ge=-1)
    seed: int = 0
    #: mixed precision (only takes effect on CUDA)
    amp: bool = True
    #: torch intra-op threads per worker; None = the node's cores shared by the workers on it (scoring and
    #: training take turns, so the trainer may use the whole node while it trains)
    torch_threads: int | None = Field(default=None, gt=0)

    def round_steps(self, round_index: int) -> int:
        """Optimiser steps of round ``round_index`` (0 = the cold-start round)."""
        if round_index == 0 and self.first_round_steps is not None:
            return int(self.first_round_steps)
        return int(self.steps)

    def label_poll_steps(self) -> int:
        """How often (steps) workers ask the round coordinator whether the round's labels or hold changed:
        every ``log_every`` steps, at most 5, so a round released past its budget ends within a few steps."""
        return max(1, min(int(self.log_every), 5))

    def run_steps(self, rounds: int) -> int:
        """Total steps of a run with a cold-start round and ``rounds`` further rounds."""
        return self.round_steps(0) + int(rounds) * int(self.steps)


def resolve_model_config(cfg: ModelConfig, shapes, mc_dropout_needed: bool = False) -> ModelConfig:
    """Turn ``auto`` settings into numbers for one pool: the config a checkpoint records.

    Args:
        cfg: the experiment's model section.
        shapes: spatial shapes ``(D, H, W)`` of the pool's (and test split's) volumes.
        mc_dropout_needed: the strategy samples MC dropout (``dropout: auto`` then trains with ``mc_dropout``).

    Returns:
        A copy with ``patch_size`` a tuple and ``dropout`` a float.
    """
    update: dict = {}
    if cfg.dropout == "auto":
        update["dropout"] = float(cfg.mc_dropout) if mc_dropout_needed else 0.0
    if cfg.patch_size == "auto" and cfg.backend == "monai_unet":
        shapes = [tuple(int(v) for v in s[-3:]) for s in shapes]
        if not shapes:
            raise ValueError("patch_size: auto needs at least one volume shape")
        f = cfg.stride_factor
        biggest = [max(s[a] for s in shapes) for a in range(3)]
        padded = [-(-b // f) * f for b in biggest]
        if padded[0] * padded[1] * padded[2] <= cfg.whole_volume_max_voxels:
            update["patch_size"] = tuple(padded)
        else:
            cap = max(f, cfg.auto_patch_max // f * f)
            update["patch_size"] = tuple(min(p, cap) for p in padded)
    return cfg.model_copy(update=update) if update else cfg
