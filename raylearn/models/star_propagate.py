"""STAR's pseudo-labelling stage (the loop's ``propagate`` hook, :class:`raylearn.units.PropagationContext`).

One call per round, after the round's labels arrived and before the segmenter trains:

1. gather the annotated slices along the run's axis (``ctx.labelled_units``, read through ``ctx.image`` /
   ``ctx.label``) and the pairs of nearest annotated slices of each case;
2. load the newest checkpoint of an *earlier* round (``ctx.work_dir`` and its sibling round directories: a
   killed and resumed round starts from the same weights, so it repeats the same result), or build a fresh
   :class:`~raylearn.models.star.StarNet`; train stage 1 and stage 2 (:mod:`raylearn.models.star`) and save
   ``star_round{r:04d}.pt`` atomically;
3. per case, predict every unlabelled slice of a group from the group's labelled slices (attention masked to
   them), its entropy and ``1 -`` mean cosine similarity of its ``f_U`` features to those slices;
4. keep the ``n_pseudo`` lowest-entropy pseudo-labelled slices over the pool and return them with every scored
   slice's ``propagation_score``.

No Ray; torch runs on ``ctx.device``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from raylearn.models.star import (
    StarNet,
    build_star_net,
    cosine_to_memory,
    pad_slices,
    slice_entropy,
)
from raylearn.models.star_train import train_stage1, train_stage2
from raylearn.units import PropagationContext, PropagationResult, parse_unit, unit_id

if TYPE_CHECKING:
    from raylearn.strategies.star import Star

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_PATTERN", "latest_checkpoint", "labelled_slices", "run_propagation"]

CHECKPOINT_PATTERN = "star_round{:04d}.pt"


def labelled_slices(units: list[str], axis: int) -> dict[str, list[int]]:
    """case -> sorted annotated slice indices along ``axis`` (units on another axis or volume ids are skipped)."""
    out: dict[str, set[int]] = defaultdict(set)
    for uid in units:
        if "@" not in uid:
            continue
        u = parse_unit(uid)
        if u.axis == axis:
            out[u.case].add(u.index)
    return {c: sorted(v) for c, v in out.items()}


def _checkpoints(work_dir: Path) -> list[tuple[int, Path]]:
    """``(round, path)`` of every STAR checkpoint in ``work_dir`` and in its sibling round directories (the loop
    gives each round its own ``<output_dir>/propagation/round_<rr>``)."""
    work_dir = Path(work_dir)
    found = {}
    for p in [*work_dir.glob("star_round*.pt"), *work_dir.parent.glob("round_*/star_round*.pt")]:
        try:
            found[p.resolve()] = int(p.stem.removeprefix("star_round"))
        except ValueError:
            continue
    return sorted((r, p) for p, r in found.items())


def latest_checkpoint(work_dir: Path, before_round: int) -> Path | None:
    """The checkpoint of the latest round ``< before_round`` (in ``work_dir`` or a sibling round directory), or
    None: a resumed round starts from the weights its first attempt started from."""
    earlier = [(r, p) for r, p in _checkpoints(work_dir) if r < before_round]
    return earlier[-1][1] if earlier else None


def _net_config(strategy: Star, in_channels: int, num_classes: int) -> dict:
    return {"in_channels": in_channels, "num_classes": num_classes, "backbone": strategy.backbone,
            "width": strategy.width, "decoder_dim": strategy.decoder_dim}


def _load_or_build(strategy: Star, ctx: PropagationContext, in_channels: int) -> tuple[StarNet, Path | None]:
    cfg = _net_config(strategy, in_channels, ctx.num_classes)
    ckpt = latest_checkpoint(ctx.work_dir, ctx.round_index)
    with torch.random.fork_rng(devices=[]):  # a seeded initialisation that leaves the global generator alone
        torch.manual_seed(ctx.seed)
        net = build_star_net(**cfg)
    if ckpt is not None:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if state.get("config") != cfg:
            raise ValueError(f"STAR checkpoint {ckpt} was trained with {state.get('config')}, the run now asks for "
                             f"{cfg}; use a new work directory or the old settings")
        net.load_state_dict(state["model"])
    return net.to(ctx.device), ckpt


def _save(net: StarNet, cfg: dict, work_dir: Path, round_index: int) -> Path:
    """Write ``star_round{r}.pt`` atomically; delete checkpoints of rounds before ``r - 1`` (a resumed round ``r``
    needs only round ``r - 1``'s)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / CHECKPOINT_PATTERN.format(round_index)
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"config": cfg, "round": round_index, "model": {k: v.cpu() for k, v in net.state_dict().items()}},
               tmp)
    os.replace(tmp, path)
    for r, p in _checkpoints(work_dir):
        if r < round_index - 1:
            p.unlink(missing_ok=True)
    return path


def _slices(volume: np.ndarray, axis: int) -> np.ndarray:
    """``[C, D, H, W]`` -> ``[n, C, h, w]`` slices along spatial ``axis``; ``[D, H, W]`` -> ``[n, h, w]``."""
    lead = volume.ndim - 3
    return np.moveaxis(volume, lead + axis, 0)


@torch.no_grad()
def _predict_case(net: StarNet, image: np.ndarray, labels: np.ndarray, lab_idx: list[int], spacing: int, chunk: int,
                  device: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pseudo-labels of the unlabelled slices of one case that have a labelled slice in their group.

    Args:
        image: ``float32 [n, C, h, w]`` slices.
        labels: ``int [n, h, w]`` (valid on ``lab_idx``).
        lab_idx: annotated slice indices.

    Returns:
        indices ``int [U]``, pseudo-labels ``uint8 [U, h, w]``, entropies ``[U]`` (nats), scores ``[U]``
        (``1 -`` mean cosine similarity).
    """
    from raylearn.strategies.star import group_bounds, group_of

    n, _, h, w = image.shape
    groups, bounds = group_of(n, spacing), group_bounds(n, spacing)
    lab = np.asarray(lab_idx, dtype=np.int64)
    is_lab = np.zeros(n, bool)
    is_lab[lab] = True
    unl = np.array([i for i in range(n) if not is_lab[i]
                    and ((lab >= bounds[groups[i], 0]) & (lab <= bounds[groups[i], 1])).any()], dtype=np.int64)
    if not len(unl):
        return unl, np.zeros((0, h, w), np.uint8), np.zeros(0), np.zeros(0)
    x = torch.from_numpy(pad_slices(np.ascontiguousarray(image, dtype=np.float32), net.stride)).to(device)
    y = torch.from_numpy(pad_slices(np.ascontiguousarray(labels[lab], dtype=np.int64), net.stride)).to(device)
    keys, values = net.memorize(x[lab], F.one_hot(y, net.num_classes).permute(0, 3, 1, 2))
    feat_m = net.features(x[lab])
    preds, ents, scores = [], [], []
    for s in range(0, len(unl), chunk):
        part = unl[s:s + chunk]
        g = bounds[groups[part]]  # [u, 2]
        allowed = torch.from_numpy((lab[None, :] >= g[:, :1]) & (lab[None, :] <= g[:, 1:])).to(device)
        probs = torch.softmax(net.propagate(x[part], keys, values, allowed), dim=1)[:, :, :h, :w]
        preds.append(probs.argmax(dim=1).to(torch.uint8).cpu().numpy())
        ents.append(slice_entropy(probs).cpu().numpy())
        scores.append((1.0 - cosine_to_memory(net.features(x[part]), feat_m, allowed)).cpu().numpy())
    return unl, np.concatenate(preds), np.concatenate(ents), np.concatenate(scores)


def run_propagation(strategy: Star, ctx: PropagationContext) -> PropagationResult:
    """STAR's ``propagate`` (see the module docstring), with ``strategy.torch_threads`` intra-op threads when set.

    Args:
        strategy: the configured :class:`~raylearn.strategies.star.Star` (hyperparameters).
        ctx: the loop's context (images ``[C, D, H, W]``, partial labels, ``work_dir``, seed, device).

    Returns:
        see :func:`_run`.
    """
    threads = torch.get_num_threads()
    if strategy.torch_threads is not None:
        torch.set_num_threads(int(strategy.torch_threads))
    try:
        return _run(strategy, ctx)
    finally:
        torch.set_num_threads(threads)


def _run(strategy: Star, ctx: PropagationContext) -> PropagationResult:
    """The stage itself.

    Args:
        strategy: the configured :class:`~raylearn.strategies.star.Star` (hyperparameters).
        ctx: the loop's context (images ``[C, D, H, W]``, partial labels, ``work_dir``, seed, device).

    Returns:
        pseudo-labels of the kept slices (case -> ``(uint8 [D, H, W], bool [D, H, W])``), ``propagation_score`` of
        every scored unlabelled slice and ``info`` (kept, candidates, stage losses, seconds, checkpoint).
    """
    t0 = time.perf_counter()
    axis = int(ctx.axis)
    lab_by_case = labelled_slices(list(ctx.labelled_units), axis)
    lab_by_case = {c: v for c, v in lab_by_case.items() if v}
    if not lab_by_case:
        logger.info("star: round %d has no annotated slice along axis %d; nothing to propagate", ctx.round_index,
                    axis)
        return PropagationResult(info={"kept": 0, "candidates": 0})
    cache: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # case -> slices, labels, annotated
    train_x: list[np.ndarray] = []
    train_y: list[np.ndarray] = []
    pairs: list[tuple[int, int]] = []
    for case, idx in lab_by_case.items():
        image = np.asarray(ctx.image(case), dtype=np.float32)
        if image.ndim != 4:
            raise ValueError(f"star: ctx.image({case!r}) must be [C, D, H, W], got shape {image.shape}")
        label, annotated = ctx.label(case)
        if label.shape != image.shape[1:] or annotated.shape != image.shape[1:]:
            raise ValueError(f"star: case {case!r} has image {image.shape} but label {label.shape} / annotated "
                             f"{annotated.shape}")
        sl, sy, sa = _slices(image, axis), _slices(np.asarray(label), axis), _slices(np.asarray(annotated), axis)
        partial = [i for i in idx if i >= len(sl) or not sa[i].all()]
        if partial:
            raise ValueError(f"star: slices {partial[:5]} of case {case!r} are listed as labelled but not (fully) "
                             "annotated in the label store")
        cache[case] = (sl, sy, np.asarray(annotated, dtype=bool))
        base = len(train_x)
        train_x += [sl[i] for i in idx]
        train_y += [sy[i].astype(np.int64) for i in idx]
        for k in range(len(idx) - 1):  # nearest labelled neighbours, both directions
            pairs += [(base + k, base + k + 1), (base + k + 1, base + k)]
    in_channels = train_x[0].shape[0]
    net, resumed = _load_or_build(strategy, ctx, in_channels)
    params = strategy.train_params()
    rng = np.random.default_rng(ctx.seed)
    loss1 = train_stage1(net, train_x, train_y, params, rng, ctx.device)
    loss2 = train_stage2(net, train_x, train_y, pairs, params, rng, ctx.device)
    ckpt = _save(net, _net_config(strategy, in_channels, ctx.num_classes), Path(ctx.work_dir), ctx.round_index)
    net.eval()
    cands: list[tuple[float, int, int, str, np.ndarray]] = []  # entropy, case order, slice, case, pseudo-label
    scores: dict[str, float] = {}
    case_order = {c: k for k, c in enumerate(ctx.case_ids)}
    for case, idx in lab_by_case.items():
        sl, sy, _ = cache[case]
        unl, pred, ent, score = _predict_case(net, sl, sy, idx, strategy.spacing, strategy.chunk, ctx.device)
        for i, p, e, s in zip(unl, pred, ent, score, strict=True):
            scores[unit_id(case, axis, int(i))] = float(s)
            cands.append((float(e), case_order.get(case, len(case_order)), int(i), case, p))
    blank = [not np.any(c[4] > 0) for c in cands]  # pseudo-labels with no foreground voxel
    eligible = [k for k in range(len(cands)) if not (strategy.drop_blank_pseudo and blank[k])]  # delete_black_patch
    ranked = sorted(eligible, key=lambda k: cands[k][:3])[: strategy.n_pseudo]
    pseudo: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for k in ranked:
        _, _, i, case, p = cands[k]
        annotated = cache[case][2]
        if case not in pseudo:
            pseudo[case] = (np.zeros(annotated.shape, np.uint8), np.zeros(annotated.shape, bool))
        lab_vol, filled = pseudo[case]
        _slices(lab_vol, axis)[i] = p
        _slices(filled, axis)[i] = True
    for case, (lab_vol, filled) in pseudo.items():  # never over an annotated voxel (another axis, a whole case)
        overlap = filled & cache[case][2]
        filled &= ~overlap
        lab_vol[overlap] = 0
    kept_ent = [cands[k][0] for k in ranked]
    info = {"kept": len(ranked), "candidates": len(cands), "stage1_loss": loss1, "stage2_loss": loss2,
            "kept_mean_entropy": float(np.mean(kept_ent)) if kept_ent else float("nan"),
            "kept_blank": sum(blank[k] for k in ranked), "blank_candidates": sum(blank),
            "train_slices": len(train_x), "train_pairs": len(pairs), "seconds": round(time.perf_counter() - t0, 2),
            "checkpoint": str(ckpt), "resumed_from": str(resumed) if resumed else None}
    logger.info("star: round %d kept %d of %d pseudo-labelled slices (%d all background; stage losses %.3f / "
                "%.3f) in %.1f s", ctx.round_index, info["kept"], info["candidates"], info["kept_blank"], loss1,
                loss2, info["seconds"])
    return PropagationResult(pseudo=pseudo, unit_scores=scores, info=info)
