"""The masked training loss of slice units: voxels nobody annotated leave the loss (MONAI MaskedDiceLoss + CE with
ignore_index), and whole-volume labels train exactly as before."""

from __future__ import annotations

import numpy as np
import torch
from monai.losses import DiceCELoss

from raylearn.models.training import IGNORE, CaseCache, MaskedDiceCELoss, make_loss


def _logits(seed: int = 0, shape=(1, 2, 1, 2, 2)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_no_ignored_voxel_is_monai_dice_ce_exactly():
    x = _logits(shape=(2, 3, 3, 4, 5))
    y = torch.randint(0, 3, (2, 1, 3, 4, 5), generator=torch.Generator().manual_seed(1))
    assert torch.equal(make_loss()(x, y), DiceCELoss(to_onehot_y=True, softmax=True)(x, y))


def test_loss_ignores_the_labels_of_unannotated_voxels():
    x = _logits(shape=(2, 3, 3, 4, 5))
    g = torch.Generator().manual_seed(2)
    y = torch.randint(0, 3, (2, 1, 3, 4, 5), generator=g)
    annotated = torch.zeros_like(y, dtype=torch.bool)
    annotated[:, :, :, :, 1] = True  # one slice along the last axis
    loss = MaskedDiceCELoss()
    ref = loss(x, torch.where(annotated, y, torch.full_like(y, IGNORE)))
    for seed in range(3):  # whatever the hidden voxels' labels were, they are ignored: the same loss
        other = torch.randint(0, 3, y.shape, generator=torch.Generator().manual_seed(10 + seed))
        mixed = torch.where(annotated, y, other)
        assert torch.allclose(loss(x, torch.where(annotated, mixed, torch.full_like(y, IGNORE))), ref)
    # and the unannotated voxels get no gradient
    x.requires_grad_(True)
    loss(x, torch.where(annotated, y, torch.full_like(y, IGNORE))).backward()
    assert float(x.grad[:, :, :, :, 0].abs().sum()) == 0.0 and float(x.grad[:, :, :, :, 1].abs().sum()) > 0


def test_masked_loss_by_hand():
    """Two classes, one sample of 4 voxels, 2 of them annotated (both class 1)."""
    logits = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, np.log(3.0), 5.0, -5.0]).reshape(1, 2, 1, 2, 2).float()
    target = torch.tensor([1, 1, IGNORE, IGNORE]).reshape(1, 1, 1, 2, 2)
    # annotated voxels: p(class 1) = 0.5 and 0.75; the ignored ones' logits do not matter
    p1 = np.array([0.5, 0.75])
    ce = float(np.mean(-np.log(p1)))
    smooth = 1e-5  # MONAI's smooth_nr = smooth_dr
    dice_bg = 1 - (2 * 0.0 + smooth) / ((1 - p1).sum() + 0.0 + smooth)  # no background in the annotated target
    dice_fg = 1 - (2 * p1.sum() + smooth) / (p1.sum() + 2.0 + smooth)
    expected = (dice_bg + dice_fg) / 2 + ce
    assert abs(float(MaskedDiceCELoss()(logits, target)) - expected) < 1e-5


def test_nothing_annotated_gives_zero():
    x = _logits().requires_grad_(True)
    out = MaskedDiceCELoss()(x, torch.full((1, 1, 1, 2, 2), IGNORE))
    out.backward()
    assert float(out.detach()) == 0.0 and float(x.grad.abs().sum()) == 0.0


def test_case_cache_marks_unannotated_voxels_ignored():
    image = np.zeros((1, 2, 3, 4), np.float32)
    label = np.ones((2, 3, 4), np.uint8)
    mask = np.zeros((2, 3, 4), bool)
    mask[:, :, 0] = True
    cache = CaseCache((2, 3, 4), lambda cid: (image, label, mask if cid == "partial" else None))
    cache.ensure(["partial", "full"])
    part = cache.get("partial")["label"][0].numpy()
    assert (part[:, :, 0] == 1).all() and (part[:, :, 1:] == IGNORE).all()
    assert (cache.get("full")["label"][0].numpy() == 1).all()
