"""The shipped data commands (``raylearn ingest``, ``raylearn data phantom``, ``raylearn data fetch msd``),
run through the real entry point: :func:`raylearn.cli.main` in process, and the installed console script."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from raylearn.cli import main
from raylearn.config import ConfigError
from raylearn.data.preprocess import load_preprocess_config
from raylearn.data.readers import discover_dataset
from raylearn.data.store import PoolStore


def test_ingest_prints_summary_and_is_idempotent(small_phantom, tmp_path, capsys):
    cfg = tmp_path / "pre.yaml"
    cfg.write_text("preprocess:\n  pad_multiple: 16\n  normalization: zscore\n")
    argv = ["ingest", str(small_phantom), str(tmp_path / "s"), "--config", str(cfg), "--n-test", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "cases:    10 (6 pool, 4 test)" in out and "classes:  0=background, 1=blob_1, 2=tube_2" in out
    assert "cases/s" in out
    store = PoolStore.open(tmp_path / "s")
    assert store.config.pad_multiple == 16 and len(store.case_ids("test")) == 4
    assert main(argv) == 0
    assert "already up to date" in capsys.readouterr().out


def test_ingest_errors_are_one_line(small_phantom, tmp_path, capsys):
    missing = tmp_path / "missing"
    assert main(["ingest", str(missing), str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err.strip() == f"raylearn ingest: error: {missing}: dataset folder not found"
    bad = tmp_path / "bad.yaml"
    bad.write_text("pad_multiple: 8\ntarget_spacng: [1, 1, 1]\n")
    assert main(["ingest", str(small_phantom), str(tmp_path / "s"), "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"raylearn ingest: error: {bad}: target_spacng: unknown key (allowed: crop_foreground," in err
    assert "Traceback" not in err


def test_load_preprocess_config(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("target_spacing: [2.0, 1.0, 1.0]\norientation: LPS\n")
    assert load_preprocess_config(flat).target_spacing == (2.0, 1.0, 1.0)
    nested = tmp_path / "nested.yaml"
    nested.write_text("preprocess:\n  crop_foreground: true\nextra: 1\n")
    with pytest.raises(ConfigError, match=r"nested.yaml: extra: unknown key \(allowed: preprocess\)"):
        load_preprocess_config(nested)
    assert load_preprocess_config(None).pad_multiple == 8


def test_data_phantom(tmp_path, capsys):
    out = tmp_path / "ph"
    assert main(["data", "phantom", str(out), "--n-cases", "2", "--shape", "12,12,16", "--seed", "4"]) == 0
    assert "wrote 2 phantom cases of (12, 12, 16) voxels" in capsys.readouterr().out
    info = discover_dataset(out)
    assert len(info.cases) == 2
    with pytest.raises(SystemExit) as exc:  # argparse: usage line + exit status 2
        main(["data", "phantom", str(tmp_path / "x"), "--shape", "12 12 12"])
    assert exc.value.code == 2
    assert "expected three positive integers D,H,W" in capsys.readouterr().err
    assert main(["data", "phantom", str(tmp_path / "y"), "--n-cases", "0"]) == 2
    assert capsys.readouterr().err.startswith("raylearn data phantom: error: ")


def test_data_fetch_from_file_mirror(tmp_path, capsys):
    src = tmp_path / "src" / "Task04_Hippocampus"
    assert main(["data", "phantom", str(src), "--n-cases", "2", "--shape", "8,8,8"]) == 0
    (tmp_path / "mirror").mkdir()
    with tarfile.open(tmp_path / "mirror" / "Task04_Hippocampus.tar", "w") as tar:
        tar.add(src, arcname="Task04_Hippocampus")
    capsys.readouterr()
    argv = ["data", "fetch", "msd", "task04", str(tmp_path / "dl"), "--base-url", (tmp_path / "mirror").as_uri()]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().endswith(str(tmp_path / "dl" / "Task04_Hippocampus"))
    assert (tmp_path / "dl" / "Task04_Hippocampus" / "dataset.json").is_file()
    assert main(["data", "fetch", "msd", "Task99_Nothing", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raylearn data fetch: error: ") and "unknown MSD task 'Task99_Nothing'" in err


def test_console_script(tmp_path):
    """The installed ``raylearn`` script (pyproject ``[project.scripts]``) runs the same commands."""
    script = shutil.which("raylearn", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("raylearn console script not installed in this environment")
    run = subprocess.run([script, "data", "phantom", str(tmp_path / "ph"), "--n-cases", "2", "--shape", "8,8,8"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    run = subprocess.run([script, "ingest", str(tmp_path / "ph"), str(tmp_path / "s"), "--n-test", "1"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "cases:    2 (1 pool, 1 test)" in run.stdout
    run = subprocess.run([script, "ingest", str(tmp_path / "nope"), str(tmp_path / "s2")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().endswith("dataset folder not found")
