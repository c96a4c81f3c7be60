"""The model deployment: a stateless SAM-Med3D replica whose encoder and decoder calls are ``@serve.batch``-ed.

Concurrent requests (from the ingress, any number of sessions) share one forward pass; replicas scale out freely
(``autoscaling_config``, ``num_gpus``). The HTTP side lives in :mod:`raylearn.serve.ingress`.
"""

import asyncio

import numpy as np
from ray import serve

from raylearn.config import parse_config
from raylearn.models.sam_med3d import SamMed3D
from raylearn.serve.config import MODEL_NAME, ModelDeploymentConfig


@serve.deployment(name=MODEL_NAME, max_ongoing_requests=32, ray_actor_options={"num_cpus": 1})
class SamMed3DModel:
    """Stateless SAM-Med3D replica: batched image encoder and prompt encoder + mask decoder."""

    def __init__(self) -> None:
        self.cfg: ModelDeploymentConfig | None = None
        self.model: SamMed3D | None = None  # built by reconfigure (user_config), else on first use
        self.batches = {"encode": 0, "decode": 0}  # forward passes; calls / batches = mean batch size

    def _ready(self) -> SamMed3D:
        if self.model is None:
            self.reconfigure({})
        return self.model

    def reconfigure(self, user_config: dict) -> None:
        cfg = parse_config(user_config, ModelDeploymentConfig, source=f"{MODEL_NAME}.user_config")
        if self.model is None or self.cfg is None or cfg.model != self.cfg.model:
            self.model = SamMed3D(cfg.model)
        size = cfg.batching.max_batch_size if cfg.batching.enabled else 1
        for fn in (self._encode_batch, self._decode_batch):
            fn.set_max_batch_size(size)
            fn.set_batch_wait_timeout_s(cfg.batching.batch_wait_timeout_s if cfg.batching.enabled else 0.0)
        self.cfg = cfg

    def info(self) -> dict:
        m, c = self._ready(), self.cfg
        return dict(model="SAM-Med3D", preset=c.model.preset, architecture=c.model.arch(), parameters=m.num_parameters,
                    checkpoint=c.model.checkpoint, checkpoint_sha256=m.checkpoint_sha256, input_size=m.image_size,
                    target_spacing_mm=c.model.target_spacing_mm, device=str(m.device),
                    batching={**c.batching.model_dump(), **{f"{k}_batches": v for k, v in self.batches.items()}},
                    encoder_calls=m.encoder_calls, decoder_calls=m.decoder_calls)

    async def encode(self, window: np.ndarray) -> np.ndarray:
        """``[S,S,S]`` z-scored window -> embedding ``[C,g,g,g]``."""
        self._ready()
        return await self._encode_batch(window)

    async def decode(self, embedding: np.ndarray, points: np.ndarray, labels: np.ndarray,
                     mask: np.ndarray | None) -> np.ndarray:
        """Embedding + clicks ``[N,3]``/``[N]`` + previous low-res logits -> low-res logits ``[L,L,L]``."""
        self._ready()
        return await self._decode_batch((embedding, points, labels, mask))

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _encode_batch(self, windows: list[np.ndarray]) -> list[np.ndarray]:
        self.batches["encode"] += 1
        return list(await asyncio.to_thread(self.model.encode, np.stack(windows)))

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _decode_batch(self, items: list[tuple]) -> list[np.ndarray]:
        self.batches["decode"] += 1
        emb = np.stack([it[0] for it in items])
        out = await asyncio.to_thread(self.model.decode, emb, [it[1] for it in items], [it[2] for it in items],
                                      [it[3] for it in items])
        return list(out)
