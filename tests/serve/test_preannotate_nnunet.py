"""Pre-annotation in the model deployment with an nnU-Net segmenter (one tiny real nnU-Net round; slow)."""

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from raylearn.models.config import ModelConfig, TrainConfig


@pytest.fixture(scope="module")
def nnunet_round(ray_session, hippocampus_dir, tmp_path_factory):
    from raylearn.data.store import PoolStore, ingest
    from raylearn.train import fit_round_nnunet

    root = tmp_path_factory.mktemp("p2p_nnunet")
    meta = json.loads((hippocampus_dir / "dataset.json").read_text())
    meta["training"] = meta["training"][:6]
    meta["numTraining"] = 6
    for sub in ("imagesTr", "labelsTr"):
        (root / "raw" / sub).mkdir(parents=True)
    for entry in meta["training"]:
        for key in ("image", "label"):
            rel = entry[key].removeprefix("./")
            os.symlink(hippocampus_dir / rel, root / "raw" / rel)
    (root / "raw" / "dataset.json").write_text(json.dumps(meta))
    ingest(root / "raw", root / "store", n_test=1, seed=0, progress=False)
    store = PoolStore.open(root / "store")
    nn = {"epochs": 1, "iterations_per_epoch": 2, "val_iterations_per_epoch": 1, "batch_size": 2,
          "work_dir": str(root / "nnunet")}
    r0 = fit_round_nnunet(store, store.case_ids("pool"), None, ModelConfig(backend="nnunet", nnunet=nn),
                          TrainConfig(storage_path=str(root / "runs"), val_fraction=0.25), round_index=0)
    test_id = store.case_ids("test")[0]
    image = sitk.ReadImage(str(root / "raw" / "imagesTr" / f"{test_id}.nii.gz"))
    return store, r0.checkpoint_path, image


@pytest.mark.slow
def test_model_deployment_preannotates_with_an_nnunet_segmenter(nnunet_round):
    from raylearn.models.nnunet_segmenter import NnUNetSegmenter
    from raylearn.serve.model import SamMed3DModel

    store, ckpt, image = nnunet_round
    replica = SamMed3DModel.func_or_class()
    replica.reconfigure({"model": {"preset": "small", "device": "cpu"}})
    out = replica._preannotate(image, None, str(ckpt), store.config.model_dump(mode="json"), [1, 2], 3, 0,
                               "prediction", "random")
    assert isinstance(replica.segmenter(str(ckpt)), NnUNetSegmenter)
    shape = sitk.GetArrayFromImage(image).shape
    assert out["label_map"].shape == shape and out["segmenter_label_map"].shape == shape
    present = sorted(set(np.unique(out["segmenter_label_map"]).tolist()) - {0})
    assert sorted({c.label for c in out["clicks"]}) == present  # a class the segmenter missed gets no clicks
    assert len(out["clicks"]) == 3 * len(present) and out["clicks"][0].positive  # the first click: a missed voxel
    assert set(out["timing_ms"]) == {"segmenter", "sam_med3d"}
