"""Asynchronous vs synchronous active learning with simulated annotators over the HTTP annotation API.

Both modes run the same experiment (same data, model, recipe, strategy, seed, label budget) with
``oracle: human``: the labels come from ``--annotators`` simulated annotators (threads) calling the MONAI
Label-compatible API of a Ray Serve app (``POST /activelearning/raylearn``, then ``PUT /datastore/label`` with the
ground truth on the source image's grid) after a per-case labelling delay drawn uniformly from
``--delay-s LO HI`` (people take 20-60 s per case; the default is that range times ``--time-scale``, 0.5 by
default: 10-30 s).

- ``sync``: the strategy selects a batch; annotators label it; then the model trains, the shards evaluate and
  score; the annotators are idle meanwhile.
- ``async``: the trainer takes labels as they arrive (a round = ``batch_size`` new labels or a timer), scoring
  runs with the newest model while people label, suggestions skip leased cases (``lookahead`` extra).

Reported per seed and mode: wall time from start until the test Dice first reaches 95 % of the full-pool
reference Dice (trained once, seed 0, cached, shared by every run), final Dice, labels used, total annotator
idle time; then, paired by seed, the speed-up (sync time / async time) and the final-Dice difference. A seed
sets the experiment's seed (cold start, initialisation, sampling) and the annotators' delays. Goal: async
reaches the target >= 1.5x sooner with no lower final Dice. Each seed's result is written to
``OUT/seed_S/result.json`` as soon as it is done, and a rerun with the same ``--out`` reuses finished seeds.
Writes ``OUT/results.json``, ``OUT/results.md`` and ``OUT/curves.png`` (Dice against wall time, one line per
seed and mode, the target line); the full run also writes ``benchmarks/results/async_al.{json,png}`` (with the
command, date, machine and load average)::

    .venv/bin/python benchmarks/async_al.py --quick                               # phantoms: the machinery
    .venv/bin/python benchmarks/async_al.py --seeds 0 1 2 --out runs/async_al     # the benchmark (~10 min/seed)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from _provenance import provenance

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("async_al")

FULL = {
    "name": "async-al", "seed": 0,
    "data": {"dataset": "demo:msd_hippocampus_60", "n_test": 20},
    "cold_start": {"strategy": "random", "size": 4},
    "strategy": {"name": "least_confidence"},
    "schedule": {"rounds": 6, "batch_size": 4, "max_labeled": 28, "lookahead": 4, "round_timer_s": 60},
    "features": {"reduction": "foreground"},
    "model": {"backend": "monai_unet", "channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 2},
    "train": {"first_round_steps": 120, "steps": 50, "batch_size": 4, "lr": 0.002, "log_every": 5},
    "pool": {"n_shards": 2, "num_cpus": 0.5, "progress": False},
    "evaluate": {"hd95": False},
}
QUICK = {
    "name": "async-al-quick", "seed": 0,
    "data": {"dataset": "phantom", "phantom": {"n_cases": 16, "shape": [24, 24, 24], "seed": 1}, "n_test": 4},
    "cold_start": {"strategy": "random", "size": 2},
    "strategy": {"name": "least_confidence"},
    "schedule": {"rounds": 2, "batch_size": 2, "max_labeled": 6, "lookahead": 2, "round_timer_s": 10},
    "model": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
    "train": {"first_round_steps": 20, "steps": 10, "batch_size": 2, "checkpoint_every": 10, "log_every": 2},
    "pool": {"n_shards": 1, "num_cpus": 0.25, "progress": False},
    "evaluate": {"hd95": False},
}


def _serve(run_dir: Path, tokens: dict[str, str], port: int, name: str):
    from ray import serve

    from raylearn.serve.app import build_app
    from raylearn.serve.config import UserConfig, annotation_serve_config

    cfg = annotation_serve_config(run_dir, [UserConfig(name=u, token=t) for u, t in tokens.items()], name=name,
                                  auth_token_env="RAYLEARN_BENCH_UNSET")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name=name, route_prefix="/")
    return f"http://127.0.0.1:{port}"


def run_mode(mode: str, base: dict, out: Path, args, seed: int) -> dict:
    """One run of ``mode`` (experiment and annotator seed ``seed``) with HTTP annotators; returns its curve (wall
    s, labels, Dice), idle time and the run's timings per round."""
    from ray import serve

    from raylearn.annotation.simulate import HttpClient, SimulatedAnnotators
    from raylearn.data.store import PoolStore
    from raylearn.experiment import ExperimentConfig
    from raylearn.loop import run_experiment
    from raylearn.runtime import ensure_store

    data = json.loads(json.dumps(base))
    data["output_dir"] = str(out / mode)
    data["seed"] = seed
    data["oracle"] = "human"
    data["schedule"]["mode"] = mode
    data["schedule"]["label_timeout_s"] = args.label_timeout_s
    data["data"]["store"] = str(out.parent / "store")
    cfg = ExperimentConfig.model_validate(data)
    shutil.rmtree(out / mode, ignore_errors=True)
    store = ensure_store(cfg, progress=False)
    store = PoolStore.open(store.path)
    tokens = {f"annotator{i}": f"bench-token-{i:04d}-{mode}" for i in range(args.annotators)}
    url = _serve(out / mode, tokens, _free_port(), f"bench-{mode}")
    annotators = SimulatedAnnotators([HttpClient(url, t, store) for t in tokens.values()], store,
                                     tuple(args.delay_s), seed=seed, poll_s=args.poll_s).start()
    curve: list[dict] = []
    t0 = time.time()

    def on_round(rec: dict, _rounds: list[dict]) -> None:
        now = time.time()
        curve.append({"round": rec["round"], "wall_s": now - t0, "n_labeled": rec["n_labeled"],
                      "dice": rec["metrics"].get("dice_mean"),
                      "train_steps_s": rec["timings"].get("train_step_s"), "eval_s": rec["timings"].get("eval_s"),
                      "labels_added_mid_round": rec["train_info"].get("labels_added_mid_round", 0),
                      "since_first_case_s": now - (annotators.first_case_at or t0)})
        log.info("seed %d %s round %d: %.1f s, %d labels, Dice %.3f", seed, mode, rec["round"],
                 curve[-1]["wall_s"], rec["n_labeled"], curve[-1]["dice"])

    try:
        run_experiment(cfg, progress=False, on_round=on_round)
    finally:
        annotators.stop()
        serve.delete(f"bench-{mode}")
        serve.shutdown()
    return {"mode": mode, "seed": seed, "curve": curve, "wall_s": curve[-1]["wall_s"] if curve else None,
            "final_dice": curve[-1]["dice"] if curve else None, "labels": curve[-1]["n_labeled"] if curve else 0,
            "annotator_idle_s": annotators.idle_s(),
            "startup_s": (annotators.first_case_at or t0) - t0, "annotator_errors": annotators.errors[:5],
            "labelled_by_annotators": len(annotators.labelled)}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reference_dice(base: dict, out: Path) -> float:
    """The full-pool reference Dice (trained once at the run's step budget, cached in ``OUT/reference``)."""
    from raylearn.experiment import ExperimentConfig
    from raylearn.loop import _evaluate_tasks
    from raylearn.reference import full_pool_reference
    from raylearn.runtime import ensure_store, resolved_model

    data = json.loads(json.dumps(base))
    data["output_dir"] = str(out / "reference_run")
    data["data"]["store"] = str(out / "store")
    cfg = ExperimentConfig.model_validate(data)
    store = ensure_store(cfg, progress=False)
    pool_ids, test_ids = sorted(store.case_ids("pool")), sorted(store.case_ids("test"))
    kw = {"hd95": cfg.evaluate.hd95, "surface_tolerance_mm": cfg.evaluate.surface_dice_tolerance_mm}
    rec = full_pool_reference(cfg, resolved_model(cfg, store), store, pool_ids, test_ids, out / "reference",
                              evaluate=lambda ckpt: _evaluate_tasks(store, ckpt, test_ids, kw))
    return float(rec["metrics"]["dice_mean"])


def time_to(curve: list[dict], target: float, key: str = "wall_s") -> float | None:
    """Seconds (``key``) of the first round whose Dice reaches ``target`` (None if never)."""
    return next((c[key] for c in curve if c["dice"] is not None and c["dice"] >= target), None)


def run_seed(seed: int, base: dict, out: Path, args, target: float) -> dict:
    """Both modes for one seed (or the seed's saved result from an earlier run with the same ``--out``)."""
    path = out / f"seed_{seed}" / "result.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("modes") == args.modes and saved.get("delay_s") == args.delay_s:
            log.info("seed %d: reusing %s", seed, path)
            return saved
    results = [run_mode(m, base, out / f"seed_{seed}", args, seed) for m in args.modes]
    for r in results:
        r["time_to_target_s"] = time_to(r["curve"], target)
        # the same from the first case handed to an annotator (leaves out the identical start-up of both modes)
        r["labelling_time_to_target_s"] = time_to(r["curve"], target, "since_first_case_s")
    res = {"seed": seed, "modes": args.modes, "delay_s": args.delay_s, "results": results}
    by = {r["mode"]: r for r in results}
    if {"sync", "async"} <= set(by):
        s_, a_ = by["sync"], by["async"]
        res["speedup_to_target"] = (s_["time_to_target_s"] / a_["time_to_target_s"]
                                    if s_["time_to_target_s"] and a_["time_to_target_s"] else None)
        res["speedup_from_first_case"] = (s_["labelling_time_to_target_s"] / a_["labelling_time_to_target_s"]
                                          if s_["labelling_time_to_target_s"] and a_["labelling_time_to_target_s"]
                                          else None)
        res["speedup_budget_spent"] = _budget_time(s_) / _budget_time(a_) if _budget_time(a_) else None
        res["final_dice_diff"] = a_["final_dice"] - s_["final_dice"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1, default=str))
    return res


def _budget_time(r: dict) -> float | None:
    """Wall seconds until the run's last label was in (its label budget spent)."""
    full = max(c["n_labeled"] for c in r["curve"])
    return next((c["wall_s"] for c in r["curve"] if c["n_labeled"] >= full), None)


def summarise(per_seed: list[dict]) -> dict:
    """Mean, sd and per-seed values of the paired figures; a paired t-test on the final-Dice difference."""
    import numpy as np

    out: dict = {}
    for key in ("speedup_to_target", "speedup_from_first_case", "speedup_budget_spent", "final_dice_diff"):
        vals = [r.get(key) for r in per_seed]
        ok = [float(v) for v in vals if v is not None]
        out[key] = {"per_seed": vals, "n": len(ok), "mean": float(np.mean(ok)) if ok else None,
                    "sd": float(np.std(ok, ddof=1)) if len(ok) > 1 else None,
                    "min": min(ok) if ok else None}
        if key.startswith("speedup") and ok:
            out[key]["geomean"] = float(np.exp(np.mean(np.log(ok))))
    diffs = [float(r["final_dice_diff"]) for r in per_seed if r.get("final_dice_diff") is not None]
    if len(diffs) > 1:
        from scipy import stats

        out["final_dice_diff"]["paired_t_p"] = float(stats.ttest_1samp(diffs, 0.0).pvalue)
    for mode in ("sync", "async"):
        rs = [x for r in per_seed for x in r["results"] if x["mode"] == mode]
        if rs:
            out[mode] = {k: {"mean": float(np.mean([x[k] for x in rs if x[k] is not None] or [np.nan])),
                             "per_seed": [x[k] for x in rs]}
                         for k in ("time_to_target_s", "wall_s", "final_dice", "annotator_idle_s",
                                   "labelled_by_annotators")}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="phantoms and a tiny model (checks the machinery, ~5 min)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/async_al[_quick])")
    p.add_argument("--annotators", type=int, default=3)
    p.add_argument("--time-scale", type=float, default=0.5,
                   help="labelling delays are 20-60 s x this (default 0.5: 10-30 s per case)")
    p.add_argument("--delay-s", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="labelling delay range in seconds (overrides --time-scale)")
    p.add_argument("--modes", nargs="+", default=["sync", "async"], choices=["sync", "async"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="experiment and annotator seeds, one paired sync/async comparison each")
    p.add_argument("--poll-s", type=float, default=1.0,
                   help="how often an idle annotator asks for the next case (seconds)")
    p.add_argument("--label-timeout-s", type=float, default=1800.0)
    p.add_argument("--num-cpus", type=int, default=None)
    args = p.parse_args(argv)
    if args.delay_s is None:
        args.delay_s = [20 * args.time_scale, 60 * args.time_scale] if not args.quick else [0.2, 0.6]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("ray", "ray.serve", "raylearn", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = (args.out or REPO / "runs" / ("async_al_quick" if args.quick else "async_al")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = QUICK if args.quick else FULL

    from raylearn.runtime import ensure_ray

    ensure_ray(args.num_cpus)
    load_before = os.getloadavg()
    t_all = time.monotonic()
    ref = reference_dice(base, out)  # before the runs: no annotator waits on it
    target = 0.95 * ref
    per_seed = []
    for seed in args.seeds:
        per_seed.append(run_seed(seed, base, out, args, target))
        log.info("seed %d done: speed-up to target %s", seed, per_seed[-1].get("speedup_to_target"))
    summary = {**provenance(load_before),
               "delay_s": args.delay_s, "annotators": args.annotators, "poll_s": args.poll_s, "quick": args.quick,
               "seeds": args.seeds, "reference_dice": ref, "target_dice": target, "config": base,
               "per_seed": per_seed, "summary": summarise(per_seed), "total_wall_s": time.monotonic() - t_all}
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    plot_curves(per_seed, target, ref, out / "curves.png")
    if not args.quick:  # the committed figures
        res_dir = REPO / "benchmarks" / "results"
        res_dir.mkdir(exist_ok=True)
        (res_dir / "async_al.json").write_text(json.dumps(summary, indent=1, default=str))
        shutil.copyfile(out / "curves.png", res_dir / "async_al.png")
    lines = report(summary, args)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written: {out / 'results.json'}, {out / 'results.md'}")
    return 0


def report(summary: dict, args) -> list[str]:
    """The Markdown table: one row per seed and mode, then the paired figures."""
    def sec(x) -> str:
        return "never" if x is None else f"{x:.0f}"

    lines = [f"# async vs sync AL ({'quick' if args.quick else 'full'})", "",
             f"{args.annotators} annotators, labelling delay {args.delay_s[0]:g}-{args.delay_s[1]:g} s per case; "
             f"full-pool Dice {summary['reference_dice']:.3f}, target (95 %) {summary['target_dice']:.3f}", "",
             "| seed | mode | time to target (s) | from first case (s) | wall (s) | final Dice | labels | "
             "labelled by annotators | annotator idle (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for res in summary["per_seed"]:
        for r in res["results"]:
            lines.append(f"| {res['seed']} | {r['mode']} | {sec(r['time_to_target_s'])} | "
                         f"{sec(r['labelling_time_to_target_s'])} | {sec(r['wall_s'])} | {r['final_dice']:.3f} | "
                         f"{r['labels']} | {r['labelled_by_annotators']} | {r['annotator_idle_s']:.0f} |")
    sm = summary["summary"]
    if sm.get("speedup_to_target", {}).get("n"):
        st, sf, sb, dd = (sm[k] for k in ("speedup_to_target", "speedup_from_first_case", "speedup_budget_spent",
                                          "final_dice_diff"))

        def per(d) -> str:
            return ", ".join("n/a" if v is None else f"{v:.2f}" for v in d["per_seed"])

        lines += ["", f"Speed-up to the target (sync time / async time), per seed: {per(st)}; geometric mean "
                      f"{st['geomean']:.2f}x, min {st['min']:.2f}x (goal >= 1.5x).",
                  f"From the first case handed out: {per(sf)}; geometric mean {sf['geomean']:.2f}x.",
                  f"Label budget spent sooner: {per(sb)}; geometric mean {sb['geomean']:.2f}x.",
                  f"Final Dice, async - sync, per seed: {', '.join(f'{v:+.3f}' for v in dd['per_seed'])}; "
                  f"mean {dd['mean']:+.3f}" + (f" (paired t-test p = {dd['paired_t_p']:.2f})"
                                               if "paired_t_p" in dd else "") + "."]
    return lines


def plot_curves(per_seed: list[dict], target: float, ref: float, path: Path) -> None:
    """Test Dice against wall time since the start, one line per seed and mode, with the full-pool and 95 % lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours = {"sync": "tab:blue", "async": "tab:orange"}
    styles = ["-", "--", ":", "-."]
    for i, res in enumerate(per_seed):
        for r in res["results"]:
            xs = [p["wall_s"] / 60 for p in r["curve"]]
            ax.plot(xs, [p["dice"] for p in r["curve"]], marker="o", ms=3, color=colours[r["mode"]],
                    ls=styles[i % len(styles)], label=f"{r['mode']}, seed {res['seed']}")
    ax.axhline(ref, color="k", lw=1, label=f"full pool {ref:.3f}")
    ax.axhline(target, color="k", lw=1, ls="--", label=f"95 % target {target:.3f}")
    ax.set_xlabel("wall time since start (min)")
    ax.set_ylabel("test Dice (mean over classes)")
    ax.set_title("async vs sync active learning, simulated annotators over HTTP")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
