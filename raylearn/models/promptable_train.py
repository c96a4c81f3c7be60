"""Fine-tuning SAM-Med3D with simulated clicks, and running it on a case: the promptable model of every round.

Training follows SAM-Med3D's own recipe: a ``S^3`` window centred on one class of a labelled case, clicks added
one at a time from the error region between the model's current mask and the label
(:func:`raylearn.prompts.next_click`: a missed voxel gives a positive click, an extra voxel a negative one), the
previous low-resolution mask fed back, a Dice + cross-entropy loss after every click, one optimiser step per
batch. Inference (:func:`segment_case`) runs the same loop with :func:`raylearn.prompts.simulate_clicks`, per
class, the reference being the segmenter's prediction or the ground truth.

Arrays: images ``float32 [C, D, H, W]`` and labels ``uint8 [D, H, W]`` of the pool store's grid; windows
``[S, S, S]``; click coordinates ``(d, h, w)`` window voxels. No Ray here.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from raylearn.models.promptable import PromptableConfig
from raylearn.models.sam_med3d import (
    SamMed3D,
    SamMed3DConfig,
    build_sam_med3d,
    combine_class_probabilities,
    crop_window,
    load_checkpoint,
)
from raylearn.prompts import class_window_start, next_click, simulate_clicks

__all__ = ["PromptableTrainer", "load_promptable", "paste_window", "segment_case", "training_window"]

log = logging.getLogger(__name__)


def _crop_mask(mask: np.ndarray, start: Sequence[int], size: int) -> np.ndarray:
    """``bool [S,S,S]`` crop of ``mask [D,H,W]`` at ``start`` (False outside the array)."""
    out = np.zeros((size,) * 3, bool)
    src = tuple(slice(max(s, 0), min(s + size, n)) for s, n in zip(start, mask.shape, strict=True))
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start, strict=True))
    if all(sl.stop > sl.start for sl in src):
        out[dst] = mask[src]
    return out


def paste_window(window: np.ndarray, start: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Inverse of the crop: ``window [S,S,S]`` placed at ``start`` in a zero array of ``shape`` (clipped)."""
    out = np.zeros(tuple(shape), window.dtype)
    size = window.shape[0]
    dst = tuple(slice(max(s, 0), min(s + size, n)) for s, n in zip(start, out.shape, strict=True))
    src = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(dst, start, strict=True))
    if all(sl.stop > sl.start for sl in dst):
        out[dst] = window[src]
    return out


def training_window(image: np.ndarray, label: np.ndarray, cls: int, size: int, jitter: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """One training sample: the window centred on class ``cls`` (shifted by up to ``jitter`` voxels per axis).

    Returns:
        ``(window float32 [S,S,S] z-scored, target bool [S,S,S], start)``.
    """
    start = np.asarray(class_window_start(label == cls, size))
    if jitter:
        start = start + rng.integers(-jitter, jitter + 1, size=3)
    st = tuple(int(v) for v in start)
    return crop_window(image[0], st, size), _crop_mask(label == cls, st, size), st


class PromptableTrainer:
    """SAM-Med3D and its optimiser, trained round after round (warm) on labelled cases with simulated clicks.

    Args:
        cfg: the ``promptable:`` settings.
        device: torch device of the worker.
        seed: seeds the initialisation (without a checkpoint) and nothing global.
    """

    def __init__(self, cfg: PromptableConfig, device: torch.device | str = "cpu", seed: int = 0) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.sam_cfg: SamMed3DConfig = cfg.sam_config("cpu").model_copy(update={"init_seed": int(seed)})
        if self.sam_cfg.preset == "full" and not cfg.frozen and self.device.type != "cuda":
            raise ValueError("promptable.freeze_image_encoder: false with variant: full needs a GPU worker (one "
                             "CPU step of the full image encoder takes ~24 s and 5 GB); freeze it or use "
                             "variant: small")
        self.net = build_sam_med3d(self.sam_cfg)
        if cfg.checkpoint:
            load_checkpoint(self.net, cfg.checkpoint)
        self.net.to(self.device)
        self.size = int(self.sam_cfg.arch()["image_size"])
        if cfg.frozen:
            for p in self.net.image_encoder.parameters():
                p.requires_grad_(False)
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        from monai.losses import DiceCELoss

        self.loss_fn = DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")
        self.steps_done = 0
        self._emb_cache: dict[tuple, torch.Tensor] = {}  # frozen encoder: (case, class, start) -> embedding

    @property
    def num_trainable(self) -> int:
        return int(sum(p.numel() for p in self.params))

    # -- state ------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Weights, optimiser state and the step count (what a later round or a restarted worker continues)."""
        return {"model": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()},
                "optimizer": self.opt.state_dict(), "steps_done": self.steps_done}

    def load_state(self, st: dict[str, Any]) -> None:
        self.net.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        self.steps_done = int(st["steps_done"])

    def checkpoint_bytes(self, meta: dict[str, Any]) -> bytes:
        """An official-layout checkpoint (``model_state_dict``, ``arch``) plus ``meta`` (version, round, ...)."""
        buf = io.BytesIO()
        torch.save({"model_state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
                    "arch": self.sam_cfg.arch(), "preset": self.sam_cfg.preset, "meta": dict(meta)}, buf)
        return buf.getvalue()

    # -- training ---------------------------------------------------------------------------------
    def _embed(self, windows: np.ndarray, keys: list[tuple]) -> torch.Tensor:
        x = torch.tensor(windows, dtype=torch.float32, device=self.device)[:, None]
        if not self.cfg.frozen:
            return self.net.image_encoder(x)
        missing = [i for i, k in enumerate(keys) if k not in self._emb_cache]
        if missing:
            with torch.no_grad():
                self.net.image_encoder.eval()
                out = self.net.image_encoder(x[missing])
            for j, i in enumerate(missing):
                self._emb_cache[keys[i]] = out[j].detach()
        return torch.stack([self._emb_cache[k] for k in keys])

    def sample_batch(self, cases: Sequence[tuple[str, np.ndarray, np.ndarray]], rng: np.random.Generator):
        """``batch_size`` windows: a random case, a random class present in its label, the window on that class."""
        windows, targets, keys = [], [], []
        jitter = 0 if self.cfg.frozen else self.cfg.jitter
        while len(windows) < self.cfg.batch_size:
            cid, image, label = cases[int(rng.integers(len(cases)))]
            present = [int(k) for k in np.unique(label) if k != 0]
            if not present:
                if not any(np.any(c[2]) for c in cases):
                    raise ValueError("no labelled case has any foreground: nothing to prompt")
                continue
            k = present[int(rng.integers(len(present)))]
            w, t, st = training_window(image, label, k, self.size, jitter, rng)
            windows.append(w)
            targets.append(t)
            keys.append((cid, k, st))
        return np.stack(windows), np.stack(targets), keys

    def train_step(self, windows: np.ndarray, targets: np.ndarray, keys: list[tuple],
                   rng: np.random.Generator) -> float:
        """One optimiser step over a batch with ``cfg.clicks`` iterative simulated clicks; returns the mean loss.

        Args:
            windows: ``float32 [B,S,S,S]``; targets: ``bool [B,S,S,S]`` (non-empty); keys: embedding cache keys.
        """
        net, dev, b = self.net, self.device, len(windows)
        net.train()
        if self.cfg.frozen:
            net.image_encoder.eval()
        emb = self._embed(windows, keys)
        tgt = torch.tensor(targets[:, None], dtype=torch.float32, device=dev)
        lr_size = self.sam_cfg.low_res_size
        prev = torch.zeros((b, 1, lr_size, lr_size, lr_size), device=dev)
        current = np.zeros_like(targets, dtype=bool)
        pts: list[list[tuple[int, int, int]]] = [[] for _ in range(b)]
        labs: list[list[int]] = [[] for _ in range(b)]
        total = torch.zeros((), device=dev)
        for _ in range(self.cfg.clicks):
            for i in range(b):
                zyx, positive = next_click(current[i], targets[i], rng)
                pts[i].append(zyx)
                labs[i].append(int(positive))
            coords = torch.tensor(np.asarray(pts, np.float32), device=dev)
            labels = torch.tensor(np.asarray(labs, np.float32), device=dev)
            sparse, dense = net.prompt_encoder(points=[coords, labels], boxes=None, masks=prev)
            low, _ = net.mask_decoder(image_embeddings=emb, image_pe=net.prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                      multimask_output=False)
            up = F.interpolate(low, size=(self.size,) * 3, mode="trilinear", align_corners=False)
            total = total + self.loss_fn(up, tgt)
            current = (up.detach() > 0)[:, 0].cpu().numpy()
            prev = low.detach()
        loss = total / self.cfg.clicks
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.steps_done += 1
        return float(loss.detach())

    def fit(self, cases: Sequence[tuple[str, np.ndarray, np.ndarray]], steps: int, seed: Sequence[int],
            start: int = 0, on_step=None) -> list[float]:
        """``steps`` steps over ``cases`` (``(case_id, image [C,D,H,W], label [D,H,W])``); step ``s`` draws its
        batch and clicks from ``SeedSequence([*seed, s])``, so a restart at ``start`` continues identically."""
        losses = []
        for s in range(start, steps):
            rng = np.random.default_rng(np.random.SeedSequence([*map(int, seed), s, 11]))
            w, t, keys = self.sample_batch(cases, rng)
            losses.append(self.train_step(w, t, keys, rng))
            if on_step is not None:
                on_step(s, losses[-1])
        return losses


def load_promptable(path: str | Path, device: str = "cpu") -> SamMed3D:
    """A :class:`SamMed3D` (inference) from a checkpoint written by :meth:`PromptableTrainer.checkpoint_bytes`."""
    obj = torch.load(Path(path), map_location="cpu", weights_only=False)
    arch = dict(obj.get("arch") or {})
    preset = obj.get("preset", "small")
    cfg = SamMed3DConfig(preset=preset, checkpoint=str(path), device=device,
                         **{k: (tuple(v) if isinstance(v, list) else v) for k, v in arch.items()})
    return SamMed3D(cfg)


def segment_case(sam: SamMed3D, image: np.ndarray, reference: np.ndarray, classes: Sequence[int], n_clicks: int,
                 rng: np.random.Generator) -> np.ndarray:
    """The promptable model's label map ``uint8 [D,H,W]`` after ``n_clicks`` simulated clicks per class.

    Per class: the window centred on the class in ``reference`` (the segmenter's prediction or the ground truth),
    :func:`raylearn.prompts.simulate_clicks` from the error region against ``reference`` with the low-res mask fed
    back; the classes' probabilities are combined (arg-max above 0.5). A class absent from ``reference`` gets no
    clicks and no voxels.

    Args:
        sam: the promptable model (:func:`load_promptable`).
        image: ``float32 [C,D,H,W]`` (channel 0 is prompted); reference: ``[D,H,W]`` label map.
    """
    size = sam.image_size
    probs: dict[int, np.ndarray] = {}
    for k in classes:
        ref = np.asarray(reference) == int(k)
        if not ref.any():
            continue
        start = class_window_start(ref, size)
        crop = crop_window(np.asarray(image)[0], start, size)
        emb = sam.encode(crop[None])
        last: dict[str, np.ndarray] = {}

        def predict(_crop, points, labels, prev, emb=emb, last=last):
            low = sam.decode(emb, [points.astype(np.float32)], [labels.astype(np.float32)], [prev])[0]
            last["prob"] = sam.upsample(low)
            return last["prob"] > 0.5, low

        simulate_clicks(predict, crop, _crop_mask(ref, start, size), n_clicks, rng)
        probs[int(k)] = paste_window(last["prob"].astype(np.float32), start, ref.shape)
    if not probs:
        return np.zeros(np.asarray(reference).shape, np.uint8)
    return combine_class_probabilities(probs)
