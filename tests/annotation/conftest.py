"""Fixtures of the annotation tests: a small pool store of real MRI (8 cases of the shipped hippocampus subset)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from raylearn.data.preprocess import PreprocessConfig
from raylearn.data.store import PoolStore, ingest
from raylearn.runtime import DEMO_DATA

DEMO = DEMO_DATA / "msd_hippocampus_60"


def small_dataset(folder: Path, n: int = 8) -> Path:
    """A copy of the first ``n`` shipped hippocampus cases in MSD layout (dataset.json rewritten)."""
    import json

    meta = json.loads((DEMO / "dataset.json").read_text())
    meta["training"] = meta["training"][:n]
    meta["numTraining"] = n
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for item in meta["training"]:
        for key in ("image", "label"):
            shutil.copy(DEMO / item[key], folder / item[key])
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="session")
def hippo_store(tmp_path_factory) -> PoolStore:
    """8 hippocampus cases (2 test), reoriented to LPS, resampled and cropped, so every mapping step is used."""
    root = tmp_path_factory.mktemp("annotation_data")
    ds = small_dataset(root / "ds")
    pre = PreprocessConfig(orientation="LPS", target_spacing=(1.2, 1.0, 1.0), crop_foreground=True)
    ingest(ds, root / "store", pre, n_test=2, seed=0, progress=False)
    return PoolStore.open(root / "store")
