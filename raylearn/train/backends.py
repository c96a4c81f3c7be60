"""One small interface over the training backends, so the round loop never branches on them.

``trainer = make_round_trainer(...)``; ``trainer.start()``; per round ``trainer.fit(r, labelled_ids, seed)``
returns the round's checkpoint path (written atomically under ``checkpoints/``) and its info; ``stop()``.

- MONAI: the persistent :class:`~raylearn.train.service.TrainingService` (one Ray Train run for the whole
  experiment, rounds warm, resumable mid-round).
- nnU-Net: one Ray task per round (:func:`~raylearn.train.nnunet.fit_round_nnunet`), fine-tuning from the
  previous round's bundle; a killed driver resumes the interrupted round from nnU-Net's own checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from raylearn.models.config import ModelConfig, TrainConfig

__all__ = ["MonaiRounds", "NnunetRounds", "make_round_trainer"]

log = logging.getLogger(__name__)


class MonaiRounds:
    """Rounds on the persistent training service."""

    def __init__(self, store, model_cfg: ModelConfig, train_cfg: TrainConfig, total_steps: int, run_root: Path,
                 resume: bool, step_hook=None, name: str = "service", init_checkpoint: str | None = None,
                 storage: str | None = None, scaling: dict | None = None) -> None:
        from raylearn.train.service import TrainingService

        self.ckpt_dir = Path(run_root) / "checkpoints"
        # on resume the service's own latest checkpoint wins; the last recorded round's weights are the
        # fallback when the run directory is gone (the optimiser state is then lost, and said so)
        self.service = TrainingService(store, model_cfg, train_cfg, total_steps,
                                       storage_path=storage or Path(run_root) / "ray_train", name=name,
                                       resume=resume, step_hook=step_hook, init_checkpoint=init_checkpoint,
                                       scaling=scaling)

    def start(self) -> MonaiRounds:
        self.service.start()
        return self

    def fit(self, round_index: int, labeled_ids: list[str], seed: int, steps: int | None = None,
            name: str | None = None) -> tuple[str, dict[str, Any]]:
        res = self.service.fit_round(round_index, labeled_ids, steps=steps, seed=seed)
        path = res.save(self.ckpt_dir / f"{name or f'round_{round_index:02d}'}.pt")
        return str(path), {**res.info, "wall_s": res.wall_s}

    def stop(self) -> None:
        self.service.stop()


class NnunetRounds:
    """Rounds as nnU-Net tasks, each fine-tuned from the previous round's bundle."""

    def __init__(self, store, model_cfg: ModelConfig, train_cfg: TrainConfig, run_root: Path, resume: bool,
                 init_checkpoint: str | None = None, epochs: int | None = None) -> None:
        self.store, self.model_cfg, self.train_cfg = store, model_cfg, train_cfg
        self.run_root = Path(run_root)
        self.resume = resume
        self.previous = init_checkpoint
        self.epochs = epochs

    def start(self) -> NnunetRounds:
        return self

    def fit(self, round_index: int, labeled_ids: list[str], seed: int, steps: int | None = None,
            name: str | None = None) -> tuple[str, dict[str, Any]]:
        from raylearn.train.nnunet import fit_round_nnunet

        name = name or f"round_{round_index:02d}"
        cfg = self.train_cfg.model_copy(update={"seed": seed % 2**31,
                                                "storage_path": str((self.run_root / "ray_train").resolve())})
        fit = fit_round_nnunet(self.store, labeled_ids, self.previous, self.model_cfg, cfg, round_index=round_index,
                               name=name, resume=self.resume, epochs=self.epochs)
        kept = self.run_root / "checkpoints" / f"{name}.pt"
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fit.checkpoint_path, kept.with_suffix(".tmp"))
        os.replace(kept.with_suffix(".tmp"), kept)
        self.previous = str(kept)
        return str(kept), {"best_val_dice": fit.best_val_dice, "wall_s": fit.wall_s, "restarts": fit.restarts,
                           "epochs": len(fit.history)}

    def stop(self) -> None:
        return None


def make_round_trainer(store, model_cfg: ModelConfig, train_cfg: TrainConfig, run_root: Path, rounds: int,
                       resume: bool, previous_checkpoint: str | None = None, step_hook=None,
                       storage: str | None = None, scaling: dict | None = None):
    """The backend's round trainer for an experiment of ``1 + rounds`` rounds.

    ``storage`` (Ray Train's storage URI, default ``<run_root>/ray_train``) and ``scaling`` (the resource plan's
    ``num_workers`` / ``resources_per_worker`` / ``use_gpu``) apply to the MONAI service; the round checkpoints the
    driver keeps stay under ``run_root/checkpoints`` beside the ledger."""
    if model_cfg.backend == "nnunet":
        return NnunetRounds(store, model_cfg, train_cfg, run_root, resume, init_checkpoint=previous_checkpoint)
    return MonaiRounds(store, model_cfg, train_cfg, train_cfg.run_steps(rounds), run_root, resume,
                       step_hook=step_hook, init_checkpoint=previous_checkpoint if resume else None,
                       storage=storage, scaling=scaling)
