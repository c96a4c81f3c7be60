"""The promptable model's fine-tuning with simulated clicks (small SAM-Med3D, tiny synthetic spheres; no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raylearn.config import ConfigError, parse_config
from raylearn.metrics import dice
from raylearn.models.promptable import PromptableConfig
from raylearn.models.promptable_train import PromptableTrainer, load_promptable, paste_window, segment_case


def sphere_case(seed: int, shape=(32, 32, 32)):
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    c, rad = rng.integers(12, 20, 3), rng.uniform(4, 7)
    lab = (((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) < rad**2).astype(np.uint8)
    img = (lab * 2.0 + rng.normal(0, 0.5, shape)).astype(np.float32)[None]
    return f"c{seed}", img, lab


def _dice_after_clicks(trainer: PromptableTrainer, tmp_path, case) -> float:
    path = tmp_path / f"p{trainer.steps_done}.pt"
    path.write_bytes(trainer.checkpoint_bytes({"version": trainer.steps_done}))
    sam = load_promptable(path)
    out = segment_case(sam, case[1], case[2], [1], 3, np.random.default_rng(0))
    return dice(out == 1, case[2] == 1)


def test_fine_tune_lowers_loss_and_raises_dice(tmp_path):
    torch.set_num_threads(1)
    cases = [sphere_case(i) for i in range(4)]
    held_out = sphere_case(99)
    tr = PromptableTrainer(PromptableConfig(enabled=True, batch_size=2, clicks=3, lr=2e-3), seed=0)
    before = _dice_after_clicks(tr, tmp_path, held_out)
    losses = tr.fit(cases, 50, seed=[0])
    after = _dice_after_clicks(tr, tmp_path, held_out)
    # measured: loss 1.51 -> 0.33 (60 steps), Dice with 3 ground-truth clicks 0.05 -> 0.79
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    assert after > before + 0.3 and after > 0.5


def test_restart_from_state_continues_identically():
    torch.set_num_threads(1)
    cases = [sphere_case(i) for i in range(2)]
    cfg = PromptableConfig(enabled=True, batch_size=1, clicks=2)
    a = PromptableTrainer(cfg, seed=1)
    a.fit(cases, 6, seed=[3])
    b = PromptableTrainer(cfg, seed=1)
    b.fit(cases, 3, seed=[3])
    c = PromptableTrainer(cfg, seed=7)  # another init: everything comes from the state
    c.load_state(b.state())
    c.fit(cases, 6, seed=[3], start=3)
    for (k, va), vc in zip(a.net.state_dict().items(), c.net.state_dict().values(), strict=True):
        assert torch.allclose(va, vc, atol=1e-6), k


def test_frozen_encoder_trains_decoder_only_and_caches_embeddings():
    torch.set_num_threads(1)
    cases = [sphere_case(i) for i in range(2)]
    tr = PromptableTrainer(PromptableConfig(enabled=True, batch_size=2, clicks=2, freeze_image_encoder=True))
    enc0 = {k: v.clone() for k, v in tr.net.image_encoder.state_dict().items()}
    dec0 = {k: v.clone() for k, v in tr.net.mask_decoder.state_dict().items()}
    tr.fit(cases, 4, seed=[0])
    assert all(torch.equal(v, tr.net.image_encoder.state_dict()[k]) for k, v in enc0.items())
    assert any(not torch.equal(v, tr.net.mask_decoder.state_dict()[k]) for k, v in dec0.items())
    assert 1 <= len(tr._emb_cache) <= 2  # one window per (case, class): no jitter when frozen


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint: .* is not a file"):
        parse_config({"checkpoint": str(tmp_path / "missing.pt")}, PromptableConfig, source="promptable")
    with pytest.raises(ConfigError, match="image_size"):
        parse_config({"image_size": 36}, PromptableConfig, source="promptable")
    with pytest.raises(ConfigError, match="unknown|extra|not permitted"):
        parse_config({"stepz": 3}, PromptableConfig, source="promptable")
    assert PromptableConfig(variant="full").frozen and not PromptableConfig().frozen
    with pytest.raises(ValueError, match="needs a GPU"):
        PromptableTrainer(PromptableConfig(variant="full", freeze_image_encoder=False), device="cpu")


def test_paste_window_clips_at_the_border():
    w = np.ones((4, 4, 4), np.uint8)
    out = paste_window(w, (-2, 0, 3), (5, 5, 5))
    assert out.sum() == 2 * 4 * 2 and out[0, 0, 3] == 1 and out[2, 0, 3] == 0
