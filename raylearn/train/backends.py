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
    """Rounds on the persistent training service.

    ``replan()`` (optional) returns a new ``scaling`` for the GPUs the cluster has *now*, or raises. When the
    service fails for good (a node was lost and Ray Train cannot start its fixed-size worker group again), the
    round is re-run on a new service of that size, resumed from the run's last Ray Train checkpoint. Ray Train's
    own elastic mode is not used: it counts the cluster's resources without the pool shards that hold part of
    every GPU, so it keeps asking for workers that cannot start.
    """

    def __init__(self, store, model_cfg: ModelConfig, train_cfg: TrainConfig, total_steps: int, run_root: Path,
                 resume: bool, step_hook=None, name: str = "service", init_checkpoint: str | None = None,
                 storage: str | None = None, scaling: dict | None = None, replan=None, max_replans: int = 3,
                 promptable=None) -> None:
        self.ckpt_dir = Path(run_root) / "checkpoints"
        self.promptable = promptable if promptable is not None and promptable.enabled else None
        self._args = dict(store=store, model_cfg=model_cfg, train_cfg=train_cfg, total_steps=total_steps,
                          storage_path=storage or Path(run_root) / "ray_train", name=name, step_hook=step_hook,
                          promptable=self.promptable)
        self.replan, self.max_replans, self.replans = replan, int(max_replans), 0
        # on resume the service's own latest checkpoint wins; the last recorded round's weights are the
        # fallback when the run directory is gone (the optimiser state is then lost, and said so)
        self.service = self._service(resume, scaling, init_checkpoint)

    def _service(self, resume: bool, scaling: dict | None, init_checkpoint: str | None = None):
        from raylearn.train.service import TrainingService

        return TrainingService(**self._args, resume=resume, init_checkpoint=init_checkpoint, scaling=scaling)

    def start(self) -> MonaiRounds:
        self.service.start()
        return self

    def fit(self, round_index: int, labeled_ids: list[str], seed: int, steps: int | None = None,
            name: str | None = None) -> tuple[str, dict[str, Any]]:
        from raylearn.train.service import TrainingServiceError

        while True:
            try:
                res = self.service.fit_round(round_index, labeled_ids, steps=steps, seed=seed)
                break
            except TrainingServiceError as err:
                if self.replan is None or self.replans >= self.max_replans:
                    raise
                scaling = self.replan()  # raises (naming the keys) when nothing fits any more
                self.replans += 1
                log.warning("round %d: training stopped (%s); re-planned on the cluster as it is now: %s; "
                            "resuming from the last checkpoint", round_index, str(err).splitlines()[0], scaling)
                self.service.stop(timeout_s=30)
                self.service = self._service(True, scaling).start()
        path = res.save(self.ckpt_dir / f"{name or f'round_{round_index:02d}'}.pt")
        return str(path), {**res.info, "wall_s": res.wall_s, "replans": self.replans}

    def collect_promptable(self, round_index: int) -> dict[str, Any] | None:
        """The round's promptable model (phase 2 of the round on the same workers): written atomically to
        ``checkpoints/promptable_round_XX.pt`` beside the segmenter's; returns its info with ``checkpoint`` and
        ``version``, or None when the promptable model is off. With ``promptable.serve_config`` set, the running
        Serve app takes the weights live (:func:`raylearn.serve.publish.publish_promptable`)."""
        if self.promptable is None:
            return None
        res = self.service.wait_promptable(round_index)
        path = res.save(self.ckpt_dir / f"promptable_round_{round_index:02d}.pt")
        info = {**res.info, "checkpoint": str(path), "wall_s": res.wall_s}
        if self.promptable.serve_config:
            from raylearn.serve.publish import publish_promptable

            try:
                info["served"] = publish_promptable(str(path), info["version"], self.promptable.serve_config,
                                                    app_name=self.promptable.serve_app)
            except Exception as err:  # noqa: BLE001 - a missing or failing Serve app must not stop the run
                log.warning("round %d: could not publish the promptable model to the Serve app of %s: %s",
                            round_index, self.promptable.serve_config, err)
                info["served"] = None
        return info

    def stop(self) -> None:
        self.service.stop()


class NnunetRounds:
    """Rounds as nnU-Net tasks, each fine-tuned from the previous round's bundle.

    ``storage`` (default ``<run_root>/ray_train``) holds nnU-Net's working folders and each round's bundle, which
    the next round's task reads: on several nodes a path they all mount (nnU-Net needs a filesystem, not a URI).
    ``scaling``'s ``resources_per_worker`` (the plan's GPU share) sizes the round's task."""

    def __init__(self, store, model_cfg: ModelConfig, train_cfg: TrainConfig, run_root: Path, resume: bool,
                 init_checkpoint: str | None = None, epochs: int | None = None, storage: str | None = None,
                 scaling: dict | None = None) -> None:
        if storage is not None and "://" in str(storage):
            raise ValueError(f"cluster.storage: nnU-Net rounds need a filesystem path every node mounts, got {storage}")
        self.storage = str(Path(storage or Path(run_root) / "ray_train").expanduser().resolve())
        if scaling and scaling.get("resources_per_worker"):
            train_cfg = train_cfg.model_copy(update={"resources_per_worker": dict(scaling["resources_per_worker"]),
                                                     "use_gpu": bool(scaling.get("use_gpu", train_cfg.use_gpu))})
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
        cfg = self.train_cfg.model_copy(update={"seed": seed % 2**31, "storage_path": self.storage})
        fit = fit_round_nnunet(self.store, labeled_ids, self.previous, self.model_cfg, cfg, round_index=round_index,
                               name=name, resume=self.resume, epochs=self.epochs)
        kept = self.run_root / "checkpoints" / f"{name}.pt"
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fit.checkpoint_path, kept.with_suffix(".tmp"))
        os.replace(kept.with_suffix(".tmp"), kept)
        # the next round's task reads the bundle from the storage (shared), not the driver's copy
        self.previous = str(fit.checkpoint_path)
        return str(kept), {"best_val_dice": fit.best_val_dice, "wall_s": fit.wall_s, "restarts": fit.restarts,
                           "epochs": len(fit.history)}

    def stop(self) -> None:
        return None


def make_round_trainer(store, model_cfg: ModelConfig, train_cfg: TrainConfig, run_root: Path, rounds: int,
                       resume: bool, previous_checkpoint: str | None = None, step_hook=None,
                       storage: str | None = None, scaling: dict | None = None, replan=None, promptable=None):
    """The backend's round trainer for an experiment of ``1 + rounds`` rounds.

    ``storage`` (Ray Train's storage URI, default ``<run_root>/ray_train``) and ``scaling`` (the resource plan's
    ``num_workers`` / ``resources_per_worker`` / ``use_gpu``) apply to the MONAI service; the round checkpoints the
    driver keeps stay under ``run_root/checkpoints`` beside the ledger. ``replan`` (MONAI): see :class:`MonaiRounds`."""
    if model_cfg.backend == "nnunet":
        if promptable is not None and promptable.enabled:
            raise ValueError("promptable.enabled: the promptable model is fine-tuned by the MONAI training service; "
                             "model.backend nnunet has none (set model.backend: monai_unet)")
        return NnunetRounds(store, model_cfg, train_cfg, run_root, resume, init_checkpoint=previous_checkpoint,
                            storage=storage, scaling=scaling)
    return MonaiRounds(store, model_cfg, train_cfg, train_cfg.run_steps(rounds), run_root, resume,
                       step_hook=step_hook, init_checkpoint=previous_checkpoint if resume else None,
                       storage=storage, scaling=scaling, replan=replan, promptable=promptable)
