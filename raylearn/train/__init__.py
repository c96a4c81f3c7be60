"""Training on Ray: the persistent MONAI training service and per-round nnU-Net tasks."""

from raylearn.train.nnunet import FitResult, fit_round_nnunet
from raylearn.train.service import RoundResult, TrainingService, TrainingServiceError

__all__ = ["FitResult", "RoundResult", "TrainingService", "TrainingServiceError", "fit_round_nnunet"]
