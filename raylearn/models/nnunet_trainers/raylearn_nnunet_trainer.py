"""``nnUNetTrainerRaylearn``: the stock nnU-Net v2 trainer with a per-round schedule from the environment.

nnunetv2 locates this class by name when ``nnUNet_extTrainer`` points at this directory, so the
command-line tools work with it too::

    RAYLEARN_NNUNET_EPOCHS=2 RAYLEARN_NNUNET_ITERATIONS=5 nnUNet_extTrainer=.../nnunet_trainers \\
        nnUNetv2_train 501 3d_fullres 0 -tr nnUNetTrainerRaylearn -device cpu

Environment (defaults in brackets): ``RAYLEARN_NNUNET_EPOCHS`` [50], ``RAYLEARN_NNUNET_ITERATIONS`` [100],
``RAYLEARN_NNUNET_VAL_ITERATIONS`` [20], ``RAYLEARN_NNUNET_LR`` [0.01], ``RAYLEARN_NNUNET_BATCH_SIZE``
[plans], ``RAYLEARN_NNUNET_SAVE_EVERY`` [1 epoch: a retried task resumes from ``checkpoint_latest.pth``].
This module is imported by nnunetv2 as a top-level module, so it only imports nnunetv2 and torch.
"""

from __future__ import annotations

import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainerRaylearn(nnUNetTrainer):  # noqa: N801 - nnU-Net's naming convention
    """nnUNetTrainer whose epochs, iterations, learning rate and batch size come from ``RAYLEARN_NNUNET_*``."""

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 - nnU-Net's signature
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        env = os.environ
        self.num_epochs = int(env.get("RAYLEARN_NNUNET_EPOCHS", 50))
        self.num_iterations_per_epoch = int(env.get("RAYLEARN_NNUNET_ITERATIONS", 100))
        self.num_val_iterations_per_epoch = int(env.get("RAYLEARN_NNUNET_VAL_ITERATIONS", 20))
        self.initial_lr = float(env.get("RAYLEARN_NNUNET_LR", 1e-2))
        self.save_every = int(env.get("RAYLEARN_NNUNET_SAVE_EVERY", 1))
        batch = env.get("RAYLEARN_NNUNET_BATCH_SIZE")
        if batch:
            self.configuration_manager.configuration["batch_size"] = int(batch)
