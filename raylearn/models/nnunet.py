"""nnU-Net v2 backend: raw-dataset export, plans fixed at round 0, per-round training, probability prediction.

One active-learning round (:func:`run_round`, which :func:`raylearn.train.fit_round` runs inside a Ray task
holding the worker's resources) does:

1. export the labelled pool-store cases not exported yet as an nnU-Net raw dataset
   (``nnUNet_raw/DatasetXXX_Name/imagesTr/<id>_0000.nii.gz``, ``labelsTr/<id>.nii.gz``, ``dataset.json``);
2. at round 0 only, extract the dataset fingerprint and plan the experiment; later rounds reuse those
   plans unchanged (the fingerprint stays that of the round-0 cases, as in "From Prediction to Prompt");
3. preprocess only the newly labelled cases with the fixed plans;
4. write ``splits_final.json`` (fold 0 = our train/validation split) and train ``nnUNetTrainerRaylearn``
   (found through ``nnUNet_extTrainer``) for ``epochs x iterations_per_epoch``, warm-started from the
   previous round's weights; a retried task resumes from ``checkpoint_latest.pth``;
5. bundle ``checkpoint_best.pth`` with its plans and dataset.json into one file that
   :class:`NnUNetSegmenter` loads for pool scoring (``nnUNetPredictor``, mirroring off by default).

Shapes follow the project: images ``float32 [C, D, H, W]`` on the pool store's grid, spacing ``(D, H, W)`` mm;
nnU-Net sees the same arrays (SimpleITK axis order) so its probabilities come back on that grid.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import types
from collections.abc import Iterator, Mapping, Sequence
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raylearn.data.imageio import file_sha256
from raylearn.models.config import NnUNetConfig
from raylearn.models.nnunet_segmenter import BUNDLE_FORMAT, NnUNetSegmenter, require_nnunet

__all__ = [
    "BUNDLE_FORMAT",
    "TRAINER_DIR",
    "TRAINER_NAME",
    "NnUNetSegmenter",
    "export_raw_dataset",
    "nnunet_env",
    "plan_once",
    "preprocess_new",
    "run_round",
]

logger = logging.getLogger(__name__)

TRAINER_NAME = "nnUNetTrainerRaylearn"
TRAINER_DIR = Path(__file__).resolve().parent / "nnunet_trainers"


def dataset_folder_name(cfg: NnUNetConfig) -> str:
    """``DatasetXXX_Name`` for the configured id and name."""
    return f"Dataset{cfg.dataset_id:03d}_{cfg.dataset_name}"


def nnunet_env(work_dir: str | Path, cfg: NnUNetConfig, results_name: str = "results") -> dict[str, str]:
    """Environment for nnunetv2 (paths under ``work_dir``, CPU-friendly settings, the round's schedule)."""
    work = Path(work_dir).resolve()
    env = {
        "nnUNet_raw": str(work / "nnUNet_raw"),
        "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
        "nnUNet_results": str(work / "nnUNet_results" / results_name),
        "nnUNet_extTrainer": str(TRAINER_DIR),
        "nnUNet_n_proc_DA": "0",
        "nnUNet_def_n_proc": str(cfg.num_processes),
        "nnUNet_compile": "f",
        "RAYLEARN_NNUNET_EPOCHS": str(cfg.epochs),
        "RAYLEARN_NNUNET_ITERATIONS": str(cfg.iterations_per_epoch),
        "RAYLEARN_NNUNET_VAL_ITERATIONS": str(cfg.val_iterations_per_epoch),
        "RAYLEARN_NNUNET_LR": str(cfg.initial_lr),
        "RAYLEARN_NNUNET_SAVE_EVERY": "1",
    }
    if cfg.batch_size is not None:
        env["RAYLEARN_NNUNET_BATCH_SIZE"] = str(cfg.batch_size)
    return env


@contextlib.contextmanager
def environment(env: Mapping[str, str]) -> Iterator[None]:
    """Temporarily set environment variables, restoring the previous values (or their absence) on exit.

    nnunetv2 has no configuration object: it reads ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results``
    from ``os.environ`` once, when :mod:`nnunetv2.paths` is first imported, and its process counts and our
    trainer's ``RAYLEARN_NNUNET_*`` schedule on each use. In a Ray task all of them come from ``runtime_env``
    (see :func:`raylearn.train.fit_round`), so every task starts a worker whose first import sees its own paths;
    this context manager covers in-process calls and the per-use variables (``nnUNet_n_proc_DA`` while planning).
    """
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def export_raw_dataset(store, case_ids: Sequence[str], raw_root: str | Path, cfg: NnUNetConfig) -> list[str]:
    """Write labelled store cases into ``<raw_root>/DatasetXXX_Name`` (skipping ones already there).

    Returns the ids written now. ``dataset.json`` is rewritten with the current ``numTraining``.
    """
    import SimpleITK as sitk

    folder = Path(raw_root) / dataset_folder_name(cfg)
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    written = []
    for cid in case_ids:
        label_file = folder / "labelsTr" / f"{cid}.nii.gz"
        if label_file.is_file():
            continue
        case = store.get(cid)
        if case.label is None:
            raise ValueError(f"case {cid!r} has no label in the pool store; only labelled cases can be trained on")
        spacing = tuple(float(s) for s in case.spacing[::-1])  # SimpleITK wants (x, y, z)
        for c in range(case.image.shape[0]):
            img = sitk.GetImageFromArray(np.ascontiguousarray(case.image[c], dtype=np.float32))
            img.SetSpacing(spacing)
            sitk.WriteImage(img, str(folder / "imagesTr" / f"{cid}_{c:04d}.nii.gz"))
        lab = sitk.GetImageFromArray(np.ascontiguousarray(case.label, dtype=np.uint8))
        lab.SetSpacing(spacing)
        sitk.WriteImage(lab, str(label_file))  # written last: its presence marks a complete case
        written.append(cid)
    names = {int(k): str(v) for k, v in store.labels.items()}
    n_channels = int(store.num_channels)
    cases = sorted(f.name[: -len(".nii.gz")] for f in (folder / "labelsTr").glob("*.nii.gz"))
    dataset_json = {
        # pool-store images are already normalised; nnU-Net's z-score keeps them so
        "channel_names": {str(c): "zscore" for c in range(int(store.num_channels))},
        "labels": {names.get(k, f"class_{k}") if k else "background": k for k in range(int(store.num_classes))},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "name": cfg.dataset_name,
        # the files listed (nnU-Net's "dataset" key, paths relative to this folder): without it nnunetv2 finds them
        # with a fork-context multiprocessing.Pool(12), which forked from a Ray worker's threads and hung before the
        # fingerprint (children stuck on inherited locks); with it no process is started
        "dataset": {cid: {"images": [f"imagesTr/{cid}_{c:04d}.nii.gz" for c in range(n_channels)],
                          "label": f"labelsTr/{cid}.nii.gz"} for cid in cases},
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return written


def _plans_file(cfg: NnUNetConfig) -> Path:
    from nnunetv2.paths import nnUNet_preprocessed

    return Path(str(nnUNet_preprocessed)) / dataset_folder_name(cfg) / f"{cfg.plans_identifier}.json"


@contextlib.contextmanager
def _fingerprint_pool_on_threads() -> Iterator[None]:
    """Run nnU-Net's fingerprint extraction on a thread pool instead of its "spawn" process pool.

    Why not a public API: ``DatasetFingerprintExtractor.run`` (nnunetv2 2.8.1) always opens
    ``multiprocessing.get_context("spawn").Pool(num_processes)`` inline, even for ``num_processes=1``; neither
    ``extract_fingerprint_dataset`` nor the ``nnUNetv2_extract_fingerprint`` command offers an in-process path, and
    overriding ``run`` in a subclass would copy its 80 lines of aggregation. Starting that pool inside a Ray worker
    hung before exec in our runs, so for the duration of the call the module's ``multiprocessing`` name is pointed
    at an object whose ``get_context(...).Pool`` is :class:`multiprocessing.pool.ThreadPool` (same API, and
    ``analyze_case`` releases the GIL in numpy/SimpleITK). The original module is restored on exit.
    """
    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor

    original = fingerprint_extractor.multiprocessing
    fingerprint_extractor.multiprocessing = types.SimpleNamespace(
        get_context=lambda *_a, **_k: types.SimpleNamespace(Pool=ThreadPool)
    )
    try:
        yield
    finally:
        fingerprint_extractor.multiprocessing = original


def plan_once(cfg: NnUNetConfig) -> tuple[Path, bool]:
    """Fingerprint + plans for the exported cases, only when no plans exist yet -> ``(plans_file, planned_now)``.

    Needs the nnU-Net environment (:func:`nnunet_env`) to be set.
    """
    require_nnunet()
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
    )

    plans_file = _plans_file(cfg)
    if plans_file.is_file():
        return plans_file, False
    # the planner calls torch.set_num_threads(nnUNet_n_proc_DA), which must be >= 1 (training uses 0)
    with environment({"nnUNet_n_proc_DA": str(cfg.num_processes)}), open(os.devnull, "w") as null, \
            contextlib.redirect_stdout(null), _fingerprint_pool_on_threads():
        extract_fingerprint_dataset(
            cfg.dataset_id, DatasetFingerprintExtractor, num_processes=cfg.num_processes,
            check_dataset_integrity=False, clean=True, verbose=False, show_progress_bar=False,
        )
        plan_experiment_dataset(cfg.dataset_id)
    plans = json.loads(plans_file.read_text())
    if cfg.configuration not in plans["configurations"]:
        raise ValueError(
            f"model.nnunet.configuration: nnU-Net planned no {cfg.configuration!r} for these images "
            f"(available: {sorted(plans['configurations'])})"
        )
    return plans_file, True


def preprocess_new(cfg: NnUNetConfig, case_ids: Sequence[str]) -> list[str]:
    """Preprocess, with the fixed plans, the exported cases that are not preprocessed yet; returns their ids."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    name = dataset_folder_name(cfg)
    plans = PlansManager(str(_plans_file(cfg)))
    conf = plans.get_configuration(cfg.configuration)
    pre = Path(str(nnUNet_preprocessed)) / name
    dataset_json = json.loads((pre / "dataset.json").read_text())
    out_dir = pre / conf.data_identifier
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = Path(str(nnUNet_raw)) / name
    n_channels = len(dataset_json["channel_names"])
    preprocessor = conf.preprocessor_class(verbose=False)
    done = []
    for cid in case_ids:
        if (out_dir / f"{cid}.pkl").is_file() and (out_dir / f"{cid}.b2nd").is_file():
            continue
        images = [str(raw / "imagesTr" / f"{cid}_{c:04d}.nii.gz") for c in range(n_channels)]
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            preprocessor.run_case_save(
                str(out_dir / cid), images, str(raw / "labelsTr" / f"{cid}.nii.gz"), plans, conf, dataset_json
            )
        done.append(cid)
    return done


def run_round(
    store,
    train_ids: Sequence[str],
    val_ids: Sequence[str],
    cfg: NnUNetConfig,
    work_dir: str | Path,
    out_path: str | Path,
    results_name: str,
    init_bundle: str | Path | None = None,
    use_gpu: bool = False,
) -> dict[str, Any]:
    """One round of nnU-Net training (in-process; :func:`raylearn.train.fit_round` runs it in a Ray task).

    Returns ``{"checkpoint_path", "history", "best_val_dice", "best_epoch", "plans_file", "plans_sha256",
    "planned", "preprocessed", "resumed", "wall_s"}``; the best weights are bundled into ``out_path``.
    """
    require_nnunet()
    t0 = time.perf_counter()
    env = nnunet_env(work_dir, cfg, results_name)
    ids = list(dict.fromkeys([*train_ids, *val_ids]))
    with environment(env):
        from nnunetv2.run.run_training import get_trainer_from_args

        export_raw_dataset(store, ids, env["nnUNet_raw"], cfg)
        plans_file, planned = plan_once(cfg)
        new = preprocess_new(cfg, ids)
        pre = plans_file.parent
        (pre / "splits_final.json").write_text(json.dumps([{"train": list(train_ids), "val": list(val_ids)}]))
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        out_dir = Path(env["nnUNet_results"]) / dataset_folder_name(cfg)
        resume = any(out_dir.glob(f"{TRAINER_NAME}__*/fold_0/checkpoint_latest.pth"))
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            trainer = get_trainer_from_args(
                str(cfg.dataset_id), cfg.configuration, 0, TRAINER_NAME, cfg.plans_identifier,
                continue_training=resume, device=device,
            )
            trainer.initialize()
            if resume:
                trainer.load_checkpoint(str(Path(trainer.output_folder) / "checkpoint_latest.pth"))
            elif init_bundle is not None:
                weights = NnUNetSegmenter.read_bundle(init_bundle)["network_weights"]
                try:
                    trainer.network.load_state_dict(weights)
                except RuntimeError as err:
                    raise ValueError(f"{init_bundle}: weights do not fit the planned network ({err})") from None
            trainer.run_training()
        log = trainer.logger.local_logger.my_fantastic_logging
        history = [
            {
                "epoch": e + 1,
                "loss": float(log["train_losses"][e]),
                "val_loss": float(log["val_losses"][e]),
                "val_dice": float(log["mean_fg_dice"][e]),
                "ema_val_dice": float(log["ema_fg_dice"][e]),
                "lr": float(log["lrs"][e]),
                "epoch_s": float(log["epoch_end_timestamps"][e] - log["epoch_start_timestamps"][e]),
            }
            for e in range(len(log["train_losses"]))
        ]
        best_epoch = int(np.argmax(log["ema_fg_dice"])) + 1
        best_file = Path(trainer.output_folder) / "checkpoint_best.pth"
        if not best_file.is_file():
            best_file = Path(trainer.output_folder) / "checkpoint_final.pth"
        spacing = tuple(float(s) for s in store.get(ids[0]).spacing)
        NnUNetSegmenter.bundle(
            best_file, Path(trainer.output_folder_base), out_path, default_spacing=spacing,
            use_mirroring=cfg.use_mirroring, tile_step_size=cfg.tile_step_size,
        )
    return {
        "checkpoint_path": str(out_path),
        "history": history,
        "best_val_dice": float(max(log["ema_fg_dice"])),
        "best_epoch": best_epoch,
        "plans_file": str(plans_file),
        "plans_sha256": file_sha256(plans_file),
        "planned": planned,
        "preprocessed": new,
        "resumed": resume,
        "wall_s": time.perf_counter() - t0,
    }
