"""Fine-tuning SAM-Med3D with simulated clicks, and running it on a case: the promptable model of every round.

Training follows SAM-Med3D's own recipe: a ``S^3`` window centred on one class of a labelled case, clicks added
one at a time from the error region between the model's current mask and the label
(:func:`raylearn.prompts.next_click`: a missed voxel gives a positive click, an extra voxel a negative one), the
previous low-resolution mask fed back, a Dice + cross-entropy loss after every click, one optimiser step per
batch. Training windows are cut from the case on SAM-Med3D's grid (:func:`model_grid_case`: the stored case
resampled to ``target_spacing_mm`` as inference resamples an upload), so the trained model sees what
:func:`raylearn.p2p.preannotate_volume` and the Serve app give it.

Arrays: cases on the model grid ``float32 [D, H, W]`` with labels ``uint8 [D, H, W]``; windows ``[S, S, S]``;
click coordinates ``(d, h, w)`` window voxels. No Ray here.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from raylearn.models.promptable import PromptableConfig
from raylearn.models.sam_med3d import (
    SamMed3D,
    SamMed3DConfig,
    build_sam_med3d,
    crop_window,
    load_checkpoint,
    prepare_volume,
)
from raylearn.prompts import class_window_start, next_click

__all__ = ["PromptableTrainer", "load_promptable", "model_grid_case", "served_config", "stored_image",
           "training_window"]

log = logging.getLogger(__name__)


def _crop_mask(mask: np.ndarray, start: Sequence[int], size: int) -> np.ndarray:
    """``bool [S,S,S]`` crop of ``mask [D,H,W]`` at ``start`` (False outside the array)."""
    out = np.zeros((size,) * 3, bool)
    src = tuple(slice(max(s, 0), min(s + size, n)) for s, n in zip(start, mask.shape, strict=True))
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start, strict=True))
    if all(sl.stop > sl.start for sl in src):
        out[dst] = mask[src]
    return out


def training_window(array: np.ndarray, label: np.ndarray, cls: int, size: int, jitter: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """One training sample: the window centred on class ``cls`` (shifted by up to ``jitter`` voxels per axis).

    Returns:
        ``(window float32 [S,S,S] z-scored, target bool [S,S,S], start)``.
    """
    start = np.asarray(class_window_start(label == cls, size))
    if jitter:
        start = start + rng.integers(-jitter, jitter + 1, size=3)
    st = tuple(int(v) for v in start)
    return crop_window(array, st, size), _crop_mask(label == cls, st, size), st


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
        self.target_spacing_mm = float(self.sam_cfg.target_spacing_mm)
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
                    "arch": self.sam_cfg.arch(), "preset": self.sam_cfg.preset,
                    "meta": {"target_spacing_mm": self.target_spacing_mm, **meta}}, buf)
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
        """``steps`` steps over ``cases`` (``(case_id, array [D,H,W], label [D,H,W])`` on the model grid, see
        :func:`model_grid_case`); step ``s`` draws its
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
    """A :class:`SamMed3D` (inference) from a checkpoint written by :meth:`PromptableTrainer.checkpoint_bytes`:
    the architecture, preset and target spacing come from the checkpoint."""
    return SamMed3D(served_config(path, device))


def served_config(path: str | Path, device: str = "auto") -> SamMed3DConfig:
    """The :class:`SamMed3DConfig` that serves a promptable checkpoint (architecture, spacing and path from it)."""
    obj = torch.load(Path(path), map_location="cpu", weights_only=False)
    arch = {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(obj.get("arch") or {}).items()}
    meta = dict(obj.get("meta") or {})
    extra = {"target_spacing_mm": float(meta["target_spacing_mm"])} if "target_spacing_mm" in meta else {}
    return SamMed3DConfig(preset=obj.get("preset", "small"), checkpoint=str(path), device=device, **arch, **extra)


def model_grid_case(image: np.ndarray, label: np.ndarray, spacing: Sequence[float],
                    target_spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """A stored case on SAM-Med3D's grid, exactly as inference sees it (:func:`prepare_volume`, then the label
    resampled nearest-neighbour onto the same grid).

    Args:
        image: ``[C,D,H,W]`` (channel 0 is used); label: ``uint8 [D,H,W]``; spacing: ``(D,H,W)`` mm.

    Returns:
        ``(array float32 [D',H',W'], label uint8 [D',H',W'])`` at ``target_spacing_mm`` isotropic.
    """
    from raylearn.p2p import reference_on_grid

    volume = prepare_volume(stored_image(image, spacing), target_spacing_mm)
    return volume.array, reference_on_grid(volume, np.asarray(label, np.uint8))


def stored_image(image: np.ndarray, spacing: Sequence[float]) -> sitk.Image:
    """Channel 0 of a stored case ``[C,D,H,W]`` as a ``sitk.Image`` with its spacing (``(D,H,W)`` mm)."""
    img = sitk.GetImageFromArray(np.asarray(image, np.float32)[0])
    img.SetSpacing(tuple(float(v) for v in spacing)[::-1])
    return img
