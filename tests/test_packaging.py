"""The built wheel carries the embedded default: `raylearn demo` works from a non-editable install."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_demo_config_and_data(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("raylearn-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "raylearn/demo_data/demo.yaml" in names
    cases = [n for n in names if n.startswith("raylearn/demo_data/msd_hippocampus_60/imagesTr/")]
    labels = [n for n in names if n.startswith("raylearn/demo_data/msd_hippocampus_60/labelsTr/")]
    assert len(cases) == len(labels) == 60
    assert "raylearn/demo_data/msd_hippocampus_60/README.md" in names  # licence and attribution travel along

    # installed (not editable) into a bare folder: the demo's config loads and its shipped data ingests
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = (
        "import sys; from raylearn.demo import DEMO_CONFIG; from raylearn.experiment import load_experiment;"
        "from raylearn.runtime import ensure_store;"
        f"cfg = load_experiment(DEMO_CONFIG, {{'output_dir': {str(tmp_path / 'out')!r}}});"
        "assert str(DEMO_CONFIG).startswith(sys.argv[1]), DEMO_CONFIG;"
        "store = ensure_store(cfg, progress=False);"
        "print(len(store.case_ids('pool')), len(store.case_ids('test')))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(target)], cwd=tmp_path, env={"PYTHONPATH": str(target),
                         "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["40", "20"]
