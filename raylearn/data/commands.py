"""Command-line entry points of the data layer, wired into ``raylearn`` by :mod:`raylearn.cli`.

Each ``*_main`` function takes plain keyword arguments, prints a summary to stdout, prints one
``error: ...`` line to stderr on bad input (no traceback) and returns the process exit code
(0 success, 2 bad input or failed download). ``add_*_arguments(parser)`` add the matching argparse
options so the CLI and these functions cannot drift apart; ``run_*(args)`` call the mains from parsed args.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raylearn.config import ConfigError, StrictModel, load_yaml, parse_config
from raylearn.data.preprocess import PreprocessConfig

__all__ = [
    "add_fetch_arguments",
    "add_ingest_arguments",
    "add_phantom_arguments",
    "fetch_main",
    "ingest_main",
    "load_preprocess_config",
    "phantom_main",
    "run_fetch",
    "run_ingest",
    "run_phantom",
]


class _PreprocessFile(StrictModel):
    preprocess: PreprocessConfig = PreprocessConfig()


def load_preprocess_config(path: str | Path | None) -> PreprocessConfig:
    """Read preprocessing settings from YAML: either the keys of ``PreprocessConfig`` at the top level or a
    ``preprocess:`` section (other top-level keys then are errors). ``None`` gives the defaults.

    Raises:
        ConfigError: ``file.yaml: key.path: message`` lines.
    """
    if path is None:
        return PreprocessConfig()
    data = load_yaml(path)
    if isinstance(data, dict) and "preprocess" in data:
        return parse_config(data, _PreprocessFile, source=str(path)).preprocess
    return parse_config(data, PreprocessConfig, source=str(path))


def _fail(cmd: str, err: BaseException) -> int:
    print(f"raylearn {cmd}: error: {err}", file=sys.stderr)
    return 2


def ingest_main(
    dataset: str | Path,
    out: str | Path,
    config_path: str | Path | None = None,
    skip_bad: bool = False,
    seed: int = 0,
    n_test: int | None = None,
    test_fraction: float = 0.2,
    progress: bool = True,
) -> int:
    """``raylearn ingest DATASET OUT``: preprocess a dataset into a pool store and print a summary.

    Returns:
        Exit code: 0 on success (also when the store was already up to date), 2 on bad input.
    """
    from raylearn.data.readers import DatasetError
    from raylearn.data.store import StoreError, ingest

    try:
        cfg = load_preprocess_config(config_path)
        report = ingest(
            dataset, out, cfg, n_test=n_test, test_fraction=test_fraction, seed=seed, skip_bad=skip_bad,
            progress=progress,
        )  # fmt: skip
    except (ConfigError, DatasetError, StoreError) as err:
        return _fail("ingest", err)
    print(report.summary())
    return 0


def fetch_main(
    task: str, dest: str | Path, base_url: str | None = None, md5: str | None = None, progress: bool = True
) -> int:
    """``raylearn data fetch msd TASK DIR``: download and unpack an MSD task; print where it landed."""
    from raylearn.data.fetch import MSD_BASE_URL, FetchError, fetch_msd

    try:
        path = fetch_msd(task, dest, base_url=base_url or MSD_BASE_URL, md5=md5, progress=progress)
    except (FetchError, ValueError) as err:
        return _fail("data fetch msd", err)
    print(f"{path}")
    return 0


def phantom_main(
    out: str | Path, n_cases: int = 40, shape: tuple[int, int, int] = (48, 48, 48), seed: int = 0,
    n_structures: int = 2,
) -> int:  # fmt: skip
    """``raylearn data phantom OUT``: write the synthetic phantom dataset (MSD layout)."""
    from raylearn.data.phantom import make_phantom_dataset

    try:
        path = make_phantom_dataset(out, n_cases=n_cases, shape=tuple(shape), seed=seed, n_structures=n_structures)
    except (ValueError, OSError) as err:
        return _fail("data phantom", err)
    print(f"{path}: {n_cases} phantom cases of {tuple(shape)} voxels, {n_structures} structures, seed {seed}")
    return 0


def add_ingest_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``raylearn ingest``."""
    p.add_argument("dataset", help="dataset folder: MSD (dataset.json + imagesTr/labelsTr), nnU-Net raw, or "
                   "images/ + labels/ (or *_img/*_seg pairs); .nii, .nii.gz, .mha, .nrrd")  # fmt: skip
    p.add_argument("out", help="store folder to create (Arrow shards + manifest.parquet)")
    p.add_argument("--config", dest="config_path", metavar="YAML",
                   help="preprocessing settings (PreprocessConfig keys, or a 'preprocess:' section)")  # fmt: skip
    p.add_argument("--skip-bad", action="store_true", help="leave out bad cases and list them instead of failing")
    p.add_argument("--seed", type=int, default=0, help="seed of the pool/test split (default 0)")
    p.add_argument("--n-test", type=int, default=None, help="number of held-out test cases (overrides --test-fraction)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of held-out test cases (default 0.2)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def run_ingest(args: argparse.Namespace) -> int:
    """Call :func:`ingest_main` with parsed :func:`add_ingest_arguments` options."""
    return ingest_main(args.dataset, args.out, args.config_path, args.skip_bad, args.seed, args.n_test,
                       args.test_fraction, args.progress)  # fmt: skip


def add_fetch_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``raylearn data fetch msd``."""
    p.add_argument("task", help="MSD task, e.g. Task04_Hippocampus (Task01_BrainTumour ... Task10_Colon)")
    p.add_argument("dest", help="folder to unpack into (the task lands in DEST/TASK)")
    p.add_argument("--base-url", default=None, help="mirror holding TASK.tar (http(s):// or file://)")
    p.add_argument("--md5", default=None, help="expected md5 of the archive (default: MONAI's, for the official URL)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def run_fetch(args: argparse.Namespace) -> int:
    """Call :func:`fetch_main` with parsed :func:`add_fetch_arguments` options."""
    return fetch_main(args.task, args.dest, args.base_url, args.md5, args.progress)


def add_phantom_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``raylearn data phantom``."""
    p.add_argument("out", help="folder to write the MSD-layout phantom dataset into")
    p.add_argument("--n-cases", type=int, default=40, help="number of cases (default 40)")
    p.add_argument("--shape", type=int, nargs=3, default=[48, 48, 48], metavar=("D", "H", "W"), help="voxels")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--n-structures", type=int, default=2, help="labelled structures per case (default 2)")
    return p


def run_phantom(args: argparse.Namespace) -> int:
    """Call :func:`phantom_main` with parsed :func:`add_phantom_arguments` options."""
    return phantom_main(args.out, args.n_cases, tuple(args.shape), args.seed, args.n_structures)
