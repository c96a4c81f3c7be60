"""Pure-torch training recipe for the MONAI backend (used inside Ray Train workers; no Ray here).

A *case* is ``{"image": float32 [C, D, H, W], "label": uint8 [D, H, W]}``. :class:`CaseCache` pads each
labelled case once to at least the training patch (MONAI ``SpatialPadd``, centred) and keeps the tensors
for the whole experiment, so rounds only add the newly labelled cases. Every optimiser step draws its batch
from a seed derived from ``(seed, round, step, rank)`` (shuffled passes over the labelled cases, as a plain
training script does), and the random transforms are re-seeded per sample: a run resumed from a mid-round
checkpoint draws exactly the batches an uninterrupted run draws.

When the padded volumes fit in one patch (``patch_size: auto``), whole volumes train; otherwise
foreground-biased random crops of the patch (MONAI ``RandCropByPosNegLabeld``). Augmentation is declared per
axis (:class:`~raylearn.models.config.AugmentConfig`); loss MONAI ``DiceCELoss`` (:class:`MaskedDiceCELoss`: partial
labels of slice units mark the voxels nobody annotated ``IGNORE`` = -1 in the cached label, which the crops and
augmentations carry like any label value, and the loss leaves out); optimiser Adam / AdamW /
SGD; schedule ``torch.optim.lr_scheduler`` (linear warm-up, then constant / cosine / polynomial over the
run's whole step budget); optional EMA of the weights (``torch.optim.swa_utils.AveragedModel``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from raylearn.models.config import ModelConfig, TrainConfig

__all__ = [
    "IGNORE",
    "CaseCache",
    "MaskedDiceCELoss",
    "batch_indices",
    "check_init_checkpoint",
    "ddp_param_spread",
    "make_ema",
    "make_loss",
    "make_optimizer",
    "make_scheduler",
    "sample_batch",
    "split_validation",
    "train_step",
    "train_transforms",
    "validate",
]

logger = logging.getLogger(__name__)

#: label value of the voxels nobody annotated (partial labels); never a class, left out of the loss
IGNORE = -1


def split_validation(labeled_ids: Sequence[str], train_cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split of the labelled ids -> ``(train_ids, val_ids)``.

    Every labelled case trains unless asked otherwise: ``val_ids`` from the config, or ``val_fraction > 0``
    (the ``round(val_fraction * n)`` ids, at least one, with the smallest hash of ``(seed, id)``, so the
    validation set stays mostly stable as rounds add labels). With fewer than 4 labelled cases nothing is held
    out. ``val_ids`` is empty when no validation is wanted.
    """
    ids = list(dict.fromkeys(str(i) for i in labeled_ids))
    if not ids:
        raise ValueError("training needs at least one labelled case id")
    if train_cfg.val_ids is not None:
        unknown = sorted(set(train_cfg.val_ids) - set(ids))
        if unknown:
            raise ValueError(f"train.val_ids: ids not among the labelled cases: {unknown[:5]}")
        val = [i for i in ids if i in set(train_cfg.val_ids)]
        train = [i for i in ids if i not in set(val)]
        if not train:
            raise ValueError("train.val_ids: every labelled case is a validation case; nothing would train")
        return train, val
    if train_cfg.val_fraction == 0 or len(ids) < 4:
        return ids, []
    n_val = min(max(int(round(train_cfg.val_fraction * len(ids))), 1), len(ids) - 1)

    def key(i: str) -> str:
        return hashlib.blake2b(f"{train_cfg.seed}:{i}".encode(), digest_size=8).hexdigest()

    val = set(sorted(ids, key=key)[:n_val])
    return [i for i in ids if i not in val], [i for i in ids if i in val]


def train_transforms(model_cfg: ModelConfig, train_cfg: TrainConfig, crop: bool):
    """MONAI dictionary transforms applied to each cached (padded) case per sample.

    Input ``{"image": [C,D,H,W], "label": [1,D,H,W]}`` tensors; output the same layout at ``patch_size`` (a
    foreground-biased crop when ``crop``, else the whole padded volume).
    """
    from monai import transforms as T

    keys = ["image", "label"]
    aug = train_cfg.augment
    steps: list[Any] = []
    if crop:
        pos = float(train_cfg.pos_fraction)
        steps.append(T.RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=tuple(model_cfg.patch_size),
                                              pos=pos, neg=1.0 - pos, num_samples=1, image_key=None))
    if any(aug.rotate_deg) or aug.scale > 0:
        steps.append(T.RandAffined(
            keys=keys, prob=aug.affine_prob, rotate_range=tuple(np.deg2rad(d) for d in aug.rotate_deg),
            scale_range=(aug.scale,) * 3, mode=("bilinear", "nearest"), padding_mode="zeros"))
    steps += [T.RandFlipd(keys=keys, prob=aug.flip_prob, spatial_axis=a) for a in aug.flip_axes]
    if aug.intensity_scale > 0:
        steps.append(T.RandScaleIntensityd(keys="image", factors=aug.intensity_scale, prob=0.5))
    if aug.intensity_shift > 0:
        steps.append(T.RandShiftIntensityd(keys="image", offsets=aug.intensity_shift, prob=0.5))
    if aug.noise_std > 0:
        steps.append(T.RandGaussianNoised(keys="image", prob=0.15, std=aug.noise_std))
    return T.Compose(steps, lazy=False)


class CaseCache:
    """Labelled cases padded once to at least the training patch, kept as tensors for the whole experiment.

    Args:
        patch: training patch ``(D, H, W)``; each case is centre-padded with zeros to at least this size.
        reader: ``reader(case_id) -> (image [C,D,H,W], label [D,H,W])`` or ``(image, label, mask bool [D,H,W] |
            None)`` (images from the pool store, labels from the label store:
            :meth:`raylearn.annotation.labelled.LabelledStore.training_case`). Voxels outside ``mask`` (nobody
            annotated them) are cached as :data:`IGNORE`.
        version_of: ``version_of(case_id) -> int | None``, the label's current version; a cached case whose label
            got a new version (a correction) is read again by :meth:`ensure`.
    """

    def __init__(self, patch: Sequence[int], reader, version_of=None) -> None:
        from monai.transforms import SpatialPadd

        self.patch = tuple(int(p) for p in patch)
        self._pad = SpatialPadd(keys=["image", "label"], spatial_size=self.patch, mode="constant")
        self._reader = reader
        self._version_of = version_of
        self._versions: dict[str, int | None] = {}
        self._cases: dict[str, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._cases)

    def __contains__(self, case_id: str) -> bool:
        return case_id in self._cases

    def ensure(self, ids: Sequence[str]) -> int:
        """Read and pad the cases not cached yet; returns how many were added."""
        added = 0
        for cid in ids:
            version = self._version_of(cid) if self._version_of is not None else None
            if cid in self._cases and self._versions.get(cid) == version:
                continue
            got = self._reader(cid)
            image, label = np.asarray(got[0]), np.asarray(got[1])
            mask = got[2] if len(got) > 2 else None
            if image.ndim != 4 or label.shape != image.shape[1:]:
                raise ValueError(f"case {cid!r}: image must be [C,D,H,W] and label [D,H,W] on the same grid, "
                                 f"got {image.shape} and {label.shape}")
            label = np.array(label, dtype=np.float32)
            if mask is not None:
                mask = np.asarray(mask, dtype=bool)
                if mask.shape != label.shape:
                    raise ValueError(f"case {cid!r}: label mask {mask.shape} does not match the label {label.shape}")
                label[~mask] = IGNORE
            item = {"image": torch.from_numpy(np.array(image, dtype=np.float32)),
                    "label": torch.from_numpy(label[None])}
            item = self._pad(item)
            self._cases[cid] = {k: torch.as_tensor(v).contiguous() for k, v in item.items()}
            self._versions[cid] = version
            added += 1
        return added

    def get(self, case_id: str) -> dict[str, torch.Tensor]:
        return self._cases[case_id]

    def whole_volume(self) -> bool:
        """True when every cached case is exactly the patch (whole-volume training, no cropping)."""
        return all(tuple(c["image"].shape[1:]) == self.patch for c in self._cases.values())


def batch_indices(n: int, batch_size: int, step: int, seed: Sequence[int]) -> list[int]:
    """Indices into ``n`` cases for optimiser step ``step``: consecutive shuffled passes over all cases.

    Pass ``e`` is the permutation drawn from ``seed + [e]``, so any step's batch is computed directly (a resumed
    run needs no sampler state).
    """
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, k = divmod(pos, n)
        perm = np.random.default_rng([*map(int, seed), epoch]).permutation(n)
        out.append(int(perm[k]))
    return out


def sample_batch(cache: CaseCache, ids: Sequence[str], transform, batch_size: int, step: int,
                 seed: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of step ``step``: ``image [B,C,*patch]``, integer ``label [B,1,*patch]``; deterministic for
    ``(seed, step)``, the transforms re-seeded per sample."""
    idx = batch_indices(len(ids), batch_size, step, seed)
    xs, ys = [], []
    for j, i in enumerate(idx):
        sample_seed = int(np.random.SeedSequence([*map(int, seed), step, j]).generate_state(1)[0])
        transform.set_random_state(seed=sample_seed)
        case = cache.get(ids[i])
        out = transform({"image": case["image"], "label": case["label"]})
        if isinstance(out, list):  # RandCropByPosNegLabeld returns a list of num_samples dicts
            out = out[0]
        xs.append(torch.as_tensor(out["image"]).as_subclass(torch.Tensor))
        ys.append(torch.as_tensor(out["label"]).as_subclass(torch.Tensor))
    return torch.stack(xs).float(), torch.stack(ys).round().long()


class MaskedDiceCELoss(nn.Module):
    """Dice + cross-entropy on softmax logits ``[B,K,...]`` against integer labels ``[B,1,...]`` that leaves out
    the voxels labelled :data:`IGNORE` (nobody annotated them).

    Without an ignored voxel it is MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)`` itself (whole-volume
    labels train exactly as before slice units). Otherwise MONAI's ``MaskedDiceLoss`` (softmax and one-hot target
    multiplied by the annotated mask, per sample and class as ``DiceLoss``) plus torch's cross-entropy with
    ``ignore_index`` (the mean over annotated voxels): the loss does not depend on the labels of ignored voxels.
    A batch with no annotated voxel at all gives 0 (with a gradient of zeros).
    """

    def __init__(self) -> None:
        super().__init__()
        from monai.losses import DiceCELoss, MaskedDiceLoss

        self.full = DiceCELoss(to_onehot_y=True, softmax=True)
        self.dice = MaskedDiceLoss(to_onehot_y=True, softmax=True)
        self.ce = nn.CrossEntropyLoss(ignore_index=IGNORE)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002 (torch's name)
        mask = target != IGNORE
        if bool(mask.all()):
            return self.full(input, target)
        if not bool(mask.any()):
            return (input * 0.0).sum()
        target = target.long()
        dice = self.dice(input, torch.where(mask, target, torch.zeros_like(target)), mask=mask.to(input.dtype))
        return dice + self.ce(input, target[:, 0])


def make_loss(model_cfg: ModelConfig | None = None) -> nn.Module:
    """Dice + cross-entropy on softmax logits ``[B,K,...]`` against integer labels ``[B,1,...]`` (MONAI), leaving out
    voxels nobody annotated (:class:`MaskedDiceCELoss`); for ``model.arch: sbc_unet`` SBC-AL's joint loss over its
    three outputs (:class:`raylearn.models.sbc.SBCLoss`; whole-volume labels only)."""
    if model_cfg is not None and model_cfg.arch == "sbc_unet":
        from raylearn.models.sbc import SBCLoss

        return SBCLoss(model_cfg.sbc.alpha, model_cfg.sbc.beta, model_cfg.sbc.gamma)
    return MaskedDiceCELoss()


def make_optimizer(params, train_cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam, AdamW, or SGD (Nesterov, momentum 0.99 as in nnU-Net) with ``lr`` and ``weight_decay``."""
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train_cfg.lr, momentum=0.99, nesterov=True,
                               weight_decay=train_cfg.weight_decay)
    if train_cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    return torch.optim.Adam(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, train_cfg: TrainConfig, total_steps: int):
    """Per-step schedule over the run's whole budget: linear warm-up (``warmup_steps``), then ``constant``,
    ``cosine`` (to ``min_lr_ratio * lr``) or ``poly`` (power 0.9, to 0 at ``total_steps``). Call ``.step()``
    after every optimiser step; the state continues across rounds."""
    from torch.optim import lr_scheduler as S

    warm = min(int(train_cfg.warmup_steps), max(int(total_steps) - 1, 0))
    rest = max(int(total_steps) - warm, 1)
    if train_cfg.schedule == "cosine":
        main = S.CosineAnnealingLR(optimizer, T_max=rest, eta_min=train_cfg.lr * train_cfg.min_lr_ratio)
    elif train_cfg.schedule == "poly":
        main = S.PolynomialLR(optimizer, total_iters=rest, power=0.9)
    else:
        main = S.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warm == 0:
        return main
    warmup = S.LinearLR(optimizer, start_factor=1.0 / (warm + 1), end_factor=1.0, total_iters=warm)
    return S.SequentialLR(optimizer, [warmup, main], milestones=[warm])


def make_ema(network: nn.Module, decay: float | None):
    """An EMA copy of ``network`` (``AveragedModel`` with ``get_ema_multi_avg_fn``), or None."""
    if decay is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler,
               loss_fn: nn.Module, device: torch.device, scaler: torch.amp.GradScaler | None = None,
               amp: bool = False) -> float:
    """One optimiser step on a batch; returns the loss. ``amp``: float16 autocast with ``scaler`` (CUDA only)."""
    model.train()
    use_amp = bool(amp and device.type == "cuda")
    x = x.to(device, non_blocking=True)
    y = y.to(device, non_blocking=True)
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
    return float(loss.detach())


def validate(segmenter, cases: Sequence[Mapping[str, Any]], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Predict every case with ``segmenter`` and return per foreground class (Dice sums, counts) ``[K-1]``.

    A class absent from both prediction and ground truth is skipped; mean Dice = ``sums.sum() / counts.sum()``.
    """
    from raylearn.metrics import dice_per_class

    sums = np.zeros(num_classes - 1)
    counts = np.zeros(num_classes - 1)
    for case in cases:
        values, present = dice_per_class(segmenter.predict_label(np.asarray(case["image"])),
                                         np.asarray(case["label"]), num_classes)
        sums += np.where(present, values, 0.0)
        counts += present
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
