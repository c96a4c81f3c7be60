"""CLI entry points of the data layer (``raylearn ingest``, ``raylearn data fetch msd``, ``raylearn data phantom``)."""

from __future__ import annotations

import argparse

import pytest

from raylearn.config import ConfigError
from raylearn.data.commands import (
    add_fetch_arguments,
    add_ingest_arguments,
    add_phantom_arguments,
    ingest_main,
    load_preprocess_config,
    run_fetch,
    run_ingest,
    run_phantom,
)
from raylearn.data.store import PoolStore


def test_ingest_main_prints_summary(small_phantom, tmp_path, capsys):
    cfg = tmp_path / "pre.yaml"
    cfg.write_text("preprocess:\n  pad_multiple: 16\n  normalization: zscore\n")
    args = add_ingest_arguments(argparse.ArgumentParser()).parse_args(
        [str(small_phantom), str(tmp_path / "s"), "--config", str(cfg), "--n-test", "4", "--no-progress"]
    )
    assert run_ingest(args) == 0
    out = capsys.readouterr().out
    assert "cases:    10 (6 pool, 4 test)" in out and "classes:  0=background, 1=blob_1, 2=tube_2" in out
    assert "cases/s" in out
    assert PoolStore.open(tmp_path / "s").config.pad_multiple == 16
    assert run_ingest(args) == 0
    assert "already up to date" in capsys.readouterr().out


def test_ingest_main_errors_are_one_line(small_phantom, tmp_path, capsys):
    assert ingest_main(tmp_path / "missing", tmp_path / "s", progress=False) == 2
    assert (
        capsys.readouterr().err.strip() == f"raylearn ingest: error: {tmp_path / 'missing'}: dataset folder not found"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("pad_multiple: 8\ntarget_spacng: [1, 1, 1]\n")
    assert ingest_main(small_phantom, tmp_path / "s", config_path=bad, progress=False) == 2
    err = capsys.readouterr().err
    assert f"{bad}: target_spacng: unknown key (allowed: crop_foreground," in err


def test_load_preprocess_config(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("target_spacing: [2.0, 1.0, 1.0]\norientation: LPS\n")
    assert load_preprocess_config(flat).target_spacing == (2.0, 1.0, 1.0)
    nested = tmp_path / "nested.yaml"
    nested.write_text("preprocess:\n  crop_foreground: true\nextra: 1\n")
    with pytest.raises(ConfigError, match=r"nested.yaml: extra: unknown key \(allowed: preprocess\)"):
        load_preprocess_config(nested)
    assert load_preprocess_config(None).pad_multiple == 8


def test_phantom_and_fetch_commands(tmp_path, capsys):
    args = add_phantom_arguments(argparse.ArgumentParser()).parse_args(
        [str(tmp_path / "ph"), "--n-cases", "2", "--shape", "12", "12", "12", "--seed", "4"]
    )
    assert run_phantom(args) == 0
    assert (tmp_path / "ph" / "dataset.json").is_file()
    fargs = add_fetch_arguments(argparse.ArgumentParser()).parse_args(
        ["Task99_Nothing", str(tmp_path), "--no-progress"]
    )
    assert run_fetch(fargs) == 2
    assert "unknown MSD task 'Task99_Nothing'" in capsys.readouterr().err
