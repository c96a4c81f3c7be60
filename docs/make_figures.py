"""Make the README's tracking and status-page figures from real runs (issue 20).

1. ``compare`` of random vs entropy x 2 seeds on small phantoms with the full-pool reference; its MLflow store
   (``<out>/cmp/mlruns``, the default) is read back with ``mlflow.tracking.MlflowClient`` and drawn with
   matplotlib as ``docs/mlflow_compare.png`` (mlflow-skinny ships no UI: this is not a screenshot of MLflow's UI).
2. a live run (``oracle: human``) on the same store, served by the annotation API; two annotators (alice, bob) label
   over HTTP (the source label files, uploaded as a person's would be) until round 2's suggestions are out and
   each holds one case; then headless Chromium loads ``/`` and saves ``docs/status_page.png``; the rest is
   labelled so the run finishes.

    python docs/make_figures.py --out /tmp/figures      # the compare, then the live run
    python docs/make_figures.py --out /tmp/f --only mlflow --mlflow-from <a compare's folder>

Status: ``--only mlflow`` made the README's MLflow figure and ``--only page`` its status-page screenshot (a quiet
machine, about 2 min); on the shared machine at load 25-35 the live run's Ray start-up had timed out.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
TOKENS = {"alice": "alice-figure-token", "bob": "bob-figure-token0"}
BASE = {
    "name": "phantoms", "seed": 0,
    "data": {"dataset": "phantom", "phantom": {"n_cases": 16, "shape": [24, 24, 24], "seed": 1}, "n_test": 4},
    "cold_start": {"size": 2}, "strategy": {"name": "entropy"}, "schedule": {"rounds": 3, "batch_size": 2},
    "model": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
    "train": {"first_round_steps": 12, "steps": 6, "batch_size": 2},
    "pool": {"n_shards": 1, "num_cpus": 0.5, "progress": False},
    "evaluate": {"hd95": True, "full_data_reference": True},
}


def run_compare(out: Path) -> Path:
    from raylearn.compare import compare
    from raylearn.experiment import ExperimentConfig, parse_config

    base = parse_config({**BASE, "output_dir": str(out / "unused")}, ExperimentConfig)
    compare(base, ["random", "entropy"], [0, 1], out / "cmp")
    return out / "cmp"


def draw_mlflow(cmp: Path, path: Path) -> None:
    """The compare's MLflow runs table and the ``dice_mean`` history of each child run, from MlflowClient data."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raylearn.tracking import resolve_uri, tracking_client

    uri = resolve_uri(None, cmp)
    client = tracking_client(uri)
    exp = next(e for e in client.search_experiments() if e.name != "Default")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    parent = next(r for r in runs if r.data.tags.get("raylearn.compare") == "parent")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    cols = ["run name", "run id", "status", "strategy", "seed", "rounds", "labelled %", "dice_mean", "hd95_mean",
            "symdiff_pct_mean", "full_data_dice", "alc"]
    rows = []
    for r in [parent, *children]:
        m = r.data.metrics
        n = len(client.get_metric_history(r.info.run_id, "dice_mean")) if r is not parent else ""
        rows.append([("" if r is parent else "  └ ") + r.info.run_name, r.info.run_id[:8], r.info.status,
                     r.data.tags.get("raylearn.strategy", r.data.params.get("strategies", "")),
                     r.data.tags.get("raylearn.seed", r.data.params.get("seeds", "")), str(n),
                     f"{m['labelled_pct']:.1f}" if "labelled_pct" in m else "",
                     f"{m['dice_mean']:.3f}" if "dice_mean" in m else "",
                     f"{m['hd95_mean']:.2f}" if "hd95_mean" in m else "",
                     f"{m['symdiff_pct_mean']:.1f}" if "symdiff_pct_mean" in m else "",
                     f"{m['full_data_dice']:.3f}" if "full_data_dice" in m else "",
                     f"{m['alc']:.3f}" if "alc" in m else " / ".join(
                         f"{k.split('/')[1]} {v:.3f}" for k, v in sorted(m.items()) if k.startswith("alc_mean/"))])
    fig = plt.figure(figsize=(13, 6.0))
    fig.suptitle(f"MLflow runs of `raylearn compare` (experiment '{exp.name}', store {uri.split('/')[-2]}/mlruns), "
                 "read with MlflowClient and drawn with matplotlib", fontsize=11)
    ax = fig.add_axes([0.01, 0.70, 0.98, 0.22])
    ax.axis("off")
    table = ax.table(cellText=rows, colLabels=cols, loc="upper center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(8.5)
    table.auto_set_column_width(list(range(len(cols))))
    for (i, _), cell in table.get_celld().items():
        if i == 0:
            cell.set_facecolor("#e8eaf0")
    for k, name in enumerate(("dice_mean", "labelled_pct")):
        ax2 = fig.add_axes([0.06 + 0.48 * k, 0.09, 0.42, 0.52])
        for r in children:
            hist = client.get_metric_history(r.info.run_id, name)
            ax2.plot([h.step for h in hist], [h.value for h in hist], marker="o", label=r.info.run_name)
        ax2.set_xlabel("step (round)")
        ax2.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax2.set_title(f"metric history: {name}", fontsize=10)
        ax2.grid(alpha=0.3)
        if k == 0:
            ax2.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def live_run_and_screenshot(out: Path, shot: Path, cmp: Path | None = None) -> None:
    import ray
    from ray import serve

    from raylearn.data.store import PoolStore
    from raylearn.experiment import ExperimentConfig, parse_config
    from raylearn.loop import run_experiment
    from raylearn.runtime import ensure_ray
    from raylearn.serve.app import build_app
    from raylearn.serve.config import UserConfig, annotation_serve_config

    # beside the comparison's runs (same data, model and budget), the page finds its full-pool reference
    out = cmp / "live" / "seed_0" if cmp is not None else out / "live"
    store_dir = cmp / "store" if cmp is not None else out.parent / "live_store"
    cfg = parse_config({**BASE, "name": "live-phantoms", "output_dir": str(out), "oracle": "human",
                        "data": {**BASE["data"], "store": str(store_dir)},
                        "evaluate": {"hd95": True}, "schedule": {**BASE["schedule"], "lease_s": 600}},
                       ExperimentConfig)
    ensure_ray()
    driver = threading.Thread(target=run_experiment, args=(cfg,), kwargs={"progress": False}, daemon=True)
    driver.start()
    while not (out / "annotation" / "run.json").is_file():
        time.sleep(1)
    store = PoolStore.open(store_dir)
    classes = {int(k): v for k, v in store.labels.items() if int(k)}
    sc = annotation_serve_config(out, [UserConfig(name=u, token=t) for u, t in TOKENS.items()], name="figures",
                                 classes=classes, auth_token_env="RAYLEARN_FIGURES_UNSET")
    import socket

    with socket.socket() as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(sc), name=sc.name, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    who = {u: httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {t}"})
           for u, t in TOKENS.items()}
    labels = store.manifest.set_index("case_id")["label_path"]

    def label_one(user: str) -> str | None:
        case = who[user].post("/activelearning/raylearn", json={}).json().get("id")
        if case:
            data = Path(labels[case]).read_bytes()
            r = who[user].put("/datastore/label", params={"image": case, "tag": "final"},
                              files={"label": (f"{case}.nii.gz", data, "application/gzip")})
            r.raise_for_status()
        return case

    def status() -> dict:
        return who["alice"].get("/v1/annotation/status").json()

    while True:  # label every suggestion until round 2 (2 trained rounds on the curve) hands out its cases
        s = status()
        if s.get("round") == 1 and s["model_version"] == 1 and s["queue"]:
            break
        for user in TOKENS:
            if s["queue"]:
                label_one(user)
        time.sleep(2)
    for user in TOKENS:  # each takes one of round 2's cases and is "labelling" it
        who[user].post("/activelearning/raylearn", json={})
    chromium = shutil.which("chromium")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--virtual-time-budget=20000", "--window-size=1280,1180", f"--screenshot={shot}",
                    f"{url}/#token={TOKENS['alice']}"], check=True, capture_output=True, env={**os.environ,
                                                                                              "HOME": "/tmp"})
    while driver.is_alive():  # label the rest so the run finishes
        s = status()
        for user in TOKENS:
            if s["queue"] or s["leases"]:
                label_one(user)
        time.sleep(2)
        driver.join(timeout=1)
    serve.shutdown()
    ray.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mlflow-from", type=Path, default=None,
                   help="draw the MLflow figure from this existing compare folder instead of running one")
    p.add_argument("--only", choices=["all", "mlflow", "page"], default="all")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cmp = args.mlflow_from
    if args.only in ("all", "mlflow"):
        cmp = cmp or run_compare(args.out)
        draw_mlflow(cmp, DOCS / "mlflow_compare.png")
        print(f"wrote {DOCS / 'mlflow_compare.png'}")
    if args.only in ("all", "page"):  # with a compare of our own: next to it, under its full-pool line
        live_run_and_screenshot(args.out, DOCS / "status_page.png", cmp if args.mlflow_from is None else None)
        print(f"wrote {DOCS / 'status_page.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
