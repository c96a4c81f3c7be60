"""Label-free feature extractors of the cold start (CSAL-3D's pretext model, SUGFW's SAM ensemble).

An extractor has settings (a pydantic model; their hash keys the store's cache), a model the driver prepares
once (:func:`prepare_blob` for SAM; CSAL-3D's is trained with Ray Train, :mod:`raylearn.train.pretext`) and a
per-case function the pool shards run (:func:`extract_case`). Features and their extractor:
:data:`raylearn.scoring.coldstart.EXTRACTOR_FEATURES`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from raylearn.scoring.coldstart import EXTRACTOR_FEATURES

__all__ = ["EXTRACTORS", "extractors_for", "extract_case", "load_model", "parse_params", "settings_hash"]

#: extractor name -> "module:Class" of its settings
EXTRACTORS = {"csal3d": "raylearn.models.ssl3d:Csal3dParams", "sugfw": "raylearn.models.sam2d:SugfwParams"}


def extractors_for(names: Iterable[str]) -> dict[str, list[str]]:
    """The extractor features among ``names`` grouped by extractor: ``{extractor: sorted feature names}``."""
    out: dict[str, list[str]] = {}
    for n in sorted(set(names)):
        if n in EXTRACTOR_FEATURES:
            out.setdefault(EXTRACTOR_FEATURES[n][0], []).append(n)
    return out


def parse_params(name: str, settings: Mapping[str, Any] | None) -> Any:
    """Validated settings of extractor ``name``; ``ValueError`` naming the bad key (``extractor.<key>: ...``)."""
    from pydantic import ValidationError

    from raylearn.config import format_validation_error
    from raylearn.pool_support import load_class

    if name not in EXTRACTORS:
        raise ValueError(f"unknown extractor {name!r}; known: {', '.join(sorted(EXTRACTORS))}")
    cls = load_class(EXTRACTORS[name])
    try:
        return cls.model_validate(dict(settings or {}))
    except ValidationError as err:
        msg = format_validation_error(err, "extractor", cls)  # cross-field checks start with the key themselves
        msg = msg.replace("extractor: <root>: ", "extractor.").replace("extractor: ", "extractor.")
        raise ValueError(msg) from None


def settings_hash(name: str, params: Any) -> str:
    """sha256 (hex) of the extractor's name and settings: the cache key."""
    blob = json.dumps({"extractor": name, "settings": params.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_model(name: str, blob: bytes, params: Any) -> Any:
    """The extractor's model from the driver's bytes, on CUDA when the process has a GPU."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "csal3d":
        from raylearn.train.pretext import load_pretext

        return load_pretext(blob, dev)
    from raylearn.models.sam2d import load_sam

    return load_sam(blob, params, dev)


def extract_case(name: str, model: Any, image: np.ndarray, params: Any, seed: int) -> dict[str, np.ndarray]:
    """One case's features of extractor ``name`` (see :data:`EXTRACTOR_FEATURES`)."""
    if name == "csal3d":
        from raylearn.models.ssl3d import case_features

        return case_features(model, image, params, seed)
    from raylearn.models.sam2d import volume_features

    return volume_features(model, image, params, seed)
