"""nnU-Net v2 rounds on Ray (``model.backend: nnunet``): :func:`fit_round_nnunet`.

nnU-Net's own trainer runs each round inside one Ray task (its environment variables passed through
``runtime_env``); the dataset fingerprint and plans are made once and reused, and each round fine-tunes
from the previous round's checkpoint bundle. A task that fails is retried (``train.max_failures``) and
resumes nnU-Net's latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raylearn.models.config import ModelConfig, TrainConfig
from raylearn.models.training import split_validation

__all__ = ["FitResult", "fit_round_nnunet"]

logger = logging.getLogger(__name__)


@dataclass
class FitResult:
    """Outcome of one nnU-Net round.

    Attributes:
        checkpoint_path: the round's bundle (``checkpoint_best.pth`` of nnU-Net plus plans), loadable with
            :func:`raylearn.models.loading.load_segmenter`.
        history: one dict per epoch (``epoch``, ``loss``, ``val_loss``, ``val_dice``, ``ema_val_dice``, ``lr``,
            ``epoch_s``).
        best_val_dice: nnU-Net's EMA pseudo-Dice of the best checkpoint.
        wall_s: wall-clock seconds of the round.
        best_epoch: 1-based epoch of the best checkpoint.
        train_ids, val_ids: the split used; ``val_on_train`` when nothing was held out.
        run_dir: ``<storage_path>/<name>``.
        restarts: 1 when a retried task resumed.
        extra: ``plans_file``, ``plans_sha256``, ``planned``, ``preprocessed``.
    """

    checkpoint_path: Path
    history: list[dict[str, Any]]
    best_val_dice: float
    wall_s: float
    best_epoch: int = -1
    train_ids: list[str] = field(default_factory=list)
    val_ids: list[str] = field(default_factory=list)
    val_on_train: bool = False
    run_dir: Path | None = None
    restarts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _prepare_round(store, labeled_ids, train_cfg: TrainConfig, round_index: int, name: str | None):
    """Open the store, check the labelled ids and split off validation (nnU-Net validates on the training
    cases when nothing is held out)."""
    if isinstance(store, str | Path):
        from raylearn.data.store import PoolStore

        store = PoolStore.open(store)
    name = name or f"round_{round_index:03d}"
    known = set(store.case_ids())
    unknown = [i for i in labeled_ids if str(i) not in known]
    if unknown:
        raise ValueError(f"labelled ids not in the pool store: {unknown[:5]}")
    train_ids, val_ids = split_validation(labeled_ids, train_cfg)
    val_on_train = not val_ids
    if val_on_train:
        val_ids = list(train_ids)
    return store, name, train_ids, val_ids, val_on_train


def _nnunet_task(store, train_ids, val_ids, cfg_json, work_dir, out_path, results_name, init_bundle, use_gpu):
    """Ray task body: one nnU-Net round with the nnU-Net environment from ``runtime_env``."""
    from raylearn.models.config import NnUNetConfig
    from raylearn.models.nnunet import run_round

    cfg = NnUNetConfig.model_validate(cfg_json)
    return run_round(store, train_ids, val_ids, cfg, work_dir, out_path, results_name, init_bundle, use_gpu)


def _fresh_run_dir(run_dir: Path, resume: bool) -> None:
    if run_dir.exists() and not resume:
        logger.warning("[%s] deleting the previous run in %s (pass resume=True to continue it)", run_dir.name, run_dir)
        shutil.rmtree(run_dir)


def fit_round_nnunet(store, labeled_ids: Sequence[str], init_checkpoint: str | Path | None, model_cfg: ModelConfig,
                     train_cfg: TrainConfig, round_index: int = 0, name: str | None = None, resume: bool = False,
                     epochs: int | None = None) -> FitResult:
    """One nnU-Net round: a Ray task holding one worker's resources runs :func:`raylearn.models.nnunet.run_round`.

    nnU-Net's trainer owns its loop (epochs of ``iterations_per_epoch``), so this backend runs a task per round,
    fine-tuning from ``init_checkpoint`` (the previous round's bundle) with the plans fixed at round 0.
    ``epochs`` overrides ``model.nnunet.epochs`` (the full-pool reference gets the run's total).
    ``resume`` continues an interrupted round of the same ``name`` instead of deleting it.
    """
    import ray

    from raylearn.models.nnunet import nnunet_env

    store, name, train_ids, val_ids, val_on_train = _prepare_round(store, labeled_ids, train_cfg, round_index, name)
    t0 = time.perf_counter()
    cfg = model_cfg.nnunet if epochs is None else model_cfg.nnunet.model_copy(update={"epochs": int(epochs)})
    storage = Path(train_cfg.storage_path).expanduser().resolve()
    work = Path(cfg.work_dir).expanduser().resolve() if cfg.work_dir else storage / "nnunet"
    run_dir = storage / name
    init = None
    if init_checkpoint is not None:
        from raylearn.models.nnunet import NnUNetSegmenter

        NnUNetSegmenter.read_bundle(init_checkpoint)  # fail here, naming the file, if it is not a bundle
        init = Path(init_checkpoint).resolve()
        if run_dir in init.parents and not resume:  # keep it from being deleted with the old run
            work.mkdir(parents=True, exist_ok=True)
            init = Path(shutil.copyfile(init, work / f"init_{name}.pt"))
    _fresh_run_dir(run_dir, resume)
    _fresh_run_dir(work / "nnUNet_results" / name, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    out_path = run_dir / "best.pt"
    resources = dict(train_cfg.resources_per_worker or {"CPU": 1, **({"GPU": 1} if train_cfg.use_gpu else {})})
    task = ray.remote(_nnunet_task).options(
        num_cpus=resources.pop("CPU", 1),
        num_gpus=resources.pop("GPU", 0),
        resources=resources or None,
        max_retries=max(train_cfg.max_failures, 0),
        runtime_env={"env_vars": nnunet_env(work, cfg, results_name=name)},
    )
    logger.info("[%s] nnU-Net %s: %d training, %d validation cases", name, cfg.configuration, len(train_ids),
                len(val_ids))
    out = ray.get(task.remote(store, train_ids, val_ids, cfg.model_dump(mode="json"), str(work), str(out_path), name,
                              str(init) if init else None, train_cfg.use_gpu))
    (run_dir / "history.json").write_text(json.dumps(out, indent=1, default=str))
    for h in out["history"]:
        logger.info("[%s] epoch %d/%d loss %.4f val_dice %.4f", name, h["epoch"], cfg.epochs, h["loss"], h["val_dice"])
    return FitResult(
        checkpoint_path=Path(out["checkpoint_path"]),
        history=out["history"],
        best_val_dice=float(out["best_val_dice"]),
        wall_s=time.perf_counter() - t0,
        best_epoch=int(out["best_epoch"]),
        train_ids=train_ids,
        val_ids=val_ids,
        val_on_train=val_on_train,
        run_dir=run_dir,
        restarts=int(bool(out["resumed"])),
        extra={k: out[k] for k in ("plans_file", "plans_sha256", "planned", "preprocessed")},
    )
