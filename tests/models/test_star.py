"""STAR's propagation network (raylearn/models/star.py) and its training (star_train.py): shapes, key/value sizes,
group-masked attention, entropy, similarity, a tiny overfit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raylearn.models.star import StarNet, build_star_net, cosine_to_memory, memory_read, pad_slices, slice_entropy
from raylearn.models.star_train import StarTrainParams, train_stage1, train_stage2


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions run faster on one thread (and do not fight the other processes on a 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def onehot(y: torch.Tensor, k: int) -> torch.Tensor:
    return F.one_hot(y, k).permute(0, 3, 1, 2)


def test_small_backbone_shapes_and_key_value_sizes():
    net = build_star_net(3, in_channels=2, width=4)
    assert (net.feature_dim, net.key_dim, net.value_dim, net.stride) == (32, 4, 16, 8)
    x = torch.randn(5, 2, 16, 24)
    assert net.segment(x).shape == (5, 3, 16, 24)
    keys, values = net.memorize(x[:2], onehot(torch.randint(0, 3, (2, 16, 24)), 3))
    assert keys.shape == (2, 4, 2, 3) and values.shape == (2, 16, 2, 3)
    allowed = torch.tensor([[True, False], [False, True], [True, True], [True, False], [False, True]])
    assert net.propagate(x, keys, values, allowed).shape == (5, 3, 16, 24)
    # r4 (32) + r3 (16) + r2 (8) channels on r2's grid (1/2)
    assert net.features(x).shape == (5, 56, 8, 12)


def test_resnet50_is_the_papers_cut_with_key_d8_value_d2():
    net = StarNet(num_classes=2, backbone="resnet50", decoder_dim=8)
    assert (net.feature_dim, net.key_dim, net.value_dim, net.stride) == (1024, 128, 512, 16)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        keys, values = net.memorize(x, onehot(torch.zeros(1, 32, 32, dtype=torch.long), 2))
        assert keys.shape == (1, 128, 2, 2) and values.shape == (1, 512, 2, 2)
        assert net.propagate(x, keys, values).shape == (1, 2, 32, 32)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"backbone": "vit"}, "backbone"), ({"num_classes": 1}, "num_classes"), ({"width": 0}, "width")],
)
def test_bad_network_settings_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StarNet(**kwargs)


def test_wrong_input_shapes_are_refused():
    net = build_star_net(2, width=2)
    with pytest.raises(ValueError, match="multiples of 8"):
        net.segment(torch.randn(1, 1, 12, 16))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        net.segment(torch.randn(1, 3, 16, 16))


def test_memory_read_hand_computed():
    # one query position, two memory slices of one position each; Kd = 1, Vd = 1
    q = torch.tensor([[[[2.0]]]])
    mk = torch.tensor([[[[0.0]]], [[[math.log(3.0) / 2.0]]]])  # logits 0 and log 3 -> weights 1/4, 3/4
    mv = torch.tensor([[[[4.0]]], [[[8.0]]]])
    assert memory_read(q, mk, mv).item() == pytest.approx(0.25 * 4 + 0.75 * 8)
    # masked to memory slice 0 only: its value exactly
    assert memory_read(q, mk, mv, torch.tensor([[True, False]])).item() == pytest.approx(4.0)


def test_attention_sees_only_the_groups_labelled_slices():
    torch.manual_seed(0)
    net = build_star_net(2, width=4).eval()
    x = torch.randn(3, 1, 16, 16)  # memory slices 0, 1, 2
    y = torch.randint(0, 2, (3, 16, 16))
    q = torch.randn(2, 1, 16, 16)
    allowed = torch.tensor([[True, False, False], [False, True, True]])
    with torch.no_grad():
        keys, values = net.memorize(x, onehot(y, 2))
        out = net.propagate(q, keys, values, allowed)
        # change memory slice 0 (visible to query 0 only): query 1 is unchanged, query 0 changes
        x2, y2 = x.clone(), y.clone()
        x2[0], y2[0] = torch.randn(1, 16, 16), 1 - y[0]
        keys2, values2 = net.memorize(x2, onehot(y2, 2))
        out2 = net.propagate(q, keys2, values2, allowed)
    torch.testing.assert_close(out2[1], out[1])
    assert not torch.allclose(out2[0], out[0])
    # the masked read equals attending to the allowed subset alone
    with torch.no_grad():
        r4 = net.enc_u(q)[0]
        qk = net.kv_u["key"](r4)
        full = memory_read(qk, keys, values, allowed)
        alone = memory_read(qk[1:], keys[1:], values[1:])
    torch.testing.assert_close(full[1:], alone)


def test_memory_read_refuses_bad_masks():
    q, mk, mv = torch.randn(2, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.randn(3, 8, 2, 2)
    with pytest.raises(ValueError, match="allowed must be bool"):
        memory_read(q, mk, mv, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="no memory slice"):
        memory_read(q, mk, mv, torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match="do not match"):
        memory_read(q, torch.randn(3, 5, 2, 2), mv)


def test_slice_entropy_uniform_and_certain():
    uniform = torch.full((1, 4, 3, 3), 0.25)
    certain = F.one_hot(torch.zeros(1, 3, 3, dtype=torch.long), 4).permute(0, 3, 1, 2).float()
    ent = slice_entropy(torch.cat([uniform, certain]))
    assert ent[0].item() == pytest.approx(math.log(4)) and ent[1].item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"\[U, K, H, W\]"):
        slice_entropy(torch.ones(4, 3, 3))


def test_cosine_to_memory_hand_computed():
    a = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    mem = torch.stack([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([-1.0, 0.0])]).view(3, 2, 1, 1)
    assert cosine_to_memory(a, mem).item() == pytest.approx(0.0)  # (1 + 0 - 1) / 3
    assert cosine_to_memory(a, mem, torch.tensor([[True, True, False]])).item() == pytest.approx(0.5)
    assert cosine_to_memory(a, mem, torch.tensor([[False, False, True]])).item() == pytest.approx(-1.0)


def test_pad_slices_to_the_stride():
    assert pad_slices(np.ones((2, 1, 13, 16)), 8).shape == (2, 1, 16, 16)
    assert pad_slices(np.ones((5, 9)), 4).shape == (8, 12)


def test_train_params_are_validated():
    with pytest.raises(ValueError, match="lr2"):
        StarTrainParams(lr2=0)
    with pytest.raises(ValueError, match="stage1_steps"):
        StarTrainParams(stage1_steps=-1)


def test_init_label_encoder_copies_the_image_encoder():
    net = build_star_net(3, width=2)
    net.init_label_encoder()
    su, sl = net.enc_u.state_dict(), net.enc_l.state_dict()
    first = "stem.0.weight"
    torch.testing.assert_close(sl[first][:, :1], su[first])
    for k in su:
        if k != first:
            torch.testing.assert_close(sl[k], su[k])


def test_stage1_lowers_the_focal_loss():
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(1, 16, 16)).astype(np.float32) for _ in range(3)]
    labels = [(im[0] > 0.5).astype(np.int64) for im in images]
    net = build_star_net(2, width=4)
    first = train_stage1(net, images, labels, StarTrainParams(stage1_steps=1, lr1=3e-3), np.random.default_rng(1))
    later = train_stage1(net, images, labels, StarTrainParams(stage1_steps=30, lr1=3e-3), np.random.default_rng(1))
    assert later < first


def test_tiny_overfit_copies_the_label_across_slices():
    """Every slice shows the same image, so only the memory slice's label can tell the query's label: after stage 2
    the network reproduces four different label layouts from the memory."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    texture = rng.normal(size=(1, 16, 16)).astype(np.float32)
    layouts = [np.array([[1, 0], [0, 1]]), np.array([[0, 1], [1, 0]]), np.array([[1, 1], [0, 0]]),
               np.array([[0, 0], [1, 1]])]
    labels = [np.kron(p, np.ones((8, 8))).astype(np.int64) for p in layouts for _ in range(2)]
    images = [texture.copy() for _ in labels]
    pairs = [(2 * k, 2 * k + 1) for k in range(4)]
    net = build_star_net(2, width=4)
    params = StarTrainParams(stage2_steps=50, lr2=3e-3, batch_size=4, reinit_label_encoder=False)
    train_stage2(net, images, labels, pairs, params, rng)
    net.eval()
    x = torch.from_numpy(texture[None])
    with torch.no_grad():
        for k in range(4):
            y = torch.from_numpy(labels[2 * k][None])
            keys, values = net.memorize(x, onehot(y, 2))
            pred = net.propagate(x, keys, values).argmax(1)[0].numpy()
            assert (pred == labels[2 * k]).mean() > 0.9, f"layout {k} not copied"
