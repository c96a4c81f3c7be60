"""Ray Train run of CSAL-3D's self-supervised pretext model on the unlabelled pool (no labels are read).

:func:`train_pretext` starts one ``TorchTrainer.fit()``: every worker draws random cubic crops of the pool
cases from the store (its own stream, seeded by ``seed`` and rank), minimises
:func:`raylearn.models.ssl3d.pretext_loss` with Adam, reports the loss every ``report_every`` steps and, at the
end, a Ray Train checkpoint holding ``pretext.pt`` (``{"params", "in_channels", "state_dict"}``). The driver
returns that file's bytes, which the pool shards load to extract features.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raylearn.models.ssl3d import Csal3dParams, PretextNet, pretext_loss

__all__ = ["train_pretext", "load_pretext", "PRETEXT_FILE"]

log = logging.getLogger(__name__)

PRETEXT_FILE = "pretext.pt"


def _crop(image: np.ndarray, p: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``[C, p, p, p]`` crop (the volume padded with its minimum where smaller than ``p``)."""
    pads = [(0, 0)] + [(0, max(0, p - s)) for s in image.shape[1:]]
    img = np.pad(image, pads, constant_values=float(image.min())) if any(q[1] for q in pads) else image
    o = [int(rng.integers(0, s - p + 1)) for s in img.shape[1:]]
    return np.ascontiguousarray(img[:, o[0]:o[0] + p, o[1]:o[1] + p, o[2]:o[2] + p], dtype=np.float32)


def _pretext_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from raylearn.pool_support import open_store

    params = Csal3dParams.model_validate(config["params"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(max(1, int(config.get("torch_threads", 1))))
    store = open_store(config["store"])
    ids = list(config["case_ids"])
    torch.manual_seed(params.seed)  # the same initial weights on every worker
    net = PretextNet(params, int(config["in_channels"]))
    model = ray.train.torch.prepare_model(net)
    device = ray.train.torch.get_device()
    opt = torch.optim.Adam(model.parameters(), lr=params.lr)
    rng = np.random.default_rng([params.seed, rank])
    gen = torch.Generator().manual_seed(params.seed * 1000 + rank)
    every = max(1, int(config.get("report_every", 50)))
    t0 = time.perf_counter()
    for step in range(1, params.steps + 1):
        batch = np.stack([_crop(np.asarray(store.get(ids[int(rng.integers(len(ids)))]).image), params.patch, rng)
                          for _ in range(params.batch_size)])
        loss, parts = pretext_loss(model, torch.from_numpy(batch).to(device), params, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == params.steps:
            metrics = {**parts, "step": step, "train_s": time.perf_counter() - t0}
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    state = {k.removeprefix("module."): v.detach().cpu() for k, v in model.state_dict().items()}
                    torch.save({"params": params.model_dump(mode="json"), "in_channels": int(config["in_channels"]),
                                "state_dict": state}, Path(tmp) / PRETEXT_FILE)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=ckpt)
        elif step % every == 0:
            ray.train.report({**parts, "step": step})


def train_pretext(store: Any, case_ids: Sequence[str], params: Csal3dParams, storage_path: str, name: str,
                  in_channels: int = 1, torch_threads: int = 1) -> tuple[bytes, dict[str, float]]:
    """Train the pretext model with Ray Train; return ``(pretext.pt bytes, final metrics)``.

    Args:
        store: the pool store (or its path); workers read the cases themselves.
        case_ids: the unlabelled cases to learn from.
        params: extractor settings (``steps``, ``batch_size``, ``num_workers``, ``use_gpu``, ...).
        storage_path: Ray Train ``storage_path`` (a URI every node resolves).
        name: the run's name under ``storage_path``.
        in_channels: image channels C.
        torch_threads: intra-op threads per worker.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    if not case_ids:
        raise ValueError("train_pretext: no unlabelled cases to train on")
    # No CPU reservation: the pretext model trains during the cold start, while the run's training service
    # (started beside the pool) holds its CPUs and idles until round 0 has labels; reserving another CPU would wait
    # for ever on a fully planned cluster. A sliver of the driver node's own resource places it there instead
    # (Ray refuses empty bundles). On GPUs the worker needs a whole free GPU.
    resources = {"GPU": 1} if params.use_gpu else {f"node:{ray.util.get_node_ip_address()}": 0.001}
    trainer = TorchTrainer(
        _pretext_loop,
        train_loop_config={"store": store, "case_ids": list(case_ids), "params": params.model_dump(mode="json"),
                           "in_channels": int(in_channels), "torch_threads": torch_threads},
        scaling_config=ray.train.ScalingConfig(num_workers=params.num_workers, use_gpu=params.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=name, storage_path=str(storage_path)),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"pretext training {name} reported no checkpoint")
    with result.checkpoint.as_directory() as d:
        blob = (Path(d) / PRETEXT_FILE).read_bytes()
    log.info("csal3d pretext: %d steps in %.1f s, final loss %.4f", params.steps, time.perf_counter() - t0,
             result.metrics.get("loss", float("nan")))
    return blob, dict(result.metrics)


def load_pretext(blob: bytes, device: str | torch.device = "cpu") -> PretextNet:
    """A :class:`PretextNet` from :func:`train_pretext`'s bytes (eval mode)."""
    st = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
    net = PretextNet(Csal3dParams.model_validate(st["params"]), int(st["in_channels"]))
    net.load_state_dict(st["state_dict"])
    return net.to(device).eval()
