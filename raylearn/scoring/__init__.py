"""raylearn.scoring: pure score functions (voxel maps, volume reductions) and per-case features. No Ray."""

from raylearn.scoring.reduce import REDUCTIONS, foreground_volume, reduce_map, topk_count, weighted_pool
from raylearn.scoring.uncertainty import (
    bald,
    class_weighted_entropy,
    entropy,
    least_confidence,
    margin,
    mc_variance,
    predictive_entropy,
    tta_variance,
)

__all__ = [
    "REDUCTIONS",
    "bald",
    "class_weighted_entropy",
    "entropy",
    "foreground_volume",
    "least_confidence",
    "margin",
    "mc_variance",
    "predictive_entropy",
    "reduce_map",
    "topk_count",
    "tta_variance",
    "weighted_pool",
]
