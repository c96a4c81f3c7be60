"""The persistent training service: one Ray Train run per experiment, rounds fed through a coordinator.

Per-round ``TorchTrainer.fit()`` calls paid 13-30 s of start-up each (controller, worker group, helper
actors, torch/MONAI imports) and threw away the optimiser state. Here one ``fit()`` runs for the whole
experiment in a driver thread; its workers (:mod:`raylearn.train.worker`) take rounds from a
:class:`~raylearn.train.coordinator.RoundCoordinator` actor. Usage::

    service = TrainingService(store, model_cfg, train_cfg, total_steps=1000, storage_path="runs/x/ray_train")
    service.start()
    service.submit_round(0, labelled_ids, steps=400)
    result = service.wait_round(0)      # RoundResult: checkpoint bytes, metrics, timings
    ...
    service.stop()

Fault tolerance is Ray Train's: ``FailureConfig(max_failures)`` restarts the worker group, which resumes from
the last reported checkpoint (mid-round). With ``resume=True`` a new driver re-attaches to the run directory
``<storage_path>/<name>`` and Ray Train hands the workers its latest checkpoint; without it the directory is
cleared first, so a fresh run never continues a stale one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raylearn.models.config import ModelConfig, TrainConfig

__all__ = ["RoundResult", "TrainingService", "TrainingServiceError", "live_placement_groups"]

logger = logging.getLogger(__name__)

#: the services started in this process and not stopped yet (see :func:`live_placement_groups`)
_LIVE: dict[int, TrainingService] = {}


def live_placement_groups() -> list[str]:
    """Hex ids of the worker-group placement groups of this process's running training services.

    A Ray Tune trial reports them (``raylearn.tune``): Tune ends a stopped trial by ending its actor, so the
    service never reaches :meth:`TrainingService.stop`, and Ray Train's own clean-up of the orphaned placement
    group needs the dashboard's state API, absent from a local ``include_dashboard=False`` instance. Without
    this the sweep's driver could not release them, and every stopped trial kept its CPUs reserved for good.
    """
    out: set[str] = set()
    for service in list(_LIVE.values()):
        try:
            out.update(service.placement_groups())
        except Exception as err:  # noqa: BLE001 - a coordinator lost with its node: nothing to report from it
            logger.debug("training service %s: no placement groups (%s)", service.name, err)
    return sorted(out)

#: ``hook(rank, round, step, attempt)`` run in each worker after every optimiser step (tests inject faults here)
StepHook = Callable[[int, int, int, int], None]


class TrainingServiceError(RuntimeError):
    """The training run failed for good (beyond ``train.max_failures``) or stopped unexpectedly."""


@dataclass
class RoundResult:
    """What one round of the service produced.

    Attributes:
        round: the round index.
        checkpoint: bytes of a :meth:`MonaiSegmenter.save`-format checkpoint with the published weights.
        info: the worker's round record: ``steps``, ``trained_steps``, ``resumed_at_step``, ``train_s`` (pure
            step time), ``load_s``, ``loss``, ``lr``, ``n_train``, ``n_val``, ``attempt``, ``global_step``,
            ``val_dice`` (with a hold-out), ``ddp_param_spread``.
        wall_s: driver wall time from submission to the result.
    """

    round: int
    checkpoint: bytes
    info: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    def save(self, path: str | Path) -> Path:
        """Write the checkpoint atomically; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.checkpoint)
        tmp.replace(path)
        return path


class TrainingService:
    """Driver side of the persistent training service (MONAI backend).

    Args:
        store: the pool store (or its path); workers re-open it.
        model_cfg: the resolved model config (numeric ``patch_size`` and ``dropout``).
        train_cfg: recipe, Ray Train scaling and fault tolerance.
        total_steps: the run's whole step budget (the LR schedule spans it).
        storage_path: Ray Train storage, a path or a URI pyarrow resolves on every node (``s3://``, ``gs://``,
            an NFS mount); the run lives in ``<storage_path>/<name>``.
        name: Ray Train run name.
        resume: continue the run directory's latest checkpoint instead of clearing it.
        init_checkpoint: warm-start weights for a fresh run (path to a MONAI checkpoint).
        step_hook: ``hook(rank, round, step, attempt)`` run in the workers after every step (pickled).
        scaling: the run's resource plan for training (:class:`~raylearn.resource_plan.ResourcePlan`'s
            ``train_workers`` / ``train_resources`` / ``use_gpu``): ``{"num_workers": int | (min, max),
            "resources_per_worker": {...}, "use_gpu": bool}``; None = ``train_cfg``'s own settings.
        promptable: the promptable model's settings; when enabled, every round has a second phase on the same
            workers that fine-tunes it (:meth:`wait_promptable` returns its checkpoint).

    Test switch: ``RAYLEARN_GPU_FALLBACK=cpu`` (logical ``GPU`` resources without CUDA, as in the multi-node tests)
    makes a ``use_gpu`` run's process group use gloo instead of NCCL; the models then run on the CPU.
    """

    def __init__(self, store, model_cfg: ModelConfig, train_cfg: TrainConfig, total_steps: int,
                 storage_path: str | Path, name: str = "service", resume: bool = False,
                 init_checkpoint: str | Path | None = None, step_hook: StepHook | None = None,
                 scaling: dict[str, Any] | None = None, promptable=None) -> None:
        if model_cfg.backend != "monai_unet":
            raise ValueError("TrainingService trains the MONAI backend; nnU-Net rounds use raylearn.train.nnunet")
        if model_cfg.patch_size == "auto" or model_cfg.dropout == "auto":
            raise ValueError("TrainingService needs a resolved model config (resolve_model_config): "
                             f"patch_size={model_cfg.patch_size!r}, dropout={model_cfg.dropout!r}")
        if isinstance(store, str | Path):
            from raylearn.data.store import PoolStore

            store = PoolStore.open(store)
        self.store = store
        self.model_cfg, self.train_cfg = model_cfg, train_cfg
        self.total_steps = int(total_steps)
        self.storage = str(storage_path) if "://" in str(storage_path) else \
            str(Path(storage_path).expanduser().resolve())
        self.scaling = dict(scaling or {})
        self.name, self.resume = name, resume
        self.init_checkpoint = init_checkpoint
        self.step_hook = step_hook
        self.promptable = promptable if promptable is not None and promptable.enabled else None
        self.coordinator: Any = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._known = set(store.case_ids())
        self.startup_s = 0.0

    @property
    def run_dir(self) -> str:
        """``<storage>/<name>``: a local path or a URI."""
        return f"{self.storage.rstrip('/')}/{self.name}"

    def _clear_run_dir(self) -> None:
        """Delete a previous run's directory through pyarrow (local, NFS or object storage alike)."""
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(self.run_dir)
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            logger.info("training service: clearing the previous run in %s", self.run_dir)
            fs.delete_dir(path)
        base_fs, base = pafs.FileSystem.from_uri(self.storage)
        base_fs.create_dir(base, recursive=True)

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> TrainingService:
        """Create the coordinator and launch the experiment's single ``TorchTrainer.fit()`` in a thread."""
        import ray
        import ray.train
        from ray.train.torch import TorchConfig, TorchTrainer

        from raylearn.models.training import check_init_checkpoint
        from raylearn.train.coordinator import RoundCoordinator
        from raylearn.train.worker import service_loop

        t0 = time.perf_counter()
        if not self.resume:
            self._clear_run_dir()
        in_ch, n_cls = int(self.store.num_channels), int(self.store.num_classes)
        init_ref = None
        if self.init_checkpoint is not None:
            from raylearn.models.unet import MonaiSegmenter

            state = check_init_checkpoint(self.init_checkpoint, self.model_cfg, in_ch, n_cls)
            train_state = MonaiSegmenter.read_checkpoint(self.init_checkpoint).get("train_state")
            init_ref = ray.put({"state_dict": state, "train_state": train_state})
        # the round queue lives on the driver's node (the head of a cluster): losing a worker node never loses it
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = ray.get_runtime_context().get_node_id()
        self.coordinator = RoundCoordinator.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()
        cfg = self.train_cfg
        use_gpu = bool(self.scaling.get("use_gpu", cfg.use_gpu))
        num_workers = self.scaling.get("num_workers", cfg.num_workers)
        resources = dict(self.scaling.get("resources_per_worker") or cfg.resources_per_worker
                         or {"CPU": 1, **({"GPU": 1} if use_gpu else {})})
        backend = "gloo" if use_gpu and os.environ.get("RAYLEARN_GPU_FALLBACK") == "cpu" else None
        config = {
            "store": self.store, "coordinator": self.coordinator, "init_state": init_ref,
            "model_cfg": self.model_cfg.model_dump(mode="json"), "train_cfg": cfg.model_dump(mode="json"),
            "in_channels": in_ch, "num_classes": n_cls, "total_steps": self.total_steps,
            "step_hook": self.step_hook,
            "promptable_cfg": self.promptable.model_dump(mode="json") if self.promptable is not None else None,
        }
        trainer = TorchTrainer(
            service_loop,
            train_loop_config=config,
            torch_config=TorchConfig(backend=backend),
            scaling_config=ray.train.ScalingConfig(num_workers=tuple(num_workers) if isinstance(
                num_workers, list | tuple) else int(num_workers), use_gpu=use_gpu, resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name=self.name, storage_path=str(self.storage),
                # a worker group that cannot start again (its node is gone) fails the run instead of retrying
                # forever: the driver then re-plans on what is left (raylearn.train.backends.MonaiRounds)
                failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures,
                                                       controller_failure_limit=max(2, cfg.max_failures)),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            ),
        )

        def _fit() -> None:
            try:
                trainer.fit()
            except BaseException as err:  # noqa: BLE001 - surfaced to the driver in wait_round
                self._error = err
                logger.error("training service failed: %s", err)

        self._thread = threading.Thread(target=_fit, name=f"raylearn-train-{self.name}", daemon=True)
        self._thread.start()
        _LIVE[id(self)] = self
        self.startup_s = time.perf_counter() - t0
        logger.info("training service %s: %s worker(s), %s each, %d steps in all, storage %s", self.name,
                    num_workers, resources, self.total_steps, self.storage)
        return self

    def stop(self, timeout_s: float = 120.0) -> None:
        """Let the workers leave their loop and the ``fit()`` finish; then drop the coordinator (idempotent)."""
        import ray

        if self.coordinator is None:
            return
        try:
            ray.get(self.coordinator.stop.remote(), timeout=30)
        except Exception as err:  # noqa: BLE001 - the coordinator died with the cluster
            logger.warning("training service: could not signal stop: %s", err)
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("training service: fit() did not finish within %.0f s", timeout_s)
        ray.kill(self.coordinator)
        self.coordinator = None
        _LIVE.pop(id(self), None)

    def __enter__(self) -> TrainingService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- rounds -----------------------------------------------------------------------------------
    def submit_round(self, round_index: int, labeled_ids: Sequence[str], steps: int | None = None,
                     seed: int | None = None, hold: bool = False) -> None:
        """Queue a round: every labelled id so far, ``steps`` optimiser steps (default ``train.round_steps``).
        With ``hold``, the workers keep training past ``steps`` until :meth:`release_round`."""
        import ray

        ids = list(dict.fromkeys(str(i) for i in labeled_ids))
        unknown = [i for i in ids if i not in self._known]
        if unknown:
            raise ValueError(f"labelled ids not in the pool store: {unknown[:5]}")
        if not ids:
            raise ValueError("a round needs at least one labelled case id")
        if self.coordinator is None:
            raise TrainingServiceError("the training service is not running: call start() first")
        steps = self.train_cfg.round_steps(round_index) if steps is None else int(steps)
        spec = {"round": int(round_index), "ids": ids, "steps": steps,
                "seed": int(self.train_cfg.seed if seed is None else seed), "submitted_at": time.time(),
                "hold": bool(hold), "poll": self.train_cfg.label_poll_steps()}
        if self.promptable is not None:
            spec["promptable_steps"] = self.promptable.round_steps(round_index)
        ray.get(self.coordinator.submit.remote(spec))
        self._submitted = time.perf_counter()

    def extend_round(self, round_index: int, labeled_ids: Sequence[str]) -> int:
        """Add labels to a round while it trains (workers pick them up between steps); returns the version."""
        import ray

        unknown = [i for i in labeled_ids if str(i) not in self._known]
        if unknown:
            raise ValueError(f"labelled ids not in the pool store: {unknown[:5]}")
        return int(ray.get(self.coordinator.extend.remote(round_index, [str(i) for i in labeled_ids])))

    def release_round(self, round_index: int) -> int:
        """Let a round submitted with ``hold`` end (at its step budget, or soon after when it is past it)."""
        import ray

        return int(ray.get(self.coordinator.release.remote(int(round_index))))

    def wait_round(self, round_index: int, timeout_s: float | None = None) -> RoundResult:
        """Block until the round's weights are published; raises :class:`TrainingServiceError` if training died."""
        import ray

        t0 = getattr(self, "_submitted", time.perf_counter())
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            res = ray.get(self.coordinator.wait_result.remote(round_index, 2.0))
            if res is not None:
                info = {k: v for k, v in res.items() if k != "checkpoint"}
                return RoundResult(round=int(round_index), checkpoint=res["checkpoint"], info=info,
                                   wall_s=time.perf_counter() - t0)
            if self._thread is not None and not self._thread.is_alive():
                raise TrainingServiceError(f"training stopped before round {round_index} finished: "
                                           f"{self._error or 'fit() returned'}")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"round {round_index} did not finish within {timeout_s} s")

    def wait_promptable(self, round_index: int, timeout_s: float | None = None) -> RoundResult:
        """Block until the round's promptable-model phase has published its weights (``checkpoint`` = bytes of an
        official-layout SAM-Med3D checkpoint); raises :class:`TrainingServiceError` if training died."""
        import ray

        if self.promptable is None:
            raise TrainingServiceError("this training service does not fine-tune a promptable model "
                                       "(promptable.enabled is false)")
        t0 = time.perf_counter()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            res = ray.get(self.coordinator.wait_prompt.remote(round_index, 2.0))
            if res is not None:
                info = {k: v for k, v in res.items() if k != "checkpoint"}
                return RoundResult(round=int(round_index), checkpoint=res["checkpoint"], info=info,
                                   wall_s=time.perf_counter() - t0)
            if self._thread is not None and not self._thread.is_alive():
                raise TrainingServiceError(f"training stopped before the promptable model of round {round_index} "
                                           f"finished: {self._error or 'fit() returned'}")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the promptable model of round {round_index} did not finish within {timeout_s} s")

    def fit_round(self, round_index: int, labeled_ids: Sequence[str], steps: int | None = None,
                  seed: int | None = None) -> RoundResult:
        """``submit_round`` + ``wait_round``."""
        self.submit_round(round_index, labeled_ids, steps, seed)
        return self.wait_round(round_index)

    def status(self) -> dict[str, Any]:
        """The coordinator's view: registered worker processes, progress, submitted and finished rounds."""
        import ray

        return ray.get(self.coordinator.status.remote())

    def placement_groups(self) -> set[str]:
        """Hex ids of the placement groups the service's worker groups ran in (one per worker-group start)."""
        if self.coordinator is None:
            return set()
        return {w["placement_group"] for w in self.status()["workers"] if w.get("placement_group")}
