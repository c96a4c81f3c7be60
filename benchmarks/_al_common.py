"""What the AL benchmarks on MSD Task04 hippocampus share: their common arguments, the base experiment (the
learning-engine recipe, or tiny phantoms for ``--quick``), the run's start and where the result is written.

Run a benchmark as ``python benchmarks/NAME.py``: its folder is then first on ``sys.path`` and ``from _al_common
import ...`` finds this file (as ``_provenance``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "msd_hippocampus"
RESULTS = REPO / "benchmarks" / "results"


def al_parser(description: str, strategies: str, *, seeds: int = 3, rounds: int = 3,
              loop: bool = True) -> argparse.ArgumentParser:
    """A parser with ``--strategies`` (comma-separated, default ``strategies``), ``--seeds`` and, with ``loop``,
    ``--cold``, ``--rounds``, ``--batch``, then ``--first-steps`` and, with ``loop``, ``--steps``. The benchmark adds
    its own arguments, then :func:`add_output_arguments`."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--strategies", default=strategies)
    ap.add_argument("--seeds", type=int, default=seeds)
    if loop:
        ap.add_argument("--cold", type=int, default=8)
        ap.add_argument("--rounds", type=int, default=rounds)
        ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--first-steps", type=int, default=300)
    if loop:
        ap.add_argument("--steps", type=int, default=200)
    return ap


def add_output_arguments(ap: argparse.ArgumentParser, out: Path | None = None,
                         quick: str | None = "tiny phantom run (2 seeds) to check the pipeline") -> None:
    """``--out`` (default ``out``; None: :func:`parse` picks ``runs/<name>[_quick]``), ``--data`` (the MSD
    hippocampus folder) and, unless ``quick`` is None, ``--quick`` with that help."""
    ap.add_argument("--out", type=Path, default=out)
    ap.add_argument("--data", type=Path, default=DATA)
    if quick is not None:
        ap.add_argument("--quick", action="store_true", help=quick)


def parse(ap: argparse.ArgumentParser, argv: list[str] | None, runs_name: str) -> argparse.Namespace:
    """Parse ``argv``; an unset ``--out`` becomes ``runs/<runs_name>`` (``runs/<runs_name>_quick`` with ``--quick``)."""
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = REPO / "runs" / (f"{runs_name}_quick" if getattr(args, "quick", False) else runs_name)
    return args


def strategy_list(args: argparse.Namespace) -> list[str]:
    """``--strategies`` as a list."""
    return [s for s in args.strategies.split(",") if s]


def _merge(cfg: dict, sections: dict[str, dict[str, Any]]) -> dict:
    """``cfg`` with each section updated (one level deep: a key given replaces the whole value)."""
    return {**cfg, **{k: {**cfg.get(k, {}), **v} for k, v in sections.items()}}


def recipe_config(name: str, args: argparse.Namespace, **sections: dict[str, Any]) -> dict:
    """The experiment every AL benchmark starts from, before its loop settings (a dict for ``ExperimentConfig``).

    MSD hippocampus (``args.data``), fixed 40-case test split (ingest seed 0), MONAI UNet 16-32-64-128, whole volumes,
    batch 4, Adam 2e-3, 2 pool shards; with ``args.quick``, 14 phantoms of 24^3 (3 test cases), a 4-8 UNet, batch 2,
    1 shard. The store is ``<args.out>/store``; HD95 is off. ``sections`` update the sections they name.
    """
    out = args.out
    if getattr(args, "quick", False):  # phantoms: proves the pipeline, says nothing about the method
        cfg = {"name": name, "output_dir": str(out / "unused"),
               "data": {"dataset": "phantom", "store": str(out / "store"),
                        "phantom": {"n_cases": 14, "shape": [24, 24, 24], "seed": 3}, "n_test": 3},
               "model": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
               "train": {"batch_size": 2},
               "pool": {"n_shards": 1, "num_cpus": 0.5, "progress": False},
               "evaluate": {"hd95": False}}
    else:
        cfg = {"name": name, "output_dir": str(out / "unused"),
               "data": {"dataset": str(args.data), "store": str(out / "store"), "n_test": 40, "split_seed": 0},
               "model": {"channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 2},
               "train": {"batch_size": 4, "lr": 2e-3},
               "pool": {"n_shards": 2, "num_cpus": 0.5, "progress": False},
               "evaluate": {"hd95": False}}
    return _merge(cfg, sections)


def al_config(name: str, args: argparse.Namespace, cold_strategy: str = "random", **sections: dict[str, Any]) -> dict:
    """:func:`recipe_config` with the AL loop of the arguments and the full-pool reference: a cold start of
    ``args.cold`` cases by ``cold_strategy``, ``args.rounds`` rounds of ``args.batch``, ``args.first_steps`` then
    ``args.steps`` steps (``--quick``: 2 cases, 2 rounds of 2, 3 then 2 steps). ``sections`` update the result."""
    if getattr(args, "quick", False):
        cold, schedule, steps = 2, {"rounds": 2, "batch_size": 2}, {"first_round_steps": 3, "steps": 2}
    else:
        cold, schedule = args.cold, {"rounds": args.rounds, "batch_size": args.batch}
        steps = {"first_round_steps": args.first_steps, "steps": args.steps}
    cfg = recipe_config(name, args, cold_start={"strategy": cold_strategy, "size": cold}, schedule=schedule,
                        evaluate={"full_data_reference": True})
    cfg["train"] = {**steps, **cfg["train"]}
    return _merge(cfg, sections)


def start_run() -> tuple[float, ...]:
    """Ray's environment for a benchmark (no auth, workers at normal priority) and INFO logging; returns the load
    average now (for :func:`_provenance.provenance` at the end)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_worker_niceness", "0")
    load_before = os.getloadavg()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return load_before


def save_result(result: dict, name: str, args: argparse.Namespace, png: Path | None = None) -> Path:
    """Write ``<name>.json`` (and a copy of ``png`` as ``<name>.png`` when it exists) into ``benchmarks/results``,
    or into ``args.out`` with ``--quick`` (``<name>_quick.*``); returns the JSON's path."""
    quick = getattr(args, "quick", False)
    out = args.out if quick else RESULTS
    name = f"{name}_quick" if quick else name
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=float))
    if png is not None and png.is_file():
        (out / f"{name}.png").write_bytes(png.read_bytes())
    return path


def run_compare(args: argparse.Namespace, cfg: dict, source: str) -> tuple[Any, list[str], dict, float]:
    """``raylearn compare`` of ``--strategies`` over ``--seeds`` seeds from the base experiment ``cfg`` (validated,
    errors naming ``source``) in ``<args.out>/compare``; returns (the validated base, the strategies, compare's
    result, its wall time in s). Call :func:`start_run` first."""
    import time

    from raylearn.compare import compare
    from raylearn.config import parse_config
    from raylearn.experiment import ExperimentConfig

    strategies = strategy_list(args)
    base = parse_config(cfg, ExperimentConfig, source=source)
    t0 = time.time()
    res = compare(base, strategies, list(range(args.seeds)), args.out / "compare")
    return base, strategies, res, time.time() - t0
