"""Experiment and sweep YAML validation: every bad key or value is one clear line naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raylearn.config import ConfigError, load_config
from raylearn.experiment import ExperimentConfig, apply_overrides, load_experiment

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path, data) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "deployments" / "experiments").glob("*.yaml")))
def test_shipped_experiments_validate(name):
    cfg = load_experiment(REPO / "deployments" / "experiments" / name)
    assert isinstance(cfg, ExperimentConfig)


def test_p2p_schedule_is_expressible():
    cfg = load_experiment(REPO / "deployments" / "experiments" / "hippocampus_p2p.yaml")
    assert cfg.cold_start.fraction == pytest.approx(0.05)
    assert (cfg.schedule.rounds, cfg.schedule.batch_size) == (10, 5)


def test_unknown_key_names_file_path_and_allowed(tmp_path):
    p = _write(tmp_path, {"schedule": {"round": 3}})
    with pytest.raises(ConfigError) as e:
        load_experiment(p)
    msg = str(e.value)
    assert str(p) in msg and "schedule.round: unknown key" in msg and "rounds" in msg


def test_bad_value_names_key(tmp_path):
    p = _write(tmp_path, {"schedule": {"batch_size": 0}})
    with pytest.raises(ConfigError, match=r"schedule\.batch_size"):
        load_experiment(p)


def test_unknown_strategy_is_refused_before_running(tmp_path):
    p = _write(tmp_path, {"strategy": {"name": "least_confusion"}})
    with pytest.raises(ConfigError, match="least_confusion"):
        load_experiment(p)


def test_cold_start_size_and_fraction_exclusive(tmp_path):
    p = _write(tmp_path, {"cold_start": {"size": 3, "fraction": 0.1}})
    with pytest.raises(ConfigError, match="cold_start"):
        load_experiment(p)


def test_malformed_yaml_and_missing_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("schedule: {rounds: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(p)
    with pytest.raises(ConfigError, match="file not found"):
        load_experiment(tmp_path / "nope.yaml")


def test_overrides():
    out = apply_overrides({"a": {"b": 1}}, {"a.c": 2, "d.e": 3})
    assert out == {"a": {"b": 1, "c": 2}, "d": {"e": 3}}


def test_sweep_search_space_validation(tmp_path):
    from raylearn.tune import SweepConfig, validate_search_space

    base = yaml.safe_load((REPO / "deployments" / "experiments" / "hippocampus_p2p.yaml").read_text())
    ok = validate_search_space({"strategy.name": {"grid": ["random", "entropy"]},
                                "train.lr": {"loguniform": [1e-4, 1e-2]},
                                "schedule.batch_size": {"randint": [2, 5]}}, base, "s.yaml")
    assert set(ok) == {"strategy.name", "train.lr", "schedule.batch_size"}
    with pytest.raises(ConfigError, match=r"unknown parameter"):
        validate_search_space({"strategy.params.k": {"choice": [3]}}, base, "s.yaml")
    with pytest.raises(ConfigError, match=r"search_space\.schedule\.batchsize: unknown key 'batchsize'"):
        validate_search_space({"schedule.batchsize": {"grid": [2]}}, base, "s.yaml")
    with pytest.raises(ConfigError, match="cannot be swept"):
        validate_search_space({"data.n_test": {"grid": [2]}}, base, "s.yaml")
    with pytest.raises(ConfigError, match="expected one of"):
        validate_search_space({"schedule.batch_size": [2, 3]}, base, "s.yaml")
    with pytest.raises(ConfigError, match="0 < low < high"):
        validate_search_space({"train.lr": {"loguniform": [0, 1]}}, base, "s.yaml")
    with pytest.raises(ConfigError, match="nosuch"):
        validate_search_space({"strategy.name": {"choice": ["random", "nosuch"]}}, base, "s.yaml")
    with pytest.raises(ConfigError, match=r"schedule\.batch_size"):
        validate_search_space({"schedule.batch_size": {"grid": [2, -1]}}, base, "s.yaml")
    sweep = load_config(REPO / "deployments" / "sweep.yaml", SweepConfig)
    assert sweep.metric == "alc"


@pytest.mark.parametrize("name", ["bald", "mc_entropy"])
def test_mc_dropout_strategy_refused_with_nnunet_backend(tmp_path, name):
    p = _write(tmp_path, {"strategy": {"name": name}, "model": {"backend": "nnunet"}})
    with pytest.raises(ConfigError) as e:
        load_experiment(p)
    msg = str(e.value)
    assert f"strategy.name: '{name}' needs feature(s) ['{name}']" in msg
    assert "model.backend: nnunet cannot compute (it has no predict_mc" in msg and "monai_unet" in msg
    # a strategy whose score is configurable is refused for the same reason
    p = _write(tmp_path, {"strategy": {"name": "cluster_topk", "params": {"score": "bald"}},
                          "model": {"backend": "nnunet"}})
    with pytest.raises(ConfigError, match=r"'cluster_topk' needs feature\(s\) \['bald'\]"):
        load_experiment(p)


def test_backend_feature_checks_pass_where_the_backend_can_score(tmp_path):
    for strategy, backend in (("bald", "monai_unet"), ("least_confidence", "nnunet"), ("typiclust", "nnunet")):
        cfg = load_experiment(_write(tmp_path, {"strategy": {"name": strategy}, "model": {"backend": backend}}))
        assert cfg.strategy.name == strategy
    # MC sampling uses model.mc_dropout, so a MONAI model trained without dropout can still run bald
    cfg = load_experiment(_write(tmp_path, {"strategy": {"name": "bald"}, "model": {"dropout": 0}}))
    assert cfg.strategy.name == "bald"


def test_backend_calls_match_the_segmenter_classes():
    """BACKEND_CALLS declares, without importing torch at config time, what each backend class implements."""
    from raylearn.experiment import BACKEND_CALLS
    from raylearn.models.base import Segmenter
    from raylearn.models.nnunet_segmenter import NnUNetSegmenter
    from raylearn.models.unet import MonaiSegmenter

    def implemented(cls):
        generic = {"predict_proba", "predict_tta"}  # abstract, and flip TTA built on predict_proba for every backend
        own = ("predict_mc", "embed", "predict_heads")
        return generic | {m for m in own if getattr(cls, m) is not getattr(Segmenter, m)}

    assert BACKEND_CALLS == {"monai_unet": implemented(MonaiSegmenter), "nnunet": implemented(NnUNetSegmenter)}


def test_surface_dice_tolerance(tmp_path):
    assert load_experiment(_write(tmp_path, {})).evaluate.surface_dice_tolerance_mm == 1.0
    assert load_experiment(_write(tmp_path, {"evaluate": {"surface_dice_tolerance_mm": None}})).evaluate \
        .surface_dice_tolerance_mm is None
    with pytest.raises(ConfigError, match=r"evaluate\.surface_dice_tolerance_mm"):
        load_experiment(_write(tmp_path, {"evaluate": {"surface_dice_tolerance_mm": -1}}))
