"""Pure-torch training helpers for the MONAI backend (used inside Ray Train workers; no Ray here).

A *case* is a mapping ``{"image": float32 [C, D, H, W], "label": uint8 [D, H, W]}``. Training samples
random patches of ``model.patch_size`` (foreground-biased with ``train.pos_fraction``), augments them
with MONAI transforms, and minimises Dice + cross-entropy. Validation runs sliding-window inference on
whole volumes and returns per-class Dice sums and counts so that workers can all-reduce them.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from raylearn.models.config import ModelConfig, TrainConfig

__all__ = [
    "check_init_checkpoint",
    "ddp_param_spread",
    "dice_sums",
    "make_loss",
    "make_optimizer",
    "make_scheduler",
    "make_train_loader",
    "split_validation",
    "train_epoch",
    "train_transforms",
    "validate",
]

logger = logging.getLogger(__name__)


def split_validation(labeled_ids: Sequence[str], train_cfg: TrainConfig) -> tuple[list[str], list[str], bool]:
    """Deterministic train/validation split of the labelled ids -> ``(train_ids, val_ids, val_on_train)``.

    ``val_ids`` from the config win; otherwise the ``round(val_fraction * n)`` ids (at least one) with the
    smallest hash of ``(seed, id)`` are held out, so the validation set stays mostly stable as rounds add
    labels. With fewer than 4 labelled cases (or ``val_fraction == 0``) the model is validated on its training
    cases and ``val_on_train`` is True.
    """
    ids = list(dict.fromkeys(str(i) for i in labeled_ids))
    if not ids:
        raise ValueError("fit_round needs at least one labelled case id")
    if train_cfg.val_ids is not None:
        unknown = sorted(set(train_cfg.val_ids) - set(ids))
        if unknown:
            raise ValueError(f"train.val_ids: ids not among the labelled cases: {unknown[:5]}")
        val = [i for i in ids if i in set(train_cfg.val_ids)]
        train = [i for i in ids if i not in set(val)]
        if train:
            return train, val, False
        return ids, ids, True
    n_val = int(round(train_cfg.val_fraction * len(ids)))
    if train_cfg.val_fraction == 0 or len(ids) < 4:
        return ids, ids, True
    n_val = min(max(n_val, 1), len(ids) - 1)

    def key(i: str) -> str:
        return hashlib.blake2b(f"{train_cfg.seed}:{i}".encode(), digest_size=8).hexdigest()

    val = set(sorted(ids, key=key)[:n_val])
    return [i for i in ids if i not in val], [i for i in ids if i in val], False


def train_transforms(model_cfg: ModelConfig, train_cfg: TrainConfig):
    """MONAI dictionary transforms: pad to the patch, foreground-biased crop, flips/affine/intensity augmentation.

    Input ``{"image": [C,D,H,W], "label": [1,D,H,W]}``; output tensors of the same layout at ``patch_size``.
    """
    from monai import transforms as T

    keys = ["image", "label"]
    patch = tuple(model_cfg.patch_size)
    pos = float(train_cfg.pos_fraction)
    steps: list[Any] = [
        T.EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False),
        T.SpatialPadd(keys=keys, spatial_size=patch, mode="constant"),
        T.RandCropByPosNegLabeld(
            keys=keys, label_key="label", spatial_size=patch, pos=pos, neg=1.0 - pos, num_samples=1, image_key=None
        ),
    ]
    if train_cfg.augment:
        steps += [
            T.RandAffined(
                keys=keys,
                prob=0.2,
                rotate_range=(0.26, 0.26, 0.26),
                scale_range=(0.1, 0.1, 0.1),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            T.RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
            T.RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
            T.RandFlipd(keys=keys, prob=0.5, spatial_axis=2),
            T.RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            T.RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
            T.RandGaussianNoised(keys="image", prob=0.15, std=0.05),
        ]
    return T.Compose(steps)


def _as_training_case(case: Mapping[str, Any], index: int) -> dict[str, np.ndarray]:
    image = np.asarray(case["image"])
    label = case.get("label")
    if label is None:
        raise ValueError(f"case {case.get('case_id', index)!r} has no label; training needs labelled cases")
    label = np.asarray(label)
    if image.ndim != 4 or label.shape != image.shape[1:]:
        raise ValueError(
            f"case {case.get('case_id', index)!r}: image must be [C,D,H,W] and label [D,H,W] on the same grid, "
            f"got {image.shape} and {label.shape}"
        )
    return {"image": np.array(image, dtype=np.float32), "label": np.array(label, dtype=np.float32)[None]}


def make_train_loader(
    cases: Sequence[Mapping[str, Any]],
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    seed: int,
    steps: int | None = None,
):
    """A loader yielding ``steps`` batches ``{"image": [B,C,*patch], "label": [B,1,*patch]}`` of random patches.

    Cases are drawn with replacement; crops and augmentation are deterministic for ``seed`` (also with
    ``loader_workers > 0``, where MONAI seeds each worker from the generator).
    """
    from monai.data import DataLoader, Dataset

    if not cases:
        raise ValueError("no training cases")
    steps = train_cfg.iterations_per_epoch if steps is None else steps
    data = [_as_training_case(c, i) for i, c in enumerate(cases)]
    ds = Dataset(data=data, transform=train_transforms(model_cfg, train_cfg))
    gen = torch.Generator().manual_seed(int(seed))
    sampler = torch.utils.data.RandomSampler(
        ds, replacement=True, num_samples=steps * train_cfg.batch_size, generator=gen
    )
    return DataLoader(
        ds,
        batch_size=train_cfg.batch_size,
        sampler=sampler,
        num_workers=train_cfg.loader_workers,
        generator=gen,
        drop_last=False,
        persistent_workers=False,
    )


def make_loss(num_classes: int) -> nn.Module:
    """Dice + cross-entropy on softmax logits ``[B,K,...]`` against integer labels ``[B,1,...]``."""
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, squared_pred=False, batch=True)


def make_optimizer(params, train_cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov, momentum 0.99 as in nnU-Net) with ``lr`` and ``weight_decay``."""
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=train_cfg.lr, momentum=0.99, nesterov=True, weight_decay=train_cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, train_cfg: TrainConfig, total_steps: int):
    """Per-step LR schedule: ``poly`` (1 - t/T)^0.9, ``cosine`` to 0, or ``constant``. Call ``.step()`` per step."""
    total = max(int(total_steps), 1)
    if train_cfg.schedule == "poly":

        def factor(step: int) -> float:
            return max(1.0 - min(step, total) / total, 0.0) ** 0.9
    elif train_cfg.schedule == "cosine":

        def factor(step: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    else:

        def factor(step: int) -> float:
            return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=factor)


def train_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    loss_fn: nn.Module,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
    amp: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns ``{"loss": mean loss, "steps": n, "train_s": seconds, "lr": last lr}``.

    ``amp`` uses float16 autocast with ``scaler`` (CUDA only). ``on_step(i)`` runs after every step (tests use
    it to inject failures).
    """
    model.train()
    use_amp = bool(amp and device.type == "cuda")
    total, n = 0.0, 0
    t0 = time.perf_counter()
    for i, batch in enumerate(loader):
        x = torch.as_tensor(batch["image"]).to(device, non_blocking=True)
        y = torch.as_tensor(batch["label"]).to(device, non_blocking=True).round().long()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            loss = loss_fn(model(x), y)
        if scaler is not None and use_amp:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += float(loss.detach())
        n += 1
        if on_step is not None:
            on_step(i)
    return {
        "loss": total / max(n, 1),
        "steps": n,
        "train_s": time.perf_counter() - t0,
        "lr": float(optimizer.param_groups[0]["lr"]),
    }


def dice_sums(pred: torch.Tensor, gt: torch.Tensor, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per foreground class Dice of one case: ``pred``/``gt`` integer ``[D,H,W]`` -> (dice sums, counts) ``[K-1]``.

    A class absent from both prediction and ground truth is skipped (count 0); absent from the ground truth
    but predicted gives Dice 0 (MONAI ``DiceMetric`` with ``ignore_empty=False`` semantics otherwise).
    """
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    p = one_hot(pred[None, None].long(), num_classes, dim=1)
    g = one_hot(gt[None, None].long(), num_classes, dim=1)
    d = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(p, g)[0].cpu().numpy()
    present = (g[0, 1:].flatten(1).sum(1) + p[0, 1:].flatten(1).sum(1)).cpu().numpy() > 0
    sums = np.where(present, np.nan_to_num(d), 0.0).astype(np.float64)
    return sums, present.astype(np.float64)


def validate(
    model: nn.Module,
    cases: Sequence[Mapping[str, Any]],
    inferer,
    num_classes: int,
    device: torch.device,
    amp: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Sliding-window prediction of every case; returns per-class Dice (sums, counts) ``[K-1]`` over cases.

    Mean Dice = ``sums.sum() / counts.sum()`` per voxel-class pair, or ``sums / counts`` per class.
    """
    model.eval()
    sums = np.zeros(num_classes - 1)
    counts = np.zeros(num_classes - 1)
    use_amp = bool(amp and device.type == "cuda")
    with torch.no_grad():
        for case in cases:
            x = torch.from_numpy(np.array(case["image"], dtype=np.float32))[None].to(device)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                logits = inferer(x, model)
            pred = logits.float().argmax(dim=1)[0]
            gt = torch.from_numpy(np.asarray(case["label"]).astype(np.int64)).to(device)
            s, c = dice_sums(pred, gt, num_classes)
            sums += s
            counts += c
    return sums, counts


def ddp_param_spread(net: torch.nn.Module, world: int, device: torch.device) -> float:
    """Max difference across DDP ranks of a parameter checksum (0.0 when replicas are identical)."""
    import torch.distributed as dist

    if world < 2 or not dist.is_initialized():
        return 0.0
    with torch.no_grad():
        vec = torch.cat([p.detach().double().flatten() for p in net.parameters()])
        ramp = torch.linspace(0, 1, vec.numel(), device=vec.device, dtype=vec.dtype)
        chk = torch.stack([vec.sum(), (vec * vec).sum(), (vec * ramp).sum()])
    gathered = [torch.zeros_like(chk, device=device) for _ in range(world)]
    dist.all_gather(gathered, chk.to(device))
    stack = torch.stack(gathered)
    return float((stack.max(0).values - stack.min(0).values).max())


def check_init_checkpoint(init_checkpoint, model_cfg: ModelConfig, in_channels: int, num_classes: int) -> dict:
    """Validate a warm-start checkpoint against the config and store; returns its state dict."""
    from raylearn.models.unet import MonaiSegmenter

    ckpt = MonaiSegmenter.read_checkpoint(init_checkpoint)
    if (int(ckpt["in_channels"]), int(ckpt["num_classes"])) != (in_channels, num_classes):
        raise ValueError(
            f"{init_checkpoint}: checkpoint has in_channels={ckpt['in_channels']}, num_classes={ckpt['num_classes']} "
            f"but the store has {in_channels} channels and {num_classes} classes"
        )
    saved = ckpt["model_config"]
    for key in ("arch", "channels", "strides", "num_res_units", "kernel_size", "norm"):
        want = model_cfg.model_dump(mode="json")[key]
        if saved.get(key) != want:
            raise ValueError(f"{init_checkpoint}: checkpoint model.{key}={saved.get(key)!r} but config has {want!r}")
    return ckpt["state_dict"]
