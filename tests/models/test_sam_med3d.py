"""SAM-Med3D wrapper without Serve: architecture, checkpoints, preprocessing, cached click inference."""

import argparse

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from raylearn.config import ConfigError, parse_config
from raylearn.models import sam_med3d as sm

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def small():
    return sm.SamMed3D(sm.SamMed3DConfig(preset="small", device="cpu"))


def _image(shape=(20, 30, 24), spacing=(1.5, 1.2, 1.0), seed=0) -> sitk.Image:
    """A blob phantom ``[D,H,W]`` with sitk spacing (x, y, z) and a non-trivial origin."""
    z, y, x = np.indices(shape)
    blob = ((z - shape[0] / 2) ** 2 + (y - shape[1] / 2) ** 2 + (x - shape[2] / 2) ** 2) < 36
    arr = 100.0 * blob + np.random.default_rng(seed).normal(10, 3, shape)
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin((-10.0, 5.0, 2.5))
    return img


def test_full_architecture_is_medim_and_matches_our_builder():
    """The full preset is medim's SAM-Med3D (100.5 M params); our class-level builder reproduces it exactly."""
    import medim

    with torch.device("meta"):  # no memory, no weights, no network
        official = medim.create_model("SAM-Med3D", pretrained=False)
        ours = sm.build_from_medim_classes(sm._import_medim(), sm.FULL_ARCH)
    assert sum(p.numel() for p in official.parameters()) == 100_509_232
    a = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert a == b
    assert type(official) is type(ours)


def test_small_variant_same_classes_and_shapes(small):
    from medim.models import sam_med3d as m

    net = small.net
    assert isinstance(net, m.SAM_Med3D) and isinstance(net.image_encoder, m.ImageEncoderViT3D)
    assert isinstance(net.mask_decoder, m.MaskDecoder3D) and isinstance(net.prompt_encoder, m.PromptEncoder3D)
    assert len(net.image_encoder.blocks) == 2 and small.num_parameters < 1_000_000
    emb = small.encode(np.zeros((2, 32, 32, 32), np.float32))
    assert emb.shape == (2, 48, 4, 4, 4)
    low = small.decode(emb, [np.array([[16, 16, 16]]), np.array([[4, 4, 4], [20, 20, 20]])],
                       [np.array([1]), np.array([1, 0])], [None, np.zeros((16, 16, 16))])
    assert low.shape == (2, 16, 16, 16) and np.isfinite(low).all()


def test_config_validation_names_the_problem():
    with pytest.raises(ConfigError, match="prompt_embed_dim"):
        parse_config({"preset": "small", "prompt_embed_dim": 50}, sm.SamMed3DConfig, source="m.yaml")
    with pytest.raises(ConfigError, match="m.yaml: presett: unknown key"):
        parse_config({"presett": "small"}, sm.SamMed3DConfig, source="m.yaml")
    assert sm.SamMed3DConfig().arch() == sm.FULL_ARCH and sm.SamMed3DConfig().low_res_size == 32


def test_checkpoint_round_trip_strict(tmp_path, small):
    path = sm.save_checkpoint(small.net, tmp_path / "sam.pth", small.cfg)
    other = sm.SamMed3D(sm.SamMed3DConfig(preset="small", device="cpu", init_seed=1))
    w = np.random.default_rng(0).normal(size=(1, 32, 32, 32)).astype(np.float32)
    assert not np.allclose(other.encode(w), small.encode(w))
    sm.load_checkpoint(other.net, path)
    for k, v in small.net.state_dict().items():
        assert torch.equal(v, other.net.state_dict()[k]), k
    np.testing.assert_array_equal(other.encode(w), small.encode(w))
    # an official-style checkpoint: model_state_dict + optimizer + pickled args, "module." prefixes
    official = {"model_state_dict": {f"module.{k}": v for k, v in small.net.state_dict().items()},
                "optimizer_state_dict": {}, "args": argparse.Namespace(lr=1e-4)}
    torch.save(official, tmp_path / "official.pth")
    loaded = sm.SamMed3D(sm.SamMed3DConfig(preset="small", device="cpu", init_seed=2,
                                           checkpoint=str(tmp_path / "official.pth")))
    np.testing.assert_array_equal(loaded.encode(w), small.encode(w))
    assert loaded.checkpoint_sha256 == sm.file_sha256(tmp_path / "official.pth")
    # a plain state dict loads too
    torch.save(small.net.state_dict(), tmp_path / "plain.pth")
    sm.load_checkpoint(other.net, tmp_path / "plain.pth")


def test_checkpoint_errors_name_file_and_keys(tmp_path, small):
    with pytest.raises(sm.CheckpointError, match="not found"):
        sm.load_checkpoint(small.net, tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(sm.CheckpointError, match="junk.pth: not a readable"):
        sm.load_checkpoint(small.net, tmp_path / "junk.pth")
    bigger = sm.build_sam_med3d(sm.SamMed3DConfig(preset="small", encoder_depth=3))
    torch.save({"model_state_dict": bigger.state_dict()}, tmp_path / "deeper.pth")
    with pytest.raises(sm.CheckpointError, match="unexpected keys.*image_encoder.blocks.2"):
        sm.load_checkpoint(small.net, tmp_path / "deeper.pth")
    wider = sm.build_sam_med3d(sm.SamMed3DConfig(preset="small", prompt_embed_dim=96))
    torch.save(wider.state_dict(), tmp_path / "wider.pth")
    with pytest.raises(sm.CheckpointError, match="shape mismatches"):
        sm.load_checkpoint(small.net, tmp_path / "wider.pth")


@pytest.mark.slow
def test_full_model_checkpoint_round_trip(tmp_path):
    """The 100.5 M-parameter model itself: build, save, load strictly into a differently seeded copy."""
    cfg = sm.SamMed3DConfig(device="cpu")
    a = sm.build_sam_med3d(cfg)
    sm.save_checkpoint(a, tmp_path / "full.pth", cfg)
    b = sm.build_sam_med3d(sm.SamMed3DConfig(device="cpu", init_seed=1))
    sm.load_checkpoint(b, tmp_path / "full.pth")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_prepare_volume_and_click_coordinates():
    img = _image()
    vol = sm.prepare_volume(img, 1.5)
    assert vol.resampled.GetSpacing() == (1.5, 1.5, 1.5)
    assert vol.array.shape == (13, 24, 24)  # round(n * spacing / 1.5) per axis; array order, spacing (x, y, z)
    assert vol.shape == (20, 30, 24)
    voxel = sm.Click(1, voxel=(10.0, 15.0, 12.0))
    world = sm.Click(1, world=img.TransformContinuousIndexToPhysicalPoint((12.0, 15.0, 10.0)))
    np.testing.assert_allclose(vol.click_index(voxel), vol.click_index(world), atol=1e-6)
    np.testing.assert_allclose(vol.click_index(voxel), [10 / 1.5, 15 * 1.2 / 1.5, 12.0], atol=1e-5)
    with pytest.raises(sm.ClickError, match="outside the volume"):
        vol.click_index(sm.Click(1, voxel=(25, 0, 0)))
    with pytest.raises(sm.ClickError, match="world point"):
        vol.click_index(sm.Click(1, world=(1000.0, 0.0, 0.0)))
    with pytest.raises(sm.ClickError, match="exactly one"):
        vol.click_index(sm.Click(1))


def test_crop_window_pads_and_zscores_foreground():
    arr = np.zeros((10, 10, 10), np.float32)
    arr[2:8, 2:8, 2:8] = np.random.default_rng(0).normal(50, 5, (6, 6, 6))
    win = sm.crop_window(arr, (-3, -3, -3), 16)
    assert win.shape == (16, 16, 16)
    fg = win[5:11, 5:11, 5:11]
    assert abs(fg.mean()) < 1e-4 and abs(fg.std() - 1) < 1e-3
    assert np.allclose(win[0], win[0, 0, 0])  # padding = one constant value


def test_window_probability_maps_back_to_original_grid():
    vol = sm.prepare_volume(_image(), 1.5)
    prob = np.zeros((32, 32, 32), np.float32)
    start = sm.window_start(vol, None, 32)
    prob[:, :, :] = 1.0
    back = sm.window_probability_to_original(vol, start, prob)
    assert back.shape == vol.shape and back.min() > 0.99  # the window covers the whole volume


def test_segment_caches_embedding_and_refines(small):
    vol = sm.prepare_volume(_image(), 1.5)
    small.cache = sm.EmbeddingCache()
    enc0, dec0 = small.encoder_calls, small.decoder_calls
    clicks = [sm.Click(1, voxel=(10, 15, 12)), sm.Click(2, voxel=(3, 5, 4)), sm.Click(2, False, voxel=(16, 25, 20))]
    first = small.segment(vol, clicks)
    assert first.label_map.shape == vol.shape and first.label_map.dtype == np.uint8
    assert set(first.low_res) == {1, 2} and first.low_res[1].shape == (16, 16, 16)
    again = small.segment(vol, clicks, prev_low_res=first.low_res)
    assert small.encoder_calls - enc0 == 1  # one window shared by both classes, cached across calls
    assert small.decoder_calls - dec0 == 4  # one decoder pass per class per call
    assert not np.array_equal(again.low_res[1], first.low_res[1])  # the previous mask is an input
    with pytest.raises(sm.ClickError, match="empty"):
        small.segment(vol, [])


def test_combine_class_probabilities():
    p1 = np.array([[[0.9, 0.6, 0.2]]], np.float32)
    p2 = np.array([[[0.1, 0.7, 0.4]]], np.float32)
    np.testing.assert_array_equal(sm.combine_class_probabilities({1: p1, 2: p2}), [[[1, 2, 0]]])
