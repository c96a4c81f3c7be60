"""The SBC U-Net (raylearn.models.sbc): output shapes, the decoder hook, the joint loss and a loss decrease on a
tiny synthetic batch, predict_heads, checkpoints, and the feature / config errors without the heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raylearn.models import training as T
from raylearn.models.config import ModelConfig
from raylearn.models.sbc import SBCLoss, SBCUNet, distance_targets
from raylearn.models.unet import MonaiSegmenter
from raylearn.scoring.sbc import signed_distance_map

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is fastest (and fair to a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_cfg(**over) -> ModelConfig:
    base = {"arch": "sbc_unet", "channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 1,
            "patch_size": (16, 16, 16), "dropout": 0.0}
    return ModelConfig(**{**base, **over})


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(2, 1, 16, 16, 16, dtype=torch.long)
    y[:, :, 4:10, 4:10, 4:10] = 1
    y[1, :, 10:14, 3:7, 3:7] = 2
    return y.float() + 0.3 * torch.randn(y.shape, generator=g), y


def test_output_shapes_train_and_eval():
    seg = MonaiSegmenter(tiny_cfg(), in_channels=1, num_classes=3, device=CPU)
    net = seg.network
    assert isinstance(net, SBCUNet)
    x, _ = batch()
    net.train()
    coarse, sfp, refined = net(x)
    assert coarse.shape == refined.shape == (2, 3, 16, 16, 16) and sfp.shape == (2, 2, 16, 16, 16)
    assert sfp.abs().max() <= 1.0  # tanh: the normalised signed distance range
    net.eval()
    with torch.no_grad():
        out = net(x)
        np.testing.assert_allclose(out.numpy(), net(x, heads=True)[2].numpy(), atol=1e-6)  # refined by default
        coarse_cfg = MonaiSegmenter(tiny_cfg(sbc={"output": "coarse"}), 1, 3, device=CPU).network.eval()
        c = coarse_cfg(x)
        np.testing.assert_allclose(c.numpy(), coarse_cfg.unet(x).numpy(), atol=1e-6)  # the plain U-Net's logits


def test_heads_read_the_unet_decoder_features():
    net = MonaiSegmenter(tiny_cfg(), 1, 3, device=CPU).network.train()
    x, _ = batch()
    seen = {}
    net.sfp.register_forward_hook(lambda m, inp, out: seen.update(sfp_in=inp[0]))  # returns None: output kept
    net(x)
    # the top decoder block's input: 2 * channels[0] = 8 channels, upsampled to the input size
    assert seen["sfp_in"].shape == (2, 8, 16, 16, 16)
    # a 2-level net: channels[0] + channels[1] decoder channels
    two = MonaiSegmenter(tiny_cfg(channels=(4, 8), strides=(2,), num_res_units=0), 1, 2, device=CPU).network.train()
    assert [o.shape[1] for o in two(x)] == [2, 1, 2]


def test_distance_targets_match_the_scoring_transform():
    _, y = batch()
    t = distance_targets(y, 3)
    assert t.shape == (2, 2, 16, 16, 16) and t.dtype == torch.float32
    np.testing.assert_allclose(t[1, 1].numpy(), signed_distance_map(y[1, 0].numpy() == 2))
    np.testing.assert_array_equal(t[0, 1].numpy(), 1.0)  # class 2 absent in sample 0: all outside


def test_joint_loss_weights():
    torch.manual_seed(0)
    x, y = batch()
    net = MonaiSegmenter(tiny_cfg(), 1, 3, device=CPU).network.train()
    out = net(x)
    only_sfp = SBCLoss(alpha=0, beta=1, gamma=0)(out, y)
    expected = torch.nn.functional.mse_loss(out[1], distance_targets(y, 3))
    assert float(only_sfp.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    full = SBCLoss(alpha=1, beta=2, gamma=3)
    total = float(full(out, y).detach())
    assert total == pytest.approx(full.last["seg"] + 2 * full.last["sfp"] + 3 * full.last["asr"], rel=1e-5)
    assert isinstance(T.make_loss(tiny_cfg(sbc={"alpha": 0.5})), SBCLoss)
    assert not isinstance(T.make_loss(tiny_cfg(arch="unet")), SBCLoss)


def test_loss_decreases_on_a_tiny_batch():
    x, y = batch()
    cfg = tiny_cfg()
    seg = MonaiSegmenter(cfg, 1, 3, seed=0, device=CPU)
    loss_fn = T.make_loss(cfg)
    opt = torch.optim.Adam(seg.network.parameters(), lr=1e-2)
    losses, parts = [], []
    for _ in range(10):
        losses.append(T.train_step(seg.network, x, y, opt, None, loss_fn, CPU))
        parts.append(dict(loss_fn.last))
    assert losses[-1] < 0.7 * losses[0]
    for term in ("seg", "sfp", "asr"):  # every head learns, not only the sum
        assert parts[-1][term] < parts[0][term], (term, parts[0], parts[-1])


def test_predict_heads_checkpoint_and_features(tmp_path):
    from raylearn.scoring.features import compute_features

    seg = MonaiSegmenter(tiny_cfg(patch_size="auto"), 1, 3, seed=1, device=CPU)
    img = np.random.default_rng(0).random((1, 15, 17, 16)).astype(np.float32)
    coarse, sfp, refined = seg.predict_heads(img)
    assert coarse.shape == refined.shape == (3, 15, 17, 16) and sfp.shape == (2, 15, 17, 16)
    np.testing.assert_allclose(coarse.sum(0), 1.0, atol=1e-5)
    np.testing.assert_allclose(seg.predict_proba(img), refined, atol=1e-5)
    assert seg.embed(img).shape == (16,)  # the bottleneck of the wrapped U-Net
    back = MonaiSegmenter.load(seg.save(tmp_path / "sbc.pt"))
    np.testing.assert_allclose(back.predict_heads(img)[1], sfp, atol=1e-6)
    feats = compute_features(seg, img, ["sbc_consistency"])
    assert feats["sbc_consistency"].shape == (3,) and np.isfinite(feats["sbc_consistency"]).all()
    plain = MonaiSegmenter(tiny_cfg(arch="unet", patch_size="auto"), 1, 3, device=CPU)
    with pytest.raises(NotImplementedError, match=r"sbc_consistency.*sbc_unet"):
        compute_features(plain, img, ["sbc_consistency"])


def test_sbc_strategy_needs_the_heads_in_the_experiment_config():
    from raylearn.config import parse_config
    from raylearn.experiment import ExperimentConfig

    ok = parse_config({"strategy": {"name": "sbc"}, "model": {"arch": "sbc_unet"}}, ExperimentConfig, source="t")
    assert ok.model.sbc.alpha == 1.0
    for model in ({"arch": "unet"}, {"arch": "dynunet"}, {"backend": "nnunet", "arch": "sbc_unet"}):
        with pytest.raises(Exception, match=r"strategy.name: 'sbc' needs a model with SBC-AL's SFP and ASR heads"):
            parse_config({"strategy": {"name": "sbc"}, "model": model}, ExperimentConfig, source="t")
    with pytest.raises(Exception, match="model.sbc"):
        parse_config({"model": {"arch": "sbc_unet", "sbc": {"alpha": 0, "gamma": 0}}}, ExperimentConfig, source="t")
    with pytest.raises(Exception, match="w_boundary"):
        parse_config({"strategy": {"name": "sbc", "params": {"w_boundary": -1}}, "model": {"arch": "sbc_unet"}},
                     ExperimentConfig, source="t")


def test_a_copy_hooks_its_own_decoder():
    """EMA (AveragedModel) deep-copies the network: the copy's heads must read the copy's decoder features."""
    net = MonaiSegmenter(tiny_cfg(channels=(4, 8), strides=(2,), num_res_units=0), 1, 2, device=CPU).network
    ema = T.make_ema(net, 0.9)
    x, _ = batch()
    with torch.no_grad():
        assert ema.module.eval()(x).shape == (2, 2, 16, 16, 16)
    assert net._feats is None and ema.module._feats is None  # consumed by the forward that captured them


def test_half_resolution_heads():
    """head_resolution: half runs both heads on the decoder's own grid and upsamples their outputs."""
    net = MonaiSegmenter(tiny_cfg(sbc={"head_resolution": "half"}), 1, 3, device=CPU).network.train()
    seen = {}
    net.sfp.register_forward_hook(lambda m, inp, out: seen.update(sfp_in=inp[0]))  # returns None: output kept
    x, _ = batch()
    coarse, sfp, refined = net(x)
    assert seen["sfp_in"].shape == (2, 8, 8, 8, 8)  # strides[0] = 2: half of 16 per axis
    assert coarse.shape == refined.shape == (2, 3, 16, 16, 16) and sfp.shape == (2, 2, 16, 16, 16)
    assert sfp.abs().max() <= 1.0
    with pytest.raises(Exception, match="head_resolution"):
        tiny_cfg(sbc={"head_resolution": "quarter"})
