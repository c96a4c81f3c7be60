"""compute_features with a small deterministic Segmenter: exact keys, fewest model calls, right values."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from raylearn.config import ConfigError, parse_config
from raylearn.models.base import Segmenter
from raylearn.scoring import entropy, least_confidence, reduce_map
from raylearn.scoring.features import FEATURES, FeatureParams, compute_features, model_calls_for


class ToySegmenter(Segmenter):
    """probs = softmax(image * (k - 1) * sharpness) over K=3 classes; counts top-level calls."""

    num_classes = 3
    in_channels = 1

    def __init__(self, sharpness: float = 2.0):
        self.sharpness = sharpness
        self.calls: Counter[str] = Counter()
        self._busy = False

    def _count(self, name):
        if not self._busy:
            self.calls[name] += 1

    def _probs(self, image):
        logits = np.stack([image[0] * (k - 1) * self.sharpness for k in range(self.num_classes)])
        e = np.exp(logits - logits.max(axis=0))
        return (e / e.sum(axis=0)).astype(np.float32)

    def predict_proba(self, image):
        self._count("predict_proba")
        return self._probs(image)

    def predict_mc(self, image, n_samples, seed=0):
        self._count("predict_mc")
        rng = np.random.default_rng(seed)
        return np.stack([self._probs(image + rng.normal(0, 0.5, image.shape)) for _ in range(n_samples)])

    def predict_tta(self, image, flips=None):
        self._count("predict_tta")
        self._busy = True
        try:
            return super().predict_tta(image, flips)
        finally:
            self._busy = False

    def predict_heads(self, image):
        """SBC-AL's three outputs: coarse = the probabilities, SFP = a map in [-1, 1] per foreground class,
        refined = a sharper softmax (so the two masks differ somewhat)."""
        self._count("predict_heads")
        coarse = self._probs(image)
        sfp = np.tanh(1.0 - 2.0 * coarse[1:]).astype(np.float32)
        sharp = ToySegmenter(self.sharpness * 3.0)._probs(image)
        return coarse, sfp, sharp

    def embed(self, image, weights=None):
        self._count("embed")
        x = image[0]
        w = np.ones_like(x) if weights is None else weights
        return np.array([(x * w).sum() / w.sum(), (x**2 * w).sum() / w.sum(), x.std()], dtype=np.float32)

    def save(self, path):  # pragma: no cover - not needed here
        raise NotImplementedError

    @classmethod
    def load(cls, path):  # pragma: no cover
        raise NotImplementedError


def make_image(seed=0, shape=(6, 7, 8)):
    return np.random.default_rng(seed).normal(size=(1, *shape)).astype(np.float32)


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_single_feature_exact_key_and_calls(name):
    seg = ToySegmenter()
    out = compute_features(seg, make_image(), [name])
    assert list(out) == [name]
    assert dict(seg.calls) == model_calls_for([name])
    arr = out[name]
    if FEATURES[name].kind == "scalar":
        assert arr.shape == () and arr.dtype == np.float32 and np.isfinite(arr)
    elif "embedding" in name:
        assert arr.shape == (3,) and arr.dtype == np.float16
    elif name == "class_entropy":  # [K]: H, then H * p_c per foreground class
        assert arr.shape == (3,) and arr.dtype == np.float32
    elif name == "sbc_consistency":  # [Q_cos, Q_dice, Hausdorff]
        assert arr.shape == (3,) and arr.dtype == np.float32 and np.isfinite(arr).all()
        assert 0 <= arr[0] <= 2 and 0 <= arr[1] <= 1 and arr[2] >= 0
    else:
        assert arr.shape == (2,) and arr.dtype == np.float32


def test_all_features_share_model_calls():
    seg = ToySegmenter()
    out = compute_features(seg, make_image(), list(FEATURES) + ["entropy"])
    assert set(out) == set(FEATURES)
    # probabilities come from the identity entry of the TTA stack: no separate predict_proba
    assert dict(seg.calls) == {"predict_tta": 1, "predict_mc": 1, "predict_heads": 1, "embed": 2}
    assert dict(seg.calls) == model_calls_for(FEATURES)


def test_prob_features_share_one_predict_proba():
    seg = ToySegmenter()
    names = ["least_confidence", "entropy", "margin", "fg_volume", "weighted_embedding"]
    compute_features(seg, make_image(), names)
    assert dict(seg.calls) == {"predict_proba": 1, "embed": 1}
    seg = ToySegmenter()
    compute_features(seg, make_image(), ["entropy", "mc_entropy", "bald", "mc_variance"])
    assert dict(seg.calls) == {"predict_proba": 1, "predict_mc": 1}


def test_tta_without_identity_needs_predict_proba():
    seg = ToySegmenter()
    params = FeatureParams(tta_flips=[(1,), (2,)])
    compute_features(seg, make_image(), ["tta_variance", "entropy"], params)
    assert dict(seg.calls) == {"predict_tta": 1, "predict_proba": 1}


def test_values_match_the_pure_functions():
    seg, img = ToySegmenter(), make_image(3)
    probs = seg._probs(img)
    labels = probs.argmax(axis=0)
    params = FeatureParams(reduction="topk_mean", topk=0.1)
    out = compute_features(seg, img, ["least_confidence", "entropy", "fg_volume", "weighted_embedding"], params)
    assert out["least_confidence"] == pytest.approx(reduce_map(least_confidence(probs), "topk_mean", topk=0.1))
    assert out["entropy"] == pytest.approx(reduce_map(entropy(probs), "topk_mean", topk=0.1))
    np.testing.assert_array_equal(out["fg_volume"], [(labels == 1).sum(), (labels == 2).sum()])
    expected = seg.embed(img, weights=entropy(probs)).astype(np.float16)
    np.testing.assert_array_equal(out["weighted_embedding"], expected)


def test_mc_is_deterministic_for_a_seed():
    img = make_image()
    a = compute_features(ToySegmenter(), img, ["bald"], FeatureParams(seed=1))
    b = compute_features(ToySegmenter(), img, ["bald"], FeatureParams(seed=1))
    c = compute_features(ToySegmenter(), img, ["bald"], FeatureParams(seed=2))
    assert a["bald"] == b["bald"] and a["bald"] != c["bald"]


def test_entropy_ranks_less_confident_model_higher():
    img = make_image()
    sharp = compute_features(ToySegmenter(sharpness=8.0), img, ["entropy", "least_confidence", "margin"])
    blunt = compute_features(ToySegmenter(sharpness=0.5), img, ["entropy", "least_confidence", "margin"])
    for name in sharp:
        assert blunt[name] > sharp[name], name


def test_errors():
    seg = ToySegmenter()
    with pytest.raises(ValueError, match=r"unknown feature.*known: bald"):
        compute_features(seg, make_image(), ["entropy", "nope"])
    with pytest.raises(ValueError, match=r"\[C, D, H, W\]"):
        compute_features(seg, make_image()[0], ["entropy"])
    with pytest.raises(ValueError, match="channels"):
        compute_features(seg, np.zeros((2, 4, 4, 4), np.float32), ["entropy"])

    class NoDropout(ToySegmenter):
        def predict_mc(self, image, n_samples, seed=0):
            return Segmenter.predict_mc(self, image, n_samples, seed)

    with pytest.raises(NotImplementedError, match=r"\['bald', 'mc_entropy'\] need NoDropout.predict_mc"):
        compute_features(NoDropout(), make_image(), ["bald", "mc_entropy", "entropy"])

    class Broken(ToySegmenter):
        def predict_proba(self, image):
            return super().predict_proba(image)[:2]

    with pytest.raises(ValueError, match="predict_proba returned shape"):
        compute_features(Broken(), make_image(), ["entropy"])


def test_feature_params_validation():
    with pytest.raises(ConfigError, match="tta_flips"):
        parse_config({"tta_flips": [[0], [1]]}, FeatureParams, "exp.yaml")
    with pytest.raises(ConfigError, match="exp.yaml: reductoin: unknown key"):
        parse_config({"reductoin": "mean"}, FeatureParams, "exp.yaml")
    with pytest.raises(ConfigError, match="mc_samples"):
        parse_config({"mc_samples": 1}, FeatureParams, "exp.yaml")
    p = parse_config({"tta_flips": [[], [1, 2]], "reduction": "foreground"}, FeatureParams, "exp.yaml")
    assert p.tta_flips == [(), (1, 2)]


def test_every_feature_with_a_tiny_monai_segmenter():
    """The real MONAI backend: every feature, right shapes, dtypes and ranges (16^3 image, tiny UNet)."""
    import torch

    from raylearn.models.config import ModelConfig
    from raylearn.models.unet import MonaiSegmenter

    torch.set_num_threads(2)
    cfg = ModelConfig(channels=(4, 8), strides=(2,), num_res_units=0, dropout=0.3, patch_size=(16, 16, 16))
    seg = MonaiSegmenter(cfg, in_channels=1, num_classes=3, seed=0, device="cpu")
    img = make_image(0, (16, 16, 16))
    params = FeatureParams(mc_samples=3, tta_flips=[(), (3,)])
    plain = [f for f in FEATURES if f != "sbc_consistency"]  # SBC-AL's heads: tests/models/test_sbc.py
    with pytest.raises(NotImplementedError, match=r"sbc_consistency.*model.arch: sbc_unet"):
        compute_features(seg, img, ["sbc_consistency"], params)
    out = compute_features(seg, img, plain, params)
    assert set(out) == set(plain)
    assert out["embedding"].shape == (8,) and out["embedding"].dtype == np.float16
    assert out["weighted_embedding"].shape == (8,)
    assert out["fg_volume"].shape == (2,) and out["fg_volume"].sum() <= 16**3
    assert 0 <= out["least_confidence"] <= 2 / 3 and 0 <= out["entropy"] <= np.log(3) + 1e-6
    assert out["bald"] >= 0 and out["mc_variance"] > 0  # dropout 0.3 makes samples differ
    again = compute_features(seg, img, ["bald", "entropy"], params)
    assert again["bald"] == out["bald"] and again["entropy"] == out["entropy"]
