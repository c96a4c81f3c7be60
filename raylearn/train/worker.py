"""The Ray Train worker loop of the persistent training service (MONAI backend).

One ``TorchTrainer.fit()`` runs for the whole experiment; this loop, in every worker process, takes rounds
from the :class:`~raylearn.train.coordinator.RoundCoordinator` actor (labelled ids and a step budget),
trains them warm (weights, optimiser state, LR schedule and the case cache carry over), reports a Ray Train
checkpoint every ``train.checkpoint_every`` steps and at the end of each round, and rank 0 publishes the
round's weights to the coordinator (the driver writes them once and ``ray.put``\\ s them for scoring).

Recovery: after a worker failure Ray Train restarts the group (``FailureConfig``) and this loop restores
the last reported checkpoint: a round interrupted at step k continues from step k, with the batches an
uninterrupted run would have drawn (see :mod:`raylearn.models.training`). A new driver (``--resume`` after
``kill -9``) starts the trainer on the same run directory and Ray Train hands the loop the same checkpoint.
A finished round whose result may not have reached the coordinator is published again.

With ``promptable.enabled`` each round has a second phase on the same workers, after the segmenter's
weights are published: rank 0 fine-tunes the promptable model (SAM-Med3D,
:class:`~raylearn.models.promptable_train.PromptableTrainer`, warm across rounds) on the round's labelled cases
with simulated clicks, every rank reports a checkpoint that holds both models' state, and rank 0 publishes the
promptable weights with ``RoundCoordinator.prompt_done``. A worker lost during that phase restarts it from the
round's segmenter checkpoint (the phase is not checkpointed mid-way).
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["service_loop", "STATE_FILE", "MODEL_FILE"]

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
MODEL_FILE = "model.pt"


def _threads(cfg, ctx) -> int:
    if cfg.torch_threads:
        return int(cfg.torch_threads)
    try:
        local = max(1, int(ctx.get_local_world_size()))
    except Exception:  # noqa: BLE001 - older contexts
        local = 1
    return max(1, (os.cpu_count() or 1) // local)


def _step_seed(seed: list[int], step: int) -> int:
    return int(np.random.SeedSequence([*seed, step, 7]).generate_state(1)[0])


class _Loop:
    """State of one worker: model, optimiser, schedule, EMA, case cache and the round/step reached."""

    def __init__(self, config: dict[str, Any]) -> None:
        import ray.train
        import ray.train.torch

        from raylearn.data.store import PoolStore
        from raylearn.models import training as T
        from raylearn.models.config import ModelConfig, TrainConfig
        from raylearn.models.unet import MonaiSegmenter

        self.T = T
        self.config = config
        self.model_cfg = ModelConfig.model_validate(config["model_cfg"])
        self.cfg = cfg = TrainConfig.model_validate(config["train_cfg"])
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(_threads(cfg, ctx))
        self.device = ray.train.torch.get_device()
        if self.device.type == "cuda" and os.environ.get("RAYLEARN_GPU_FALLBACK") == "cpu" \
                and not torch.cuda.is_available():  # test switch: logical GPUs without CUDA (multi-node tests)
            self.device = torch.device("cpu")
        store = config["store"]
        self.store = PoolStore.open(store) if isinstance(store, str | Path) else store
        self.coord = config["coordinator"]
        self.num_classes = int(config["num_classes"])
        self.seg = MonaiSegmenter(self.model_cfg, int(config["in_channels"]), self.num_classes, seed=cfg.seed,
                                  device=self.device)
        self.opt = T.make_optimizer(self.seg.network.parameters(), cfg)
        self.sched = T.make_scheduler(self.opt, cfg, int(config["total_steps"]))
        self.ema = T.make_ema(self.seg.network, cfg.ema_decay)
        self.scaler = torch.amp.GradScaler("cuda") if (cfg.amp and self.device.type == "cuda") else None
        self.state: dict[str, Any] = {"round": -1, "step": 0, "done": True, "global_step": 0, "attempt": 0,
                                      "history": []}
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                self._restore(Path(d))
        elif config.get("init_state") is not None:  # a published round checkpoint (shared round 0, lost run dir)
            init = ray.get(config["init_state"])
            if init.get("train_state") is not None:
                self._load_train_state(init["train_state"], attempt_offset=0)
            else:
                self.seg.load_state_dict(init["state_dict"])
        self.model = ray.train.torch.prepare_model(self.seg.network, move_to_device=self.device)
        # labels come from the label store (a LabelledStore); a corrected label is read again
        self.cache = T.CaseCache(self.model_cfg.patch_size, self._read_training_case,
                                 version_of=getattr(self.store, "label_version", None))
        self.transform = None
        self.loss_fn = T.make_loss(self.model_cfg)
        self.step_hook = config.get("step_hook")
        self.prompt_cfg = None
        if config.get("promptable_cfg"):
            from raylearn.models.promptable import PromptableConfig

            self.prompt_cfg = PromptableConfig.model_validate(config["promptable_cfg"])
        self.prompt = None  # the PromptableTrainer, built at the first promptable phase (or on restore)

    # -- state ------------------------------------------------------------------------------------
    def _read_case(self, cid: str):
        case = self.store.get(cid)
        if case.label is None:
            raise ValueError(f"case {cid!r} has no label in the label store; only labelled cases can be trained on")
        return case.image, case.label

    def _read_training_case(self, cid: str):
        """``(image, label, mask | None)``: partial labels (slice units) and pseudo-labels come with the mask of the
        voxels the loss may use (:meth:`raylearn.annotation.labelled.LabelledStore.training_case`)."""
        reader = getattr(self.store, "training_case", None)
        return reader(cid) if reader is not None else self._read_case(cid)

    def _restore(self, d: Path) -> None:
        self._load_train_state(torch.load(d / STATE_FILE, map_location="cpu", weights_only=False), attempt_offset=1)

    def _train_state(self) -> dict[str, Any]:
        """Everything a later round needs to continue exactly: weights, optimiser, schedule, EMA, progress."""
        return {"model": {k: v.detach().cpu().clone() for k, v in self.seg.state_dict().items()},
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "promptable": self.prompt.state() if self.prompt is not None else getattr(self, "_prompt_state", None),
                "progress": dict(self.state)}

    def _load_train_state(self, st: dict[str, Any], attempt_offset: int) -> None:
        self.seg.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        if self.ema is not None and st.get("ema") is not None:
            self.ema.load_state_dict(st["ema"])
        if self.scaler is not None and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        self.state = {**st["progress"], "attempt": st["progress"]["attempt"] + attempt_offset}
        self._prompt_state = st.get("promptable")  # loaded when the promptable trainer is built
        if self.rank == 0:
            logger.info("training service: restored round %d at step %d (%s), attempt %d", self.state["round"],
                        self.state["step"], "done" if self.state["done"] else "mid-round", self.state["attempt"])

    def _published_state(self) -> dict[str, torch.Tensor]:
        net = self.ema.module if self.ema is not None else self.seg.network
        return {k.removeprefix("module."): v.detach().cpu().clone() for k, v in net.state_dict().items()}

    def _checkpoint_blob(self, extra: dict[str, Any]) -> bytes:
        ckpt = self.seg.to_checkpoint(extra)
        ckpt["state_dict"] = self._published_state()
        ckpt["train_state"] = self._train_state()  # lets another run continue from this round (shared round 0)
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        return buf.getvalue()

    def _report(self, metrics: dict[str, Any]) -> None:
        """Report metrics to Ray Train, with a checkpoint of everything from rank 0."""
        import ray.train

        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = self.seg.to_checkpoint({"round": self.state["round"], "step": self.state["step"]})
            ckpt["state_dict"] = self._published_state()
            torch.save(ckpt, Path(tmp) / MODEL_FILE)  # loadable by MonaiSegmenter.load
            torch.save(self._train_state(), Path(tmp) / STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    # -- rounds -----------------------------------------------------------------------------------
    def _publish(self, r: int, info: dict[str, Any]) -> None:
        import ray

        if self.rank == 0:
            blob = self._checkpoint_blob({"round": r, "global_step": self.state["global_step"]})
            ray.get(self.coord.done.remote(r, {**info, "checkpoint": blob}))

    def run(self) -> None:
        import ray

        pg = ray.util.get_current_placement_group()  # the worker group's: a Tune sweep releases it if the trial dies
        ray.get(self.coord.hello.remote(self.rank, os.getpid(), self.state["attempt"],
                                        pg.id.hex() if pg is not None else None))
        if self.state["done"] and self.state["round"] >= 0:  # restored after a finished round: the driver may
            last = self.state["history"][-1] if self.state["history"] else {}  # not have its result yet
            self._publish(self.state["round"], last)
        if self.state.get("prompt_pending"):  # lost during (or just before) the promptable phase: redo it
            self._train_promptable(self.state["prompt_pending"])
        elif self.state.get("prompt_info") and self.state["prompt_info"].get("round") == self.state["round"]:
            self._publish_promptable(self.state["prompt_info"])
        while True:
            last_done = self.state["round"] if self.state["done"] else self.state["round"] - 1
            spec = ray.get(self.coord.next_round.remote(last_done))
            if spec is None:
                return
            self._train_round(spec)

    def _train_round(self, spec: dict[str, Any]) -> None:
        import ray

        T, cfg = self.T, self.cfg
        r, steps = int(spec["round"]), int(spec["steps"])
        start = self.state["step"] if (self.state["round"] == r and not self.state["done"]) else 0
        self.state.update(round=r, step=start, done=False)
        version, ids = int(spec["version"]), list(spec["ids"])
        train_ids, val_ids = T.split_validation(ids, cfg)
        t_load = time.perf_counter()
        self.cache.ensure(train_ids)
        load_s = time.perf_counter() - t_load
        if self.transform is None:
            self.transform = T.train_transforms(self.model_cfg, cfg, crop=not self.cache.whole_volume())
        seed = [int(spec["seed"]), r, self.rank]
        hold = bool(spec.get("hold", False))  # keep training past ``steps`` until the driver releases the round
        poll = cfg.label_poll_steps()
        t0, losses, n, step = time.perf_counter(), [], 0, start
        while step < steps or hold:
            if step % poll == 0 and step > start:
                newer = ray.get(self.coord.labels.remote(r, version))  # labels may grow between steps
                if newer is not None:
                    version, new_ids, hold, steps = newer
                    if new_ids != ids:
                        ids = new_ids
                        train_ids, val_ids = T.split_validation(ids, cfg)
                        self.cache.ensure(train_ids)
                if step >= steps and not hold:
                    break
            x, y = T.sample_batch(self.cache, train_ids, self.transform, cfg.batch_size, step, seed)
            torch.manual_seed(_step_seed(seed, step))  # dropout masks (worker process only)
            losses.append(T.train_step(self.model, x, y, self.opt, self.sched, self.loss_fn, self.device,
                                       self.scaler, cfg.amp))
            if self.ema is not None:
                self.ema.update_parameters(self.seg.network)
            n += 1
            self.state.update(step=step + 1, global_step=self.state["global_step"] + 1)
            if self.step_hook is not None:
                self.step_hook(self.rank, r, step, self.state["attempt"])
            if (step + 1) % cfg.log_every == 0 and self.rank == 0:
                logger.info("[round %d] step %d/%d loss %.4f lr %.2e", r, step + 1, steps,
                            float(np.mean(losses[-cfg.log_every:])), self.opt.param_groups[0]["lr"])
                self.coord.progress.remote(r, step + 1, steps, float(np.mean(losses[-cfg.log_every:])))
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
                self._report({"round": r, "step": step + 1, "done": False, "loss": float(np.mean(losses[-10:]))})
            step += 1
        train_s = time.perf_counter() - t0
        info: dict[str, Any] = {
            "round": r, "steps": steps, "resumed_at_step": start, "trained_steps": n, "train_s": train_s,
            "load_s": load_s, "loss": float(np.mean(losses[-20:])) if losses else float("nan"),
            "lr": float(self.opt.param_groups[0]["lr"]), "n_train": len(train_ids), "n_val": len(val_ids),
            "attempt": self.state["attempt"], "global_step": self.state["global_step"],
            "ddp_param_spread": T.ddp_param_spread(self.seg.network, self.world, self.device),
            "cached_cases": len(self.cache), "labels_version": version,
        }
        if val_ids and self.rank == 0:
            from raylearn.models.unet import MonaiSegmenter

            seg = MonaiSegmenter(self.model_cfg, self.seg.in_channels, self.num_classes, device=self.device)
            seg.load_state_dict(self._published_state())
            cases = [{"image": self.store.get(c).image, "label": self.store.get(c).label} for c in val_ids]
            sums, counts = T.validate(seg, cases, self.num_classes)
            info["val_dice"] = float(sums.sum() / counts.sum()) if counts.sum() else float("nan")
        self.state.update(done=True)
        self.state["history"] = [*self.state["history"], info]
        if self.prompt_cfg is not None and spec.get("promptable_steps"):
            self.state["prompt_pending"] = {"round": r, "ids": train_ids, "steps": int(spec["promptable_steps"]),
                                            "seed": int(spec["seed"])}
        self._report({**{k: v for k, v in info.items() if isinstance(v, int | float)}, "done": True})
        self._publish(r, info)
        if self.state.get("prompt_pending"):
            self._train_promptable(self.state["prompt_pending"])

    # -- the promptable model's phase ---------------------------------------------------------------
    def _train_promptable(self, p: dict[str, Any]) -> None:
        """Fine-tune the promptable model on the round's labelled cases (rank 0), report, publish its weights."""
        r, steps = int(p["round"]), int(p["steps"])
        info: dict[str, Any] = {"round": r, "steps": steps, "n_train": len(p["ids"])}
        if self.rank == 0:
            self._prompt_trainer()
            t0 = time.perf_counter()
            from raylearn.models.promptable_train import model_grid_case

            cases = []
            for cid in p["ids"]:  # on SAM-Med3D's grid, as inference resamples an upload
                image, label = self._read_case(cid)
                cases.append((cid, *model_grid_case(image, label, self.store.get(cid).spacing,
                                                    self.prompt.target_spacing_mm)))
            load_s = time.perf_counter() - t0

            def progress(step: int, loss: float) -> None:
                if (step + 1) % max(1, self.cfg.log_every) == 0:
                    logger.info("[round %d] promptable step %d/%d loss %.4f", r, step + 1, steps, loss)

            t0 = time.perf_counter()
            losses = self.prompt.fit(cases, steps, seed=[int(p["seed"]), r, 1], on_step=progress)
            info.update(train_s=time.perf_counter() - t0, load_s=load_s,
                        loss_first=float(np.mean(losses[:5])), loss=float(np.mean(losses[-5:])),
                        steps_done=self.prompt.steps_done, trainable_parameters=self.prompt.num_trainable,
                        variant=self.prompt_cfg.variant, frozen_image_encoder=self.prompt_cfg.frozen,
                        version=f"r{r:02d}-s{self.prompt.steps_done}")
        self.state.update(prompt_pending=None, prompt_info=info)
        self._report({"round": r, "done": True, "promptable": 1,
                      **{k: v for k, v in info.items() if isinstance(v, int | float)}})
        self._publish_promptable(info)

    def _prompt_trainer(self):
        """The promptable trainer (rank 0), built on first use from the restored state when there is one."""
        if self.prompt is None:
            from raylearn.models.promptable_train import PromptableTrainer

            self.prompt = PromptableTrainer(self.prompt_cfg, device=self.device, seed=self.cfg.seed)
            if getattr(self, "_prompt_state", None) is not None:
                self.prompt.load_state(self._prompt_state)
        return self.prompt

    def _publish_promptable(self, info: dict[str, Any]) -> None:
        import ray

        if self.rank == 0 and self.prompt_cfg is not None:
            self._prompt_trainer()
            blob = self.prompt.checkpoint_bytes({k: info[k] for k in ("round", "version", "steps_done") if k in info})
            ray.get(self.coord.prompt_done.remote(int(info["round"]), {**info, "checkpoint": blob}))


def service_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the persistent service's ``TorchTrainer`` (runs in every worker)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    _Loop(config).run()
