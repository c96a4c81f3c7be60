"""Per-round fine-tuning with Ray Train: :func:`fit_round`.

The driver splits the labelled ids into train/validation, puts the warm-start weights in the object
store once, and runs a :class:`ray.train.torch.TorchTrainer`. Every worker opens the pool store itself
(it pickles by path), reads its cases, trains with DDP when ``num_workers > 1`` (gloo on CPU, NCCL on
GPU: the same code), validates its share of the validation cases (Dice all-reduced), and reports
metrics each epoch with a checkpoint from rank 0. A worker failure restarts the group from the last
reported checkpoint (``FailureConfig(max_failures)``); the best checkpoint by validation Dice is copied
to ``<storage_path>/<name>/best.pt``.

Fault injection (tests, chaos drills): with ``RAYLEARN_TRAIN_FAIL_ONCE=<marker file>:<epoch>`` set in
the driver's environment, rank 0 creates the marker and kills its own process during that epoch
(0-based), once (while no marker exists).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raylearn.models.config import ModelConfig, TrainConfig
from raylearn.models.training import check_init_checkpoint, ddp_param_spread, split_validation
from raylearn.models.unet import MonaiSegmenter

__all__ = ["FitResult", "fit_round", "split_validation"]

logger = logging.getLogger(__name__)

FAIL_ENV = "RAYLEARN_TRAIN_FAIL_ONCE"


@dataclass
class FitResult:
    """Outcome of one round of training.

    Attributes:
        checkpoint_path: best model by validation Dice, ``<storage_path>/<name>/best.pt`` (a
            :meth:`MonaiSegmenter.save` file, or an nnU-Net bundle of ``checkpoint_best.pth``); load either
            with :func:`raylearn.models.loading.load_segmenter`.
        history: one dict per epoch (``epoch``, ``loss``, ``val_dice``, ``val_dice_<class name>``, ``lr``,
            ``steps``, ``train_s``, ``val_s``, ``validated``, ``attempt``, ``ddp_param_spread``, ``epoch_start``,
            ``cpu_s``; nnU-Net: ``epoch``, ``loss``, ``val_loss``, ``val_dice``, ``ema_val_dice``, ``lr``, ``epoch_s``).
        best_val_dice: mean foreground Dice of the best checkpoint on the validation cases (nnU-Net: its
            EMA pseudo-Dice).
        wall_s: wall-clock seconds of the whole round (including Ray Train start-up).
        best_epoch: 1-based epoch of the best checkpoint.
        train_ids, val_ids: the split used; ``val_on_train`` when too few labels to hold any out.
        run_dir: ``<storage_path>/<name>``.
        restarts: worker-group restarts after failures (nnU-Net: 1 when a retried task resumed).
        extra: backend details (nnU-Net: ``plans_file``, ``plans_sha256``, ``planned``, ``preprocessed``).
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


def _read_cases(store, ids: Sequence[str]) -> list[dict[str, Any]]:
    """Worker-side: read ``{"case_id", "image" [C,D,H,W], "label" [D,H,W]}`` from the pool store."""
    cases = []
    for cid in ids:
        case = store.get(cid)
        if case.label is None:
            raise ValueError(f"case {cid!r} has no label in the pool store; only labelled cases can be trained on")
        cases.append({"case_id": cid, "image": case.image, "label": case.label})
    return cases


def _fault_hook(spec: str | None, epoch: int, rank: int):
    """``on_step`` callback that kills rank 0 in the middle of epoch ``<epoch>`` (0-based) once, or None."""
    if not spec or rank != 0:
        return None
    marker, _, at = spec.rpartition(":")
    if int(at) != epoch or os.path.exists(marker):
        return None

    def hook(step: int) -> None:
        if step == 0:
            Path(marker).write_text(f"killed rank 0 in epoch {epoch + 1}, pid {os.getpid()}\n")
            logger.warning("fault injection: killing worker process %d in epoch %d", os.getpid(), epoch + 1)
            time.sleep(4.0)  # let the controller collect the previous report (health checks every 2 s)
            os._exit(1)

    return hook


def _train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker loop (runs in every worker process)."""
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from raylearn.models import training as T

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    model_cfg = ModelConfig.model_validate(config["model_cfg"])
    cfg = TrainConfig.model_validate(config["train_cfg"])
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    store = config["store"]
    train_cases = _read_cases(store, config["train_ids"])
    val_cases = _read_cases(store, config["val_ids"][rank::world])

    seg = MonaiSegmenter(model_cfg, config["in_channels"], config["num_classes"], seed=cfg.seed, device=device)
    opt = T.make_optimizer(seg.network.parameters(), cfg)
    sched = T.make_scheduler(opt, cfg, cfg.epochs * cfg.iterations_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if (cfg.amp and device.type == "cuda") else None
    start_epoch, history, attempt = 0, [], 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            seg.load_state_dict(MonaiSegmenter.read_checkpoint(Path(d) / "model.pt")["state_dict"])
            state = torch.load(Path(d) / "train_state.pt", map_location="cpu", weights_only=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, history, attempt = state["epoch"] + 1, state["history"], state["attempt"] + 1
        if rank == 0:
            logger.info("[%s] resuming from the checkpoint of epoch %d", config["name"], state["epoch"] + 1)
    elif config["init_state"] is not None:
        seg.load_state_dict(ray.get(config["init_state"]))
    model = ray.train.torch.prepare_model(seg.network)
    loss_fn = T.make_loss(config["num_classes"])
    inferer = seg.inferer()
    names = config["class_names"]

    for epoch in range(start_epoch, cfg.epochs):
        epoch_start = time.time()
        torch.manual_seed(cfg.seed * 100003 + epoch * 101 + rank)  # dropout masks; worker process only
        loader = T.make_train_loader(train_cases, model_cfg, cfg, seed=cfg.seed * 100003 + epoch * 101 + rank)
        hook = _fault_hook(config.get("fail_once"), epoch, rank)
        stats = T.train_epoch(model, loader, opt, sched, loss_fn, device, scaler=scaler, amp=cfg.amp, on_step=hook)
        validated = (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs
        t0 = time.perf_counter()
        sums = np.zeros(config["num_classes"] - 1)
        counts = np.zeros_like(sums)
        if validated:
            sums, counts = T.validate(seg.network, val_cases, inferer, config["num_classes"], device, amp=cfg.amp)
        red = torch.tensor(np.concatenate([sums, counts, [stats["loss"]]]), dtype=torch.float64, device=device)
        if world > 1 and dist.is_initialized():
            dist.all_reduce(red)
        red = red.cpu().numpy()
        spread = ddp_param_spread(seg.network, world, device)
        k = len(sums)
        sums, counts, loss = red[:k], red[k : 2 * k], red[-1] / world
        val_dice = float(sums.sum() / counts.sum()) if validated and counts.sum() > 0 else -1.0
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": float(loss),
            "val_dice": val_dice,
            "validated": bool(validated),
            "lr": stats["lr"],
            "steps": stats["steps"],
            "train_s": stats["train_s"],
            "val_s": time.perf_counter() - t0,
            "attempt": attempt,
            "ddp_param_spread": spread,
            "epoch_start": epoch_start,  # Unix time at the epoch's start, for throughput measurements
            "cpu_s": time.process_time(),  # CPU seconds used by this worker process so far
        }
        for c in range(k):
            metrics[f"val_dice_{names[c]}"] = float(sums[c] / counts[c]) if counts[c] > 0 else float("nan")
        history.append(metrics)
        if rank == 0:
            logger.info(
                "[%s] epoch %d/%d loss %.4f val_dice %.4f (train %.1fs, val %.1fs)",
                config["name"], epoch + 1, cfg.epochs, loss, val_dice, stats["train_s"], metrics["val_s"],
            )
            with tempfile.TemporaryDirectory() as tmp:
                seg.save(Path(tmp) / "model.pt", extra={"epoch": epoch + 1, "val_dice": val_dice})
                torch.save(
                    {
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "epoch": epoch,
                        "history": history,
                        "attempt": attempt,
                    },
                    Path(tmp) / "train_state.pt",
                )
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)



def _prepare_round(store, labeled_ids, train_cfg: TrainConfig, round_index: int, name: str | None):
    """Open the store, check the labelled ids and split off validation (shared by both backends)."""
    if isinstance(store, str | Path):
        from raylearn.data.store import PoolStore

        store = PoolStore.open(store)
    name = name or f"round_{round_index:03d}"
    known = set(store.case_ids())
    unknown = [i for i in labeled_ids if str(i) not in known]
    if unknown:
        raise ValueError(f"labelled ids not in the pool store: {unknown[:5]}")
    train_ids, val_ids, val_on_train = split_validation(labeled_ids, train_cfg)
    if val_on_train:
        logger.warning("[%s] only %d labelled cases: validating on the training cases", name, len(train_ids))
    return store, name, train_ids, val_ids, val_on_train

def fit_round(
    store,
    labeled_ids: Sequence[str],
    init_checkpoint: str | Path | None,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    round_index: int = 0,
    name: str | None = None,
    resume: bool = False,
) -> FitResult:
    """Fine-tune the segmenter on ``labeled_ids`` with Ray Train and return the best checkpoint.

    Args:
        store: a :class:`raylearn.data.store.PoolStore` (or its path); workers re-open it themselves.
        labeled_ids: every labelled case id so far (train + validation).
        init_checkpoint: warm start (previous round's ``best.pt``); None trains from a seeded initialisation.
        model_cfg: network config; ``backend == "nnunet"`` delegates to the nnU-Net backend.
        train_cfg: schedule, Ray Train scaling, storage and fault-tolerance settings.
        round_index: active-learning round, used in the default run name ``round_<NNN>``.
        name: Ray Train run name (a directory under ``train_cfg.storage_path``).
        resume: continue an interrupted run of the same ``name`` from its last checkpoint (e.g. after the
            driver died). Without it an existing run directory of that name is deleted and training starts
            afresh, so a repeated round never silently returns a stale model.

    Returns:
        :class:`FitResult` with ``checkpoint_path = <storage_path>/<name>/best.pt``.
    """
    if model_cfg.backend == "nnunet":
        return _fit_round_nnunet(store, labeled_ids, init_checkpoint, model_cfg, train_cfg, round_index, name, resume)

    import ray.train
    from ray.train.torch import TorchTrainer

    store, name, train_ids, val_ids, val_on_train = _prepare_round(store, labeled_ids, train_cfg, round_index, name)
    t0 = time.perf_counter()
    in_channels, num_classes = int(store.num_channels), int(store.num_classes)
    init_ref = None
    if init_checkpoint is not None:
        init_ref = ray.put(check_init_checkpoint(init_checkpoint, model_cfg, in_channels, num_classes))
    labels = store.labels
    class_names = [str(labels.get(c, c)) for c in range(1, num_classes)]
    storage = Path(train_cfg.storage_path).expanduser().resolve()
    storage.mkdir(parents=True, exist_ok=True)
    _fresh_run_dir(storage / name, resume)
    config = {
        "store": store,
        "train_ids": train_ids,
        "val_ids": val_ids,
        "model_cfg": model_cfg.model_dump(mode="json"),
        "train_cfg": train_cfg.model_dump(mode="json"),
        "in_channels": in_channels,
        "num_classes": num_classes,
        "class_names": class_names,
        "init_state": init_ref,
        "name": name,
        "fail_once": os.environ.get(FAIL_ENV),
    }
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=train_cfg.num_workers,
            use_gpu=train_cfg.use_gpu,
            resources_per_worker=train_cfg.resources_per_worker,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=train_cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=train_cfg.num_to_keep,
                checkpoint_score_attribute="val_dice",
                checkpoint_score_order="max",
            ),
        ),
    )
    logger.info(
        "[%s] training on %d cases, validating on %d, %d worker(s), %d epochs x %d steps",
        name, len(train_ids), len(val_ids), train_cfg.num_workers, train_cfg.epochs, train_cfg.iterations_per_epoch,
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"[{name}] training failed: {result.error}") from result.error
    if not result.best_checkpoints:
        raise RuntimeError(f"[{name}] training reported no checkpoint")
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1].get("val_dice", -1.0))
    run_dir = storage / name
    best_path = run_dir / "best.pt"
    with best_ckpt.as_directory() as d:
        shutil.copyfile(Path(d) / "model.pt", best_path.with_suffix(".tmp"))
    best_path.with_suffix(".tmp").replace(best_path)
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "train_state.pt", map_location="cpu", weights_only=False)
    history = state["history"]
    wall = time.perf_counter() - t0
    logger.info(
        "[%s] done in %.1fs: best val_dice %.4f at epoch %d -> %s",
        name, wall, best_metrics["val_dice"], best_metrics["epoch"], best_path,
    )
    return FitResult(
        checkpoint_path=best_path,
        history=history,
        best_val_dice=float(best_metrics["val_dice"]),
        wall_s=wall,
        best_epoch=int(best_metrics["epoch"]),
        train_ids=train_ids,
        val_ids=val_ids,
        val_on_train=val_on_train,
        run_dir=run_dir,
        restarts=int(state["attempt"]),
    )


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


def _fit_round_nnunet(store, labeled_ids, init_checkpoint, model_cfg, train_cfg, round_index, name, resume):
    """nnU-Net backend of :func:`fit_round`: a Ray task holding one worker's resources runs :func:`run_round`."""
    import ray

    from raylearn.models.nnunet import nnunet_env

    store, name, train_ids, val_ids, val_on_train = _prepare_round(store, labeled_ids, train_cfg, round_index, name)
    t0 = time.perf_counter()
    cfg = model_cfg.nnunet
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
