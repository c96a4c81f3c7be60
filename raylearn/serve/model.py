"""The model deployment: a stateless SAM-Med3D replica whose encoder and decoder calls are ``@serve.batch``-ed.

Concurrent requests (from the ingress, any number of sessions) share one forward pass; replicas scale out freely
(``autoscaling_config``, ``num_gpus``). Pre-annotation (segmenter -> simulated clicks -> SAM-Med3D) runs here too,
on the replica's device, with the segmenter (MONAI or nnU-Net checkpoint) loaded once per replica. The HTTP side
lives in :mod:`raylearn.serve.ingress`.
"""

import asyncio
import threading
import time

import numpy as np
from ray import serve

from raylearn.config import parse_config
from raylearn.models.sam_med3d import SamMed3D
from raylearn.serve.config import MODEL_NAME, ModelDeploymentConfig


def encoder_digest(net) -> str:
    """SHA-256 (16 hex) of the image encoder's weights: embeddings computed under another digest are stale."""
    import hashlib

    h = hashlib.sha256()
    for k, v in net.image_encoder.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@serve.deployment(name=MODEL_NAME, max_ongoing_requests=32, ray_actor_options={"num_cpus": 1})
class SamMed3DModel:
    """Stateless SAM-Med3D replica: batched image encoder and prompt encoder + mask decoder."""

    def __init__(self) -> None:
        self.cfg: ModelDeploymentConfig | None = None
        self.model: SamMed3D | None = None  # built by reconfigure (user_config), else on first use
        self.batches = {"encode": 0, "decode": 0}  # forward passes; calls / batches = mean batch size
        self._segmenters: dict[tuple, object] = {}  # (path, mtime, size) -> Segmenter, loaded on first use
        self._segmenter_lock = threading.Lock()

    def _ready(self) -> SamMed3D:
        if self.model is None:
            self.reconfigure({})
        return self.model

    def reconfigure(self, user_config: dict) -> None:
        cfg = parse_config(user_config, ModelDeploymentConfig, source=f"{MODEL_NAME}.user_config")
        if self.model is None or self.cfg is None or cfg.model != self.cfg.model or cfg.version != self.cfg.version:
            # new weights: built beside the old model, then swapped in one assignment (batches in flight finish on
            # the old one); the ingress re-encodes a session's window when the encoder digest changes
            self.model = SamMed3D(cfg.model)
            self.encoder_digest = encoder_digest(self.model.net)
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
                    encoder_calls=m.encoder_calls, decoder_calls=m.decoder_calls, version=c.version,
                    encoder_digest=self.encoder_digest)

    async def encode(self, window: np.ndarray) -> np.ndarray:
        """``[S,S,S]`` z-scored window -> embedding ``[C,g,g,g]``."""
        self._ready()
        return await self._encode_batch(window)

    async def decode(self, embedding: np.ndarray, points: np.ndarray, labels: np.ndarray,
                     mask: np.ndarray | None) -> np.ndarray:
        """Embedding + clicks ``[N,3]``/``[N]`` + previous low-res logits -> low-res logits ``[L,L,L]``."""
        self._ready()
        return await self._decode_batch((embedding, points, labels, mask))

    def segmenter(self, path: str):
        """The segmenter of a MONAI or nnU-Net checkpoint on this replica's device (cached per file version)."""
        import os

        from raylearn.models.loading import load_segmenter

        st = os.stat(path)
        key = (path, st.st_mtime_ns, st.st_size)
        with self._segmenter_lock:
            if key not in self._segmenters:
                self._segmenters = {key: load_segmenter(path, device=self._ready().device)}  # keep the newest only
            return self._segmenters[key]

    async def preannotate(self, image, label, *, segmenter_checkpoint: str, preprocess: dict, classes: list[int],
                          n_clicks: int, seed: int, reference: str, method: str) -> dict:
        """Prediction to prompt on one volume: :func:`raylearn.p2p.preannotate_volume` on this replica.

        Args:
            image: the uploaded ``sitk.Image``; label: its ground truth ``uint8 [D,H,W]`` or None.
            reference: ``"prediction"`` (clicks simulated against the segmenter's prediction) or ``"label"``
                (against ``label``: the authors' script, an expert's clicks).

        Returns:
            ``{"label_map", "segmenter_label_map" (uint8 [D,H,W]), "clicks" (list of Click), "timing_ms"}``.
        """
        return await asyncio.to_thread(self._preannotate, image, label, segmenter_checkpoint, preprocess, classes,
                                       n_clicks, seed, reference, method)

    def _preannotate(self, image, label, segmenter_checkpoint, preprocess, classes, n_clicks, seed, reference,
                     method) -> dict:
        import numpy as np

        from raylearn.data.preprocess import PreprocessConfig
        from raylearn.models.sam_med3d import prepare_volume
        from raylearn.p2p import preannotate_volume
        from raylearn.serve.preannotate import segmenter_label_map

        sam = self._ready()
        t0 = time.perf_counter()
        pred = segmenter_label_map(self.segmenter(segmenter_checkpoint), image, PreprocessConfig(**preprocess))
        t1 = time.perf_counter()
        ref = pred if reference == "prediction" else label
        volume = prepare_volume(image, self.cfg.model.target_spacing_mm)
        res = preannotate_volume(sam, volume, ref, n_clicks, np.random.default_rng(seed), classes=classes,
                                 method=method)
        t2 = time.perf_counter()
        return {"label_map": res.label_maps[n_clicks], "segmenter_label_map": pred,
                "clicks": [c for k in sorted(res.clicks) for c in res.clicks[k]],
                "timing_ms": {"segmenter": 1e3 * (t1 - t0), "sam_med3d": 1e3 * (t2 - t1)}}

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
