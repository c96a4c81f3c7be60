"""Settings of the promptable model (SAM-Med3D) that the training service fine-tunes after every round.

The experiment YAML's ``promptable:`` section. After the segmenter's round, the same Ray Train workers fine-tune
SAM-Med3D on the labelled cases with simulated clicks (:mod:`raylearn.models.promptable_train`), keep it warm across
rounds, and publish ``checkpoints/promptable_round_XX.pt`` beside the segmenter's checkpoints. No torch here: the
experiment config imports this module.

Which part trains:

- ``variant: small`` (CPU): the scaled-down architecture, from scratch (or from ``checkpoint``), every part.
- ``variant: full`` on CPU: the released architecture's prompt encoder + mask decoder only
  (``freeze_image_encoder`` defaults to true; the image encoder costs ~24 s and 5 GB per step on CPU).
- ``variant: full`` on a GPU: the whole model from a local ``checkpoint`` (``freeze_image_encoder: false``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from raylearn.config import StrictModel

__all__ = ["PromptableConfig"]


class PromptableConfig(StrictModel):
    """The ``promptable:`` section of an experiment.

    Attributes:
        enabled: fine-tune the promptable model after every round (off by default).
        variant: ``"small"`` (CPU, 32^3 window, 0.7 M parameters) or ``"full"`` (the released 128^3 model).
        checkpoint: a local SAM-Med3D checkpoint (official ``model_state_dict`` layout) to start from; None =
            seeded random initialisation (``small`` from scratch).
        image_size: edge of the model's cubic window in voxels; None = the variant's (32 small, 128 full). Must
            be a multiple of the patch size.
        patch_size: edge of the image encoder's patches in voxels; None = the variant's (8 small, 16 full). The
            mask comes out at ``4 * image_size / patch_size`` voxels per edge, so ``patch_size: 4`` on the small
            variant predicts at the window's full resolution (8 gives half): finer masks for small structures,
            at about 1.7x the training time on CPU. Only from scratch: a checkpoint fixes it.
        encoder_depth / encoder_embed_dim: the image encoder's transformer blocks and width; None = the variant's
            (small: 2 blocks of 48, full: 12 of 768). Heads follow the width (one per 24 channels) and the last and
            middle blocks attend globally. Only from scratch.
        target_spacing_mm: SAM-Med3D's isotropic grid (1.5 mm for the released model): stored cases are
            resampled to it for training, as uploads are for inference.
        steps: optimiser steps per round after the first; ``first_round_steps``: round 0's (None = ``steps``).
        clicks: simulated clicks per training sample (iterative, from the error region, mask fed back).
        batch_size: class windows per step.
        lr: AdamW learning rate; weight_decay: AdamW weight decay.
        freeze_image_encoder: train only the prompt encoder and mask decoder; None = true for ``full``, false
            for ``small``. With a frozen encoder the window embeddings are cached and crops are not jittered.
        jitter: random shift (voxels, each axis) of a training window around the class centre (unfrozen only).
        eval_clicks: clicks of the per-round measurement (b) and (c).
        evaluate: measure every round on the test split after the run: (a) segmenter, (b) segmenter -> clicks
            -> promptable model, (c) ground-truth clicks -> promptable model (``p2p_rounds.{csv,md,png}``).
        eval_max_cases: test cases of that measurement (None = all of ``evaluate.max_test_cases``' split).
        serve_config: the Serve config file a running app was started with (``raylearn serve --config``, same Ray
            cluster): its SAM-Med3D deployment takes each round's weights live (a new ``version`` in its
            ``user_config``, :func:`raylearn.serve.publish.publish_promptable`); None = do not publish.
        serve_app: that app's name (None = the Serve config's ``name``).
    """

    enabled: bool = False
    variant: Literal["small", "full"] = "small"
    checkpoint: str | None = None
    image_size: int | None = Field(None, ge=8, le=256)
    patch_size: int | None = Field(None, ge=2, le=32)
    encoder_depth: int | None = Field(None, ge=1, le=24)
    encoder_embed_dim: int | None = Field(None, ge=24, le=1536)
    target_spacing_mm: float = Field(1.5, gt=0, le=10)
    steps: int = Field(40, ge=1)
    first_round_steps: int | None = Field(None, ge=1)
    clicks: int = Field(5, ge=1, le=20)
    batch_size: int = Field(2, ge=1, le=64)
    lr: float = Field(1e-3, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    freeze_image_encoder: bool | None = None
    jitter: int = Field(3, ge=0)
    eval_clicks: int = Field(5, ge=1, le=50)
    evaluate: bool = True
    eval_max_cases: int | None = Field(None, ge=1)
    serve_config: str | None = None
    serve_app: str | None = None

    @model_validator(mode="after")
    def _check(self) -> PromptableConfig:
        if self.checkpoint is not None and not Path(self.checkpoint).expanduser().is_file():
            raise ValueError(f"checkpoint: {self.checkpoint} is not a file (a local SAM-Med3D checkpoint)")
        if self.serve_config is not None and not Path(self.serve_config).expanduser().is_file():
            raise ValueError(f"serve_config: {self.serve_config} is not a file (the Serve config of the running app)")
        if self.serve_app is not None and self.serve_config is None:
            raise ValueError("serve_app: publishing to a Serve app needs serve_config (the file it was started with)")
        patch = self.patch_size or (8 if self.variant == "small" else 16)
        size = self.image_size or (32 if self.variant == "small" else 128)
        if size % patch:
            raise ValueError(f"image_size: {size} is not a multiple of the patch size {patch} (patch_size, or the "
                             f"{self.variant} variant's)")
        for key in ("patch_size", "encoder_depth", "encoder_embed_dim"):
            if getattr(self, key) is not None and self.checkpoint is not None:
                raise ValueError(f"{key}: a checkpoint fixes the architecture; leave {key} unset with checkpoint")
        if self.encoder_embed_dim is not None and self.encoder_embed_dim % 24:
            raise ValueError(f"encoder_embed_dim: {self.encoder_embed_dim} is not a multiple of 24 (one head per 24)")
        return self

    @property
    def frozen(self) -> bool:
        """Whether the image encoder is kept fixed (``freeze_image_encoder``, resolved)."""
        return self.variant == "full" if self.freeze_image_encoder is None else bool(self.freeze_image_encoder)

    def round_steps(self, round_index: int) -> int:
        return int(self.first_round_steps or self.steps) if round_index == 0 else int(self.steps)

    def sam_config(self, device: str = "cpu"):
        """The :class:`~raylearn.models.sam_med3d.SamMed3DConfig` of the model (imports torch)."""
        from raylearn.models.sam_med3d import SamMed3DConfig

        extra = {k: v for k, v in (("image_size", self.image_size), ("patch_size", self.patch_size)) if v is not None}
        if self.encoder_embed_dim is not None:
            extra.update(encoder_embed_dim=self.encoder_embed_dim, encoder_num_heads=self.encoder_embed_dim // 24)
        if self.encoder_depth is not None:
            depth = self.encoder_depth
            extra.update(encoder_depth=depth, encoder_global_attn_indexes=tuple(sorted({(depth - 1) // 2, depth - 1})))
        return SamMed3DConfig(preset=self.variant, checkpoint=self.checkpoint, device=device,
                              target_spacing_mm=self.target_spacing_mm, **extra)
