"""MonaiSegmenter contract, checkpoints, MC dropout, embeddings, and the pure training helpers (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raylearn.config import ConfigError, parse_config
from raylearn.models.config import ModelConfig, TrainConfig
from raylearn.models.training import (
    CaseCache,
    batch_indices,
    make_loss,
    make_optimizer,
    make_scheduler,
    sample_batch,
    split_validation,
    train_step,
    train_transforms,
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
    # trained without dropout, the network still samples at model.mc_dropout, and keeps p = 0 for training
    no_drop = MonaiSegmenter(ModelConfig(dropout=0.0, mc_dropout=0.2, **TINY), 1, 3, device="cpu")
    mc0 = no_drop.predict_mc(img, 2)
    assert np.abs(mc0[0] - mc0[1]).max() > 1e-4
    assert all(m.p == 0.0 for m in no_drop.network.modules() if isinstance(m, torch.nn.Dropout3d | torch.nn.Dropout))
    dyn = MonaiSegmenter(ModelConfig(arch="dynunet", dropout=0.0, **TINY), 1, 3, device="cpu")
    if not any(isinstance(m, torch.nn.modules.dropout._DropoutNd) for m in dyn.network.modules()):
        with pytest.raises(NotImplementedError, match="dropout"):
            dyn.predict_mc(img, 2)


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
    tr, va = split_validation(ids, cfg)
    assert len(va) == 3 and not set(tr) & set(va) and sorted(tr + va) == sorted(ids)
    assert split_validation(list(reversed(ids)), cfg)[1] == sorted(va, key=list(reversed(ids)).index)
    # adding labels keeps most of the validation set
    _, va2 = split_validation(ids + [f"case_{i:02d}" for i in range(12, 16)], cfg)
    assert len(set(va) & set(va2)) >= 2
    assert split_validation(ids[:3], cfg) == (ids[:3], [])  # too few to hold any out
    assert split_validation(ids, TrainConfig()) == (ids, [])  # by default every labelled case trains
    assert split_validation(ids, TrainConfig(val_ids=["case_01"]))[1] == ["case_01"]
    with pytest.raises(ValueError, match="case_99"):
        split_validation(ids, TrainConfig(val_ids=["case_99"]))
    with pytest.raises(ValueError, match="at least one"):
        split_validation([], cfg)


def test_batches_are_shuffled_passes_computable_from_the_step():
    seen = [i for step in range(6) for i in batch_indices(5, 2, step, [1, 2, 3])]
    assert sorted(seen[:5]) == list(range(5)) and sorted(seen[5:10]) == list(range(5))  # each pass covers all
    assert batch_indices(5, 2, 4, [1, 2, 3]) == seen[8:10]  # a resumed run draws the same batch at step 4
    assert batch_indices(5, 2, 4, [1, 2, 4]) != seen[8:10] or batch_indices(5, 2, 3, [1, 2, 4]) != seen[6:8]


def test_schedule_warms_up_then_follows_the_run_budget():
    net = torch.nn.Linear(2, 2)
    for kind, last in (("constant", 1e-2), ("cosine", 1e-2 * 0.05), ("poly", 0.0)):
        cfg = TrainConfig(lr=1e-2, schedule=kind, warmup_steps=4, min_lr_ratio=0.05)
        opt = make_optimizer(net.parameters(), cfg)
        sched = make_scheduler(opt, cfg, total_steps=20)
        lrs = []
        for _ in range(20):
            opt.step()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        assert lrs[0] < lrs[2] < lrs[3] == pytest.approx(1e-2)  # linear warm-up, once for the whole run
        assert lrs[-1] == pytest.approx(last, abs=1e-6)


def test_training_helpers_are_deterministic_and_learn():
    mcfg = ModelConfig(**{**TINY, "patch_size": (16, 16, 16)})
    tcfg = TrainConfig(batch_size=2, lr=5e-3, augment={"flip_axes": [2]})
    cases = _cases()
    by_id = {c["case_id"]: c for c in cases}

    def run(steps):
        seg = MonaiSegmenter(mcfg, 1, 3, seed=0, device="cpu")
        opt = make_optimizer(seg.network.parameters(), tcfg)
        sched = make_scheduler(opt, tcfg, steps)
        cache = CaseCache(mcfg.patch_size, lambda cid: (by_id[cid]["image"], by_id[cid]["label"]))
        assert cache.ensure(list(by_id)) == 3 and cache.ensure(["c0"]) == 0
        transform = train_transforms(mcfg, tcfg, crop=not cache.whole_volume())
        before = validate(seg, cases, 3)
        losses = [train_step(seg.network, *sample_batch(cache, list(by_id), transform, 2, s, [0, 0, 0]), opt, sched,
                             make_loss(), torch.device("cpu")) for s in range(steps)]
        return seg.state_dict(), losses, before, validate(seg, cases, 3)

    a, losses, before, after = run(12)
    b, losses_b, _, _ = run(12)
    assert all(torch.equal(a[k], b[k]) for k in a) and losses == losses_b
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert after[0].sum() / after[1].sum() > before[0].sum() / before[1].sum()


def test_cache_pads_to_the_patch_and_whole_volumes_skip_cropping():
    cases = _cases(n=2, shape=(20, 24, 20))
    cache = CaseCache((24, 24, 24), lambda cid: (cases[int(cid[1])]["image"], cases[int(cid[1])]["label"]))
    cache.ensure(["c0", "c1"])
    assert cache.whole_volume() and tuple(cache.get("c0")["image"].shape) == (1, 24, 24, 24)
    # centred zero padding keeps the labels
    assert int(cache.get("c0")["label"].sum()) == int(cases[0]["label"].sum())
    small = CaseCache((16, 16, 16), lambda cid: (cases[0]["image"], cases[0]["label"]))
    small.ensure(["c0"])
    assert not small.whole_volume()
    with pytest.raises(ValueError, match="same grid"):
        CaseCache((16, 16, 16), lambda cid: (cases[0]["image"], cases[0]["label"][:-1])).ensure(["x"])
