"""Fixtures of the data-layer tests: tiny phantom datasets and an image writer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from raylearn.data.phantom import make_phantom_dataset

sys.path.insert(0, str(Path(__file__).parent))
from datahelpers import write_image  # noqa: E402


@pytest.fixture(scope="session")
def small_phantom(tmp_path_factory) -> Path:
    """10 phantom cases of 24^3 (MSD layout), shared read-only by the tests of this folder."""
    return make_phantom_dataset(tmp_path_factory.mktemp("phantom") / "ds", n_cases=10, shape=(24, 24, 24), seed=3)


@pytest.fixture
def phantom_copy(small_phantom, tmp_path) -> Path:
    """A private, writable copy of ``small_phantom`` (for tests that damage files)."""
    import shutil

    return Path(shutil.copytree(small_phantom, tmp_path / "ds"))


@pytest.fixture
def make_msd(tmp_path):
    """Build a small MSD dataset from arrays: ``make_msd({case: (image, label)}, labels=...)``."""

    def _make(cases: dict, labels=None, modality=None, root: Path | None = None, **geom) -> Path:
        root = root or tmp_path / "msd"
        training = []
        for cid, (img, lbl) in cases.items():
            write_image(root / "imagesTr" / f"{cid}.nii.gz", img, **geom)
            entry = {"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"}
            if lbl is not None:
                write_image(root / "labelsTr" / f"{cid}.nii.gz", lbl, **geom)
            training.append(entry)
        meta = {
            "name": "Tiny",
            "modality": modality or {"0": "MRI"},
            "labels": labels or {"0": "background", "1": "a", "2": "b"},
            "training": training,
        }
        (root / "dataset.json").write_text(json.dumps(meta))
        return root

    return _make


@pytest.fixture
def rng():
    return np.random.default_rng(0)
