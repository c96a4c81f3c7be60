"""Prediction to prompt for the server: segmenter prediction on an uploaded volume, mapped to its grid."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from raylearn.data.preprocess import PreprocessConfig, preprocess_case, restore_to_source
from raylearn.models.base import Segmenter


def segmenter_label_map(segmenter: Segmenter, image: sitk.Image, preprocess: PreprocessConfig) -> np.ndarray:
    """The segmenter's arg-max label map ``uint8 [D,H,W]`` on the uploaded image's own grid.

    The image is preprocessed as the segmenter was trained (``preprocess``), predicted, and the prediction is
    mapped back with :func:`raylearn.data.preprocess.restore_to_source`.

    Raises:
        ValueError: the segmenter expects more than one channel.
    """
    if segmenter.in_channels != 1:
        raise ValueError(f"the segmenter expects {segmenter.in_channels} channels; uploads are single-channel")
    case = preprocess_case([image], None, preprocess)
    pred = segmenter.predict_label(case.image)
    return sitk.GetArrayFromImage(restore_to_source(pred, case.meta)).astype(np.uint8)


def voxel_spacing(image: sitk.Image) -> tuple[float, float, float]:
    """Spacing in array order ``(D, H, W)`` mm."""
    return tuple(float(s) for s in image.GetSpacing()[::-1])
