"""The AL benchmarks' shared arguments and base experiment (``benchmarks/_al_common.py``): each benchmark parses its
arguments and builds a valid experiment config without running anything."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from raylearn.config import parse_config
from raylearn.experiment import ExperimentConfig

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
NAMES = ("sbc_al", "clasp_pe", "cold_start", "al_hippocampus")


@pytest.fixture
def bench(monkeypatch):
    """``bench(name)``: the module ``benchmarks/<name>.py`` (its folder on ``sys.path``, as when run as a script)."""
    monkeypatch.syspath_prepend(str(BENCH))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("quick", [False, True])
def test_each_benchmark_parses_and_builds_a_valid_config(bench, name, quick, tmp_path):
    mod = bench(name)
    if quick and name == "al_hippocampus":
        with pytest.raises(SystemExit):  # it has no --quick
            mod.parse_args(["--quick"])
        return
    args = mod.parse_args(["--out", str(tmp_path), "--data", str(tmp_path / "data")] + (["--quick"] if quick else []))
    cfg = parse_config(mod._base_config(args), ExperimentConfig, source=name)
    assert cfg.data.store == str(tmp_path / "store") and cfg.output_dir == str(tmp_path / "unused")
    assert cfg.evaluate.hd95 is False
    if quick:
        assert cfg.data.dataset == "phantom" and cfg.data.n_test == 3 and cfg.pool.n_shards == 1
        assert args.seeds <= 2
    else:
        assert cfg.data.dataset == str(tmp_path / "data") and cfg.data.n_test == 40 and cfg.data.split_seed == 0
        assert list(cfg.model.channels) == [16, 32, 64, 128] and cfg.train.batch_size == 4 and cfg.train.lr == 2e-3
    if name == "cold_start":
        assert (cfg.schedule.rounds, cfg.cold_start.size, cfg.train.steps) == (0, 1, 1)
        assert cfg.train.first_round_steps == (3 if quick else 300) and args.seeds == (2 if quick else 5)
    elif not quick:
        assert (cfg.cold_start.size, cfg.schedule.batch_size) == (8, 4) and cfg.evaluate.full_data_reference
        assert (cfg.train.first_round_steps, cfg.train.steps) == (300, 200)
        assert cfg.schedule.rounds == (2 if name == "al_hippocampus" else 3)


def test_benchmark_specific_settings(bench, tmp_path):
    out = ["--out", str(tmp_path)]
    sbc = bench("sbc_al")
    cfg = parse_config(sbc._base_config(sbc.parse_args(out + ["--beta", "0.5", "--head-resolution", "half"])),
                       ExperimentConfig)
    assert cfg.model.arch == "sbc_unet" and cfg.model.sbc.beta == 0.5 and cfg.model.sbc.head_resolution == "half"
    quick = sbc._base_config(sbc.parse_args(out + ["--quick"]))
    assert quick["train"]["first_round_steps"] == 4 and quick["evaluate"]["full_data_reference"] is False
    clasp = bench("clasp_pe")
    args = clasp.parse_args(out + ["--cold-strategy", "fg_random", "--cold", "5", "--rounds", "1", "--batch", "2"])
    cfg = parse_config(clasp._base_config(args), ExperimentConfig)
    assert (cfg.cold_start.strategy, cfg.cold_start.size, cfg.schedule.rounds, cfg.schedule.batch_size) == \
        ("fg_random", 5, 1, 2)
    patch = clasp.parse_args(["--unit", "patch", "--patch-size", "20", "--cold", "244", "--batch", "122"])
    cfg = parse_config(clasp._base_config(patch), ExperimentConfig)
    assert (cfg.unit.kind, cfg.unit.size, cfg.cold_start.size, cfg.schedule.batch_size) == \
        ("patch", (20, 20, 20), 244, 122)
    assert patch.out.parts[-2:] == ("runs", "bench_clasp_patch") and clasp.parse_args([]).out.name == "bench_clasp"
    al = bench("al_hippocampus")
    cfg = parse_config(al._base_config(al.parse_args(out + ["--mc-samples", "8"])), ExperimentConfig)
    assert cfg.features.mc_samples == 8 and cfg.features.reduction == "foreground"
    assert al.parse_args([]).out.parts[-2:] == ("runs", "bench_al")
    assert sbc.parse_args(["--quick"]).out.parts[-2:] == ("runs", "bench_sbc_quick")
    with pytest.raises(SystemExit):
        sbc.parse_args(["--seeds", "0"])


def test_save_result_quick_goes_beside_the_run(bench, tmp_path):
    common = bench("_al_common")
    args = bench("clasp_pe").parse_args(["--quick", "--out", str(tmp_path)])
    png = tmp_path / "compare.png"
    png.write_bytes(b"png")
    path = common.save_result({"a": 1.5}, "clasp_pe", args, png=png)
    assert path == tmp_path / "clasp_pe_quick.json" and json.loads(path.read_text()) == {"a": 1.5}
    assert (tmp_path / "clasp_pe_quick.png").read_bytes() == b"png"
    assert common.strategy_list(args) == ["clasp_pe", "fg_random", "random", "entropy"]


@pytest.mark.parametrize("quick", [False, True])
def test_star_benchmark_builds_a_slice_config(bench, quick, tmp_path):
    """benchmarks/star.py: the common arguments, on slice units (every 10th slice first, then STAR's rounds)."""
    mod = bench("star")
    args = mod.parse_args(["--out", str(tmp_path), "--data", str(tmp_path / "data")] + (["--quick"] if quick else []))
    cfg = parse_config(mod._base_config(args), ExperimentConfig, source="star")
    assert cfg.unit.kind == "slice" and cfg.cold_start.strategy == "even_slices"
    assert cfg.cold_start.params == {"spacing": 10} and cfg.data.store == str(tmp_path / "store")
    assert cfg.data.dataset == ("phantom" if quick else str(tmp_path / "data")) and cfg.evaluate.hd95 is False
    if not quick:
        assert (cfg.schedule.rounds, cfg.schedule.batch_size, args.seeds) == (5, 160, 3)
        assert (cfg.train.first_round_steps, cfg.train.steps) == (300, 200)
