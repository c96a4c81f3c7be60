"""The ``raylearn`` command line: ingest, data fetch, run, compare, tune, serve, preannotate, demo.

Each subcommand imports its machinery lazily so that ``raylearn --help`` is instant. Errors the user
can fix (bad config key, corrupt volume, missing file) print one clear line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("raylearn")


def _setup_env() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def _cmd_ingest(args: argparse.Namespace) -> int:
    from raylearn.data.preprocess import load_preprocess_config
    from raylearn.data.store import ingest

    report = ingest(
        args.dataset,
        args.out,
        load_preprocess_config(args.config),
        n_test=args.n_test,
        test_fraction=args.test_fraction,
        seed=args.seed,
        skip_bad=args.skip_bad,
        progress=sys.stderr.isatty(),
    )
    print(report.summary())
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    from raylearn.data.fetch import fetch_msd

    try:
        path = fetch_msd(args.task, args.dir, base_url=args.base_url, md5=args.md5, progress=sys.stderr.isatty())
    except ValueError as err:  # unknown task name (download failures are FetchError, a DatasetError)
        raise _UsageError(str(err)) from None
    print(f"{args.task} ready at {path}")
    return 0


def _cmd_phantom(args: argparse.Namespace) -> int:
    from raylearn.data.phantom import make_phantom_dataset

    try:
        path = make_phantom_dataset(args.out, n_cases=args.n_cases, shape=args.shape, seed=args.seed,
                                    n_structures=args.n_structures)
    except ValueError as err:  # bad sizes: one line, exit 2 (see main)
        raise _UsageError(str(err)) from None
    print(f"wrote {args.n_cases} phantom cases of {args.shape} voxels to {path}")
    return 0


def _shape(text: str) -> tuple[int, int, int]:
    """``"48,48,48"`` -> ``(48, 48, 48)``: the ``--shape D,H,W`` option of ``raylearn data phantom``."""
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive integers D,H,W (e.g. 48,48,48), got {text!r}")
    return shape  # type: ignore[return-value]


class _UsageError(ValueError):
    """Bad input a subcommand found after parsing: reported as one ``error:`` line, exit status 2."""


def _cmd_run(args: argparse.Namespace) -> int:
    from raylearn.loop import run_experiment_cli

    return run_experiment_cli(
        args.config, resume=args.resume, allow_config_change=args.allow_config_change, out=args.out
    )


def _cmd_compare(args: argparse.Namespace) -> int:
    from raylearn.compare import compare_cli

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    return compare_cli(args.config, strategies=strategies, seeds=args.seeds, out=args.out)


def _cmd_tune(args: argparse.Namespace) -> int:
    from raylearn.tune import tune_cli

    return tune_cli(args.config, resume=args.resume, out=args.out)


def _cmd_serve(args: argparse.Namespace) -> int:
    from raylearn.serve.app import run_server

    run_server(config_path=args.config, host=args.host, port=args.port, blocking=True)
    return 0


def _cmd_preannotate(args: argparse.Namespace) -> int:
    from raylearn.p2p_table import preannotate_cli

    return preannotate_cli(args.config, clicks=args.clicks, reference=args.reference, out=args.out,
                           sam_preset=args.sam_preset, sam_checkpoint=args.sam_checkpoint, method=args.click_method,
                           seed=args.seed, max_cases=args.max_cases, device=args.device)


def _cmd_demo(args: argparse.Namespace) -> int:
    from raylearn.demo import demo_cli

    return demo_cli(out=args.out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="raylearn",
        description="Ray-distributed active learning for 3D medical image segmentation.",
        epilog="Run `raylearn COMMAND --help` for the options of each command.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("ingest", help="preprocess a dataset into an Arrow pool store",
                       description="Preprocess DATASET (MSD, nnU-Net raw or image/label folder) into OUT: "
                       "Arrow IPC shards + a Parquet manifest with a seeded pool/test split.")
    s.add_argument("dataset", type=Path, help="dataset folder (MSD layout, nnU-Net raw DatasetXXX_Name, or folder)")
    s.add_argument("out", type=Path, help="output store folder")
    s.add_argument("--config", type=Path, default=None, help="YAML with preprocessing settings")
    s.add_argument("--skip-bad", action="store_true", help="ingest the readable cases and list the skipped ones")
    s.add_argument("--seed", type=int, default=0, help="seed of the pool/test split (default 0)")
    s.add_argument("--n-test", type=int, default=None, help="number of test cases (overrides --test-fraction)")
    s.add_argument("--test-fraction", type=float, default=0.2, help="share of cases held out for test (default 0.2)")
    s.set_defaults(func=_cmd_ingest)

    d = sub.add_parser("data", help="dataset utilities (fetch, phantom)")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    f = dsub.add_parser("fetch", help="download and unpack a public dataset")
    f.add_argument("source", choices=["msd"], help="dataset collection")
    f.add_argument("task", help="e.g. Task04_Hippocampus")
    f.add_argument("dir", type=Path, help="destination folder")
    f.add_argument("--base-url", default=None, help="mirror URL (default: the MSD bucket)")
    f.add_argument("--md5", default=None, help="expected md5 of the tar (default: MONAI's published value)")
    f.set_defaults(func=_cmd_fetch)
    ph = dsub.add_parser("phantom", help="generate the embedded default phantom dataset (MSD layout)")
    ph.add_argument("out", type=Path, help="folder to write the MSD-layout phantom dataset into")
    ph.add_argument("--n-cases", type=int, default=40, help="number of cases (default 40)")
    ph.add_argument("--shape", type=_shape, default=(48, 48, 48), help="voxels D,H,W (default 48,48,48)")
    ph.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ph.add_argument("--n-structures", type=int, default=2, help="labelled structures per phantom (default 2)")
    ph.set_defaults(func=_cmd_phantom)

    r = sub.add_parser("run", help="run an active learning experiment from a YAML file",
                       description="Run (or resume) a simulated AL experiment: cold start, then rounds of "
                       "score -> select -> label -> fine-tune -> evaluate, recorded in a durable ledger.")
    r.add_argument("config", type=Path, help="experiment YAML (see deployments/experiments/)")
    r.add_argument("--resume", action="store_true", help="continue from the run's ledger")
    r.add_argument("--allow-config-change", action="store_true",
                   help="resume even though the config changed since the ledger began")
    r.add_argument("--out", type=Path, default=None, help="override output_dir")
    r.set_defaults(func=_cmd_run)

    c = sub.add_parser("compare", help="run several strategies x seeds and tabulate learning curves")
    c.add_argument("config", type=Path)
    c.add_argument("--strategies", required=True, help="comma-separated strategy names")
    c.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    c.add_argument("--out", type=Path, default=None)
    c.set_defaults(func=_cmd_compare)

    t = sub.add_parser("tune", help="sweep strategy hyperparameters with Ray Tune")
    t.add_argument("config", type=Path, help="sweep YAML")
    t.add_argument("--resume", action="store_true", help="restore an interrupted sweep")
    t.add_argument("--out", type=Path, default=None)
    t.set_defaults(func=_cmd_tune)

    sv = sub.add_parser("serve", help="start the SAM-Med3D HTTP endpoint (Ray Serve) on 127.0.0.1:8000")
    sv.add_argument("--config", type=Path, default=None, help="serve YAML (default deployments/serve.yaml)")
    sv.add_argument("--host", default=None, help="default: the config's http_options, else 127.0.0.1")
    sv.add_argument("--port", type=int, default=None, help="default: the config's http_options, else 8000")
    sv.set_defaults(func=_cmd_serve)

    pa = sub.add_parser("preannotate", help="P2P Table 2: last round's segmenter -> simulated clicks -> SAM-Med3D, "
                                            "NSD on the test split (table + PNG)")
    pa.add_argument("config", help="experiment YAML (its output_dir) or a run folder holding ledger.jsonl")
    pa.add_argument("--clicks", default="1,5,10", help="clicks per class, comma-separated (default 1,5,10)")
    pa.add_argument("--reference", default="prediction,gt",
                    help="clicks simulated against: prediction (pre-annotation), gt (the authors' script), or both")
    pa.add_argument("--sam-checkpoint", default=None, help="local SAM-Med3D checkpoint (default: random weights)")
    pa.add_argument("--sam-preset", choices=("full", "small"), default="full")
    pa.add_argument("--click-method", choices=("random", "center"), default="random",
                    help="random: uniform in the error region (SAM-Med3D's default); center: its core")
    pa.add_argument("--seed", type=int, default=0)
    pa.add_argument("--max-cases", type=int, default=None, help="first N test cases only")
    pa.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    pa.add_argument("--out", default=None, help="output folder (default <run>/preannotate)")
    pa.set_defaults(func=_cmd_preannotate)

    dm = sub.add_parser("demo", help="run the main job on the embedded default data (60 MSD hippocampus cases)")
    dm.add_argument("--out", type=Path, default=Path("runs/demo"))
    dm.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    _setup_env()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from raylearn.config import ConfigError

    user_errors: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, _UsageError)
    try:
        from raylearn.data.readers import DatasetError
        from raylearn.data.store import StoreError

        user_errors += (DatasetError, StoreError)
    except ImportError:  # data layer not importable: still report config errors cleanly
        pass
    try:
        return int(args.func(args) or 0)
    except user_errors as err:
        cmd = " ".join(x for x in (args.command, getattr(args, "data_command", None)) if x)
        print(f"raylearn {cmd}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; `raylearn run --resume` continues from the ledger", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
