"""URDS / GSCU feature sources: the extractor's at the cold start, the segmenter's afterwards (``source``)."""

from __future__ import annotations

import numpy as np
import pytest

from raylearn.strategies import PoolView, build_strategy


def test_auto_uses_the_extractor_at_round_0_and_the_segmenter_after():
    s = build_strategy("urds", extractor={"patch": 16, "steps": 5})
    assert s.requires == {"embedding", "entropy"}
    r0 = s.for_round(0)
    assert r0.requires == {"csal3d_embedding", "csal3d_uncertainty"}
    assert r0.extractor_settings() == {"csal3d": {"patch": 16, "steps": 5}}
    assert s.for_round(1).requires == {"embedding", "entropy"} and s.for_round(1).extractor_settings() == {}
    g = build_strategy("gscu", source="extractor", extractor={"checkpoint": "/x/sam_vit_b.pth"})
    assert g.for_round(3).requires == {"sugfw_embedding", "sugfw_uncertainty"}
    assert build_strategy("gscu", source="segmenter").for_round(0).requires == {"weighted_embedding", "entropy"}


def test_extractor_settings_errors_name_the_key():
    with pytest.raises(ValueError, match=r"extractor\.checkpoint"):
        build_strategy("gscu", source="extractor")
    with pytest.raises(ValueError, match=r"extractor\.patch"):
        build_strategy("urds", extractor={"patch": 12})
    with pytest.raises(ValueError, match="source"):
        build_strategy("urds", source="labels")


def test_selection_on_extractor_features():
    rng = np.random.default_rng(0)
    n = 12
    feats = {"csal3d_embedding": rng.normal(size=(n, 4)).astype(np.float16),
             "csal3d_uncertainty": rng.random(n).astype(np.float32),
             "sugfw_embedding": rng.normal(size=(n, 4)).astype(np.float16),
             "sugfw_uncertainty": (0.5 + 0.25 * rng.random(n)).astype(np.float32)}
    pool = PoolView(np.array([f"c{i}" for i in range(n)]), np.zeros(n, bool), feats, round_index=0)
    for name in ("urds", "gscu"):
        s = build_strategy(name, source="extractor",
                           extractor={"random_weights": True} if name == "gscu" else {}).for_round(0)
        sel = s.select(pool, 3)
        assert len(set(sel.tolist())) == 3
        np.testing.assert_array_equal(sel, s.select(pool, 3))


def test_experiment_config_accepts_extractor_sources_and_names_bad_settings():
    from raylearn.config import ConfigError, parse_config
    from raylearn.experiment import ExperimentConfig

    cfg = parse_config({"cold_start": {"strategy": "urds"}, "strategy": {"name": "urds",
                                                                          "params": {"source": "extractor"}}},
                       ExperimentConfig)
    assert cfg.strategy.params["source"] == "extractor"
    with pytest.raises(ConfigError, match=r"strategy: .*extractor\.checkpoint"):
        parse_config({"strategy": {"name": "gscu", "params": {"source": "extractor"}}}, ExperimentConfig)
    with pytest.raises(ConfigError, match=r"cold_start: .*extractor\.steps"):
        parse_config({"cold_start": {"strategy": "urds", "params": {"extractor": {"steps": 0}}}}, ExperimentConfig)
