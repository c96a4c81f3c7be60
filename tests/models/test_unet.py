"""MonaiSegmenter contract, checkpoints, MC dropout, embeddings, and the pure training helpers (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raylearn.config import ConfigError, parse_config
from raylearn.models.config import ModelConfig, TrainConfig
from raylearn.models.training import (
    dice_sums,
    make_loss,
    make_optimizer,
    make_scheduler,
    make_train_loader,
    split_validation,
    train_epoch,
    validate,
)
from raylearn.models.unet import MonaiSegmenter

torch.set_num_threads(2)

TINY = {"channels": (8, 16, 32), "strides": (2, 2), "num_res_units": 1, "patch_size": (16, 16, 16)}


def _image(shape=(1, 20, 24, 18), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _cases(n=3, shape=(20, 24, 20), seed=0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        lab = np.zeros(shape, np.uint8)
        o = rng.integers(1, 4, 3)
        lab[o[0] : o[0] + 8, o[1] : o[1] + 10, o[2] : o[2] + 8] = 1
        lab[o[0] + 8 : o[0] + 12, o[1] : o[1] + 10, o[2] : o[2] + 8] = 2
        img = (lab + rng.normal(0, 0.4, shape)).astype(np.float32)[None]
        out.append({"case_id": f"c{i}", "image": img, "label": lab})
    return out


@pytest.mark.parametrize("arch", ["unet", "dynunet"])
def test_predict_proba_shape_and_normalised(arch):
    seg = MonaiSegmenter(ModelConfig(arch=arch, **TINY), in_channels=1, num_classes=3, device="cpu")
    img = _image()
    p = seg.predict_proba(img)
    assert p.shape == (3, 20, 24, 18) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=0), 1.0, atol=1e-5)
    lab = seg.predict_label(img)
    assert lab.shape == (20, 24, 18) and lab.dtype == np.uint8 and lab.max() < 3


def test_same_seed_same_network_different_seed_differs():
    a = MonaiSegmenter(ModelConfig(**TINY), 1, 3, seed=1, device="cpu").state_dict()
    b = MonaiSegmenter(ModelConfig(**TINY), 1, 3, seed=1, device="cpu").state_dict()
    c = MonaiSegmenter(ModelConfig(**TINY), 1, 3, seed=2, device="cpu").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_save_load_roundtrip_gives_identical_predictions(tmp_path):
    seg = MonaiSegmenter(ModelConfig(arch="dynunet", **TINY), in_channels=2, num_classes=3, seed=3, device="cpu")
    img = _image((2, 18, 22, 20))
    path = seg.save(tmp_path / "m.pt")
    back = MonaiSegmenter.load(path, device="cpu")
    assert (back.in_channels, back.num_classes, back.cfg) == (2, 3, seg.cfg)
    np.testing.assert_array_equal(back.predict_proba(img), seg.predict_proba(img))
    other = MonaiSegmenter(ModelConfig(arch="dynunet", **TINY), 2, 3, seed=9, device="cpu")
    assert not np.array_equal(other.predict_proba(img), seg.predict_proba(img))
    other.load_state_dict({"module." + k: v for k, v in seg.state_dict().items()})  # DDP prefix is stripped
    np.testing.assert_array_equal(other.predict_proba(img), seg.predict_proba(img))


def test_bad_inputs_raise_clear_errors(tmp_path):
    seg = MonaiSegmenter(ModelConfig(**TINY), 1, 3, device="cpu")
    with pytest.raises(ValueError, match=r"image must be \[C=1"):
        seg.predict_proba(np.zeros((2, 8, 8, 8), np.float32))
    with pytest.raises(ValueError, match="weights must be"):
        seg.embed(_image(), weights=np.ones((3, 3, 3)))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        MonaiSegmenter.load(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        MonaiSegmenter.load(tmp_path / "missing.pt")
    bigger = MonaiSegmenter(ModelConfig(**{**TINY, "channels": (8, 16, 64)}), 1, 3, device="cpu")
    with pytest.raises(ValueError, match="do not fit"):
        seg.load_state_dict(bigger.state_dict())


def test_mc_dropout_varies_and_is_seeded():
    seg = MonaiSegmenter(ModelConfig(dropout=0.3, **TINY), 1, 3, device="cpu")
    img = _image()
    state = torch.random.get_rng_state()
    mc = seg.predict_mc(img, n_samples=3, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    assert mc.shape == (3, 3, 20, 24, 18)
    np.testing.assert_allclose(mc.sum(axis=1), 1.0, atol=1e-5)
    assert np.abs(mc[0] - mc[1]).max() > 1e-4
    np.testing.assert_array_equal(mc, seg.predict_mc(img, n_samples=3, seed=5))
    assert not np.array_equal(mc, seg.predict_mc(img, n_samples=3, seed=6))
    # dropout stays off for plain prediction afterwards
    np.testing.assert_array_equal(seg.predict_proba(img), seg.predict_proba(img))
    no_drop = MonaiSegmenter(ModelConfig(dropout=0.0, **TINY), 1, 3, device="cpu")
    with pytest.raises(NotImplementedError, match="dropout"):
        no_drop.predict_mc(img, 2)


def test_tta_first_pass_is_plain_prediction():
    seg = MonaiSegmenter(ModelConfig(**TINY), 1, 3, device="cpu")
    img = _image()
    tta = seg.predict_tta(img)
    assert tta.shape == (4, 3, 20, 24, 18)
    np.testing.assert_allclose(tta[0], seg.predict_proba(img), atol=1e-6)


@pytest.mark.parametrize("arch", ["unet", "dynunet"])
def test_embed_pools_bottleneck_and_weights_matter(arch):
    seg = MonaiSegmenter(ModelConfig(arch=arch, **TINY), 1, 3, device="cpu")
    img = _image()
    e = seg.embed(img)
    assert e.shape == (32,) and e.dtype == np.float32 and np.all(np.isfinite(e))
    np.testing.assert_allclose(seg.embed(img, weights=np.ones(img.shape[1:])), e, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(seg.embed(img, weights=np.zeros(img.shape[1:])), e, rtol=1e-5)  # falls back to mean
    w = np.zeros(img.shape[1:], np.float32)
    w[:8, :8, :8] = 1.0
    assert np.abs(seg.embed(img, weights=w) - e).max() > 1e-4
    assert not np.allclose(seg.embed(_image(seed=1)), e)


def test_model_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.yaml: .*strides must have len"):
        parse_config({"channels": [8, 16, 32], "strides": [2]}, ModelConfig, source="model.yaml")
    with pytest.raises(ConfigError, match="divisible"):
        parse_config({"patch_size": [20, 16, 16]}, ModelConfig)
    with pytest.raises(ConfigError, match="chanels: unknown key"):
        parse_config({"chanels": [8, 16]}, ModelConfig)
    with pytest.raises(ConfigError, match="nnunet.configuration"):
        parse_config({"backend": "nnunet", "nnunet": {"configuration": "4d"}}, ModelConfig)
    with pytest.raises(ConfigError, match="train.yaml: lr"):
        parse_config({"lr": -1}, TrainConfig, source="train.yaml")
    with pytest.raises(ConfigError, match="MonaiSegmenter needs 'monai_unet'"):
        MonaiSegmenter(ModelConfig(backend="nnunet"))


def test_split_validation_deterministic_and_stable():
    cfg = TrainConfig(val_fraction=0.25, seed=0)
    ids = [f"case_{i:02d}" for i in range(12)]
    tr, va, on_train = split_validation(ids, cfg)
    assert not on_train and len(va) == 3 and not set(tr) & set(va) and sorted(tr + va) == sorted(ids)
    assert split_validation(list(reversed(ids)), cfg)[1] == sorted(va, key=list(reversed(ids)).index)
    # adding labels keeps most of the validation set
    _, va2, _ = split_validation(ids + [f"case_{i:02d}" for i in range(12, 16)], cfg)
    assert len(set(va) & set(va2)) >= 2
    assert split_validation(ids[:3], cfg) == (ids[:3], ids[:3], True)
    assert split_validation(ids, TrainConfig(val_ids=["case_01"]))[1] == ["case_01"]
    with pytest.raises(ValueError, match="case_99"):
        split_validation(ids, TrainConfig(val_ids=["case_99"]))
    with pytest.raises(ValueError, match="at least one"):
        split_validation([], cfg)


def test_training_helpers_are_deterministic_and_learn():
    mcfg = ModelConfig(**TINY)
    tcfg = TrainConfig(iterations_per_epoch=4, batch_size=2, lr=5e-3)
    cases = _cases()

    def run():
        seg = MonaiSegmenter(mcfg, 1, 3, seed=0, device="cpu")
        opt = make_optimizer(seg.network.parameters(), tcfg)
        sched = make_scheduler(opt, tcfg, 2 * tcfg.iterations_per_epoch)
        loss_fn = make_loss(3)
        before = validate(seg.network, cases, seg.inferer(), 3, torch.device("cpu"))
        torch.manual_seed(0)
        losses = []
        for epoch in range(2):
            loader = make_train_loader(cases, mcfg, tcfg, seed=epoch)
            stats = train_epoch(seg.network, loader, opt, sched, loss_fn, torch.device("cpu"))
            assert stats["steps"] == 4
            losses.append(stats["loss"])
        after = validate(seg.network, cases, seg.inferer(), 3, torch.device("cpu"))
        return seg.state_dict(), losses, before, after

    a, losses, before, after = run()
    b, losses_b, _, _ = run()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses == losses_b
    assert losses[-1] < losses[0]
    assert after[0].sum() / after[1].sum() > before[0].sum() / before[1].sum()


def test_dice_sums_known_values():
    gt = torch.zeros(4, 4, 4, dtype=torch.long)
    gt[:2] = 1
    pred = torch.zeros_like(gt)
    pred[:1] = 1
    pred[3] = 2  # class 2 predicted but absent from ground truth -> Dice 0, counted
    s, c = dice_sums(pred, gt, 3)
    np.testing.assert_allclose(s, [2 * 16 / (16 + 32), 0.0])
    np.testing.assert_array_equal(c, [1, 1])
    s, c = dice_sums(gt, gt, 4)  # classes 2, 3 absent from both -> skipped
    np.testing.assert_array_equal(c, [1, 0, 0])
    np.testing.assert_allclose(s, [1, 0, 0])
