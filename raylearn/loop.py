"""The active learning round orchestrator (``raylearn run``).

Round 0 picks a cold-start set; each later round scores the unlabeled pool on sharded Ray actors,
selects a batch with the query strategy, asks the oracle for labels, fine-tunes from the previous
best checkpoint with Ray Train, evaluates on the test split and appends the round to the ledger.
The loop never branches on which strategy runs: the strategy declares the features it needs and
the pool computes exactly those.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raylearn.config import ConfigError
from raylearn.curves import alc, plot_learning_curve
from raylearn.experiment import ExperimentConfig, load_experiment
from raylearn.ledger import Ledger, config_hash
from raylearn.oracle import SimulatedOracle

log = logging.getLogger(__name__)

__all__ = ["run_experiment", "run_experiment_cli", "demo_cli", "ensure_ray", "ensure_store", "RunResult"]


@dataclass
class RunResult:
    output_dir: Path
    rounds: list[dict]
    summary: dict


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to a running cluster (``RAY_ADDRESS``, e.g. under ``ray job submit``) or start a local one."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        return
    ray.init(
        address="local",
        num_cpus=num_cpus or min(os.cpu_count() or 2, 8),
        include_dashboard=False,
        object_store_memory=1024**3,
        log_to_driver=False,
    )


def round_seed(seed: int, round_index: int) -> int:
    """Seed of a round's strategy and training, derived from the experiment seed (resume-stable)."""
    return int(np.random.SeedSequence([int(seed), int(round_index)]).generate_state(1)[0])


def ensure_store(cfg: ExperimentConfig, progress: bool = True):
    """Ingest the configured dataset into the pool store (a no-op when already ingested) and open it."""
    from raylearn.data.phantom import make_phantom_dataset
    from raylearn.data.store import PoolStore, ingest

    out = Path(cfg.output_dir)
    store_dir = Path(cfg.data.store) if cfg.data.store else out / "store"
    if cfg.data.dataset == "phantom":
        ph = cfg.data.phantom
        dataset = store_dir.with_name(store_dir.name + "_phantom_src")
        if not (dataset / "dataset.json").is_file():
            log.info("generating %d phantom cases of %s voxels in %s", ph.n_cases, ph.shape, dataset)
            make_phantom_dataset(dataset, n_cases=ph.n_cases, shape=tuple(ph.shape), seed=ph.seed)
    else:
        dataset = Path(cfg.data.dataset)
        if not dataset.exists():
            raise ConfigError(f"data.dataset: {dataset} does not exist")
    ingest(dataset, store_dir, cfg.data.preprocess, n_test=cfg.data.n_test, test_fraction=cfg.data.test_fraction,
           seed=cfg.data.split_seed, progress=progress)
    return PoolStore.open(store_dir)


def _budget(cfg: ExperimentConfig, round_index: int, n_pool: int, n_labeled: int) -> int:
    if round_index == 0:
        cs = cfg.cold_start
        want = cs.size if cs.size is not None else max(1, int(round(cs.fraction * n_pool)))
    else:
        want = cfg.schedule.batch_size
    cap = n_pool - n_labeled
    if cfg.schedule.max_labeled is not None:
        cap = min(cap, cfg.schedule.max_labeled - n_labeled)
    if cfg.schedule.max_fraction is not None:
        cap = min(cap, int(np.floor(cfg.schedule.max_fraction * n_pool + 1e-9)) - n_labeled)
    return max(0, min(want, cap))


class _Evaluator:
    """Scores a checkpoint on the test split with Ray tasks (one per chunk), returning mean metrics."""

    def __init__(self, store, test_ids: list[str], hd95: bool, n_chunks: int) -> None:
        self.store = store
        self.test_ids = test_ids
        self.hd95 = hd95
        self.n_chunks = max(1, min(n_chunks, len(test_ids)))

    def __call__(self, checkpoint: str) -> dict[str, float]:
        import ray

        from raylearn.evaluate import evaluate_chunk

        chunks = [c.tolist() for c in np.array_split(np.array(self.test_ids), self.n_chunks) if len(c)]
        refs = [evaluate_chunk.remote(self.store, checkpoint, ids, self.hd95) for ids in chunks]
        rows = [row for part in ray.get(refs) for row in part]
        keys = sorted({k for r in rows for k in r if k != "case_id"})
        out = {}
        for k in keys:
            vals = np.array([r.get(k, np.nan) for r in rows], dtype=float)
            finite = vals[np.isfinite(vals)]
            out[k] = float(finite.mean()) if finite.size else float("nan")
        return out


def _write_outputs(out: Path, rounds: list[dict], class_names: dict[int, str], reference: float | None,
                   title: str) -> None:
    if not rounds:
        return
    metric_keys = sorted({k for r in rounds for k in r["metrics"]})
    with open(out / "rounds.csv.tmp", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["round", "n_labeled", "fraction_labelled", *metric_keys, "train_s", "score_s", "select_s",
                    "eval_s", "selected"])
        for r in rounds:
            t = r["timings"]
            w.writerow([r["round"], r["n_labeled"], f"{r['fraction_labelled']:.4f}",
                        *[r["metrics"].get(k, "") for k in metric_keys],
                        *[f"{t.get(k, 0.0):.2f}" for k in ("train_s", "score_s", "select_s", "eval_s")],
                        " ".join(r["selected"])])
    os.replace(out / "rounds.csv.tmp", out / "rounds.csv")
    plot_learning_curve(rounds, out / "learning_curve.png", class_names=class_names, reference=reference,
                        title=title)


def _round_line(r: dict) -> str:
    m, t = r["metrics"], r["timings"]
    return (f"round {r['round']:>2} | labelled {r['n_labeled']:>4} ({100 * r['fraction_labelled']:5.1f}%) | "
            f"Dice {m.get('dice_mean', float('nan')):.3f} | NSD {m.get('nsd_mean', float('nan')):6.2f}% | "
            f"train {t['train_s']:6.1f}s score {t['score_s']:5.1f}s select {t['select_s']:4.2f}s "
            f"eval {t['eval_s']:5.1f}s")


def run_experiment(cfg: ExperimentConfig, resume: bool = False, allow_config_change: bool = False,
                   cold_start_from: str | Path | None = None, progress: bool = True,
                   on_round: Callable[[dict, list[dict]], None] | None = None) -> RunResult:
    """Run (or resume) one AL experiment; returns its rounds and summary.

    Args:
        cfg: validated experiment config.
        resume: continue from ``output_dir/ledger.jsonl``; without it an existing ledger is refused.
        allow_config_change: resume even when the config hash differs from the ledger's header.
        cold_start_from: another run's output dir whose round-0 selection is re-used (``compare``
            shares the cold-start set across strategies of a seed, as the papers do).
        progress: progress bars for ingest and scoring.
        on_round: called after each recorded round with (record, all rounds so far); Ray Tune
            reports from here. Rounds replayed from the ledger on resume are passed too, in order.
    """
    from raylearn.pool import ShardedPool
    from raylearn.strategies import PoolView, build_strategy
    from raylearn.train import fit_round

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_json = cfg.model_dump(mode="json")
    chash = config_hash(cfg_json)
    ledger = Ledger(out / "ledger.jsonl")
    header = ledger.header()
    if header is not None and not resume:
        raise ConfigError(f"{out}: a run already exists here (ledger.jsonl); pass --resume to continue it "
                          "or choose another output_dir")
    if header is not None and header["config_hash"] != chash and not allow_config_change:
        changed = sorted(_diff_keys(header["config"], cfg_json))
        raise ConfigError(f"{out}: the config changed since this run began (keys: {', '.join(changed)}); "
                          "pass --allow-config-change to resume anyway")

    ensure_ray()
    store = ensure_store(cfg, progress=progress)
    pool_ids = sorted(store.case_ids("pool"))
    test_ids = sorted(store.case_ids("test"))
    if cfg.evaluate.max_test_cases:
        test_ids = test_ids[: cfg.evaluate.max_test_cases]
    if not pool_ids or not test_ids:
        raise ConfigError(f"{store.path}: needs pool and test cases (pool {len(pool_ids)}, test {len(test_ids)})")
    class_names = {int(k): v for k, v in store.labels.items()}
    if header is None:
        ledger.append("header", config_hash=chash, config=cfg_json, pool_ids=pool_ids, test_ids=test_ids,
                      started=time.strftime("%Y-%m-%dT%H:%M:%S"))
    elif header["pool_ids"] != pool_ids:
        raise ConfigError(f"{out}: the pool store's case ids differ from the ledger's; refusing to resume")

    rounds = ledger.rounds()
    labeled: list[str] = [cid for r in rounds for cid in r["selected"]]
    checkpoint: str | None = rounds[-1]["checkpoint"] if rounds else None
    if rounds:
        log.info("resuming %s after round %d (%d cases labelled)", out, rounds[-1]["round"], len(labeled))
    if cold_start_from is not None and ledger.selection(0) is None:
        other = Ledger(Path(cold_start_from) / "ledger.jsonl", readonly=True).selection(0)
        if other is None:
            raise ConfigError(f"{cold_start_from}: has no round-0 selection to share")
        ledger.append("selected", round=0, ids=other["ids"], scores=None, shared_from=str(cold_start_from))
        _share_round0(Path(cold_start_from), ledger, cfg_json, out)
        rounds = ledger.rounds()
        labeled = [cid for r in rounds for cid in r["selected"]]
        checkpoint = rounds[-1]["checkpoint"] if rounds else None
    if on_round is not None:
        for i in range(len(rounds)):
            on_round(rounds[i], rounds[: i + 1])

    oracle = SimulatedOracle(store)
    evaluator = _Evaluator(store, test_ids, cfg.evaluate.hd95, n_chunks=2)
    pool: Any = None
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    train_cfg = cfg.train.model_copy(update={"storage_path": str((out / "ray_train").resolve())})
    n_rounds = 1 + cfg.schedule.rounds
    try:
        for r in range(len(rounds), n_rounds):
            timings = {"score_s": 0.0, "select_s": 0.0}
            recorded = ledger.selection(r)
            if recorded is not None:
                chosen, scores = list(recorded["ids"]), recorded.get("scores")
            else:
                budget = _budget(cfg, r, len(pool_ids), len(labeled))
                if budget <= 0:
                    log.info("budget spent after %d cases; stopping", len(labeled))
                    break
                name, params = (cfg.cold_start.strategy, cfg.cold_start.params) if r == 0 else \
                    (cfg.strategy.name, cfg.strategy.params)
                strategy = build_strategy(name, **{**params, "random_state": round_seed(cfg.seed, r)})
                needs = sorted(strategy.requires)
                features: dict[str, np.ndarray] = {}
                ids = np.array(pool_ids)
                t0 = time.perf_counter()
                if needs:
                    if checkpoint is None:
                        raise ConfigError(f"strategy {name!r} needs features {needs}, which need a trained model; "
                                          "use a feature-free cold_start strategy (e.g. random)")
                    if pool is None:
                        pool = ShardedPool(store, config=cfg.pool, case_ids=[c for c in pool_ids if c not in labeled])
                    lab_needs = needs if strategy.needs_labeled_features() else []
                    features = _score_all(pool, store, checkpoint, needs, lab_needs, cfg, labeled, pool_ids)
                timings["score_s"] = time.perf_counter() - t0
                labeled_set = set(labeled)
                view = PoolView(ids=ids, labeled_mask=np.array([c in labeled_set for c in pool_ids]), features=features)
                t0 = time.perf_counter()
                chosen = [str(c) for c in strategy.select(view, budget)]
                timings["select_s"] = time.perf_counter() - t0
                scores = _selected_scores(view, chosen)
                ledger.append("selected", round=r, ids=chosen, scores=scores, strategy=name)
            receipt = oracle.label(chosen)
            labeled.extend(chosen)
            if pool is not None:
                pool.mark_labeled(chosen)

            t0 = time.perf_counter()
            fit = fit_round(store, list(labeled), checkpoint, cfg.model,
                            train_cfg.model_copy(update={"seed": round_seed(cfg.seed, r) % (2**31)}),
                            round_index=r, name=f"round_{r:02d}")
            timings["train_s"] = time.perf_counter() - t0
            kept = ckpt_dir / f"round_{r:02d}.pt"
            shutil.copyfile(fit.checkpoint_path, kept.with_suffix(".tmp"))
            os.replace(kept.with_suffix(".tmp"), kept)
            checkpoint = str(kept)

            t0 = time.perf_counter()
            metrics = evaluator(checkpoint)
            timings["eval_s"] = time.perf_counter() - t0
            rec = ledger.append(
                "round", round=r, selected=chosen, scores=scores, n_labeled=len(labeled),
                fraction_labelled=len(labeled) / len(pool_ids), metrics=metrics, timings=timings,
                checkpoint=checkpoint, best_val_dice=fit.best_val_dice, annotated_fg_voxels=receipt.foreground_voxels,
                config_hash=chash)
            rounds.append(rec)
            print(_round_line(rec), flush=True)
            if on_round is not None:
                on_round(rec, rounds)
            _write_outputs(out, rounds, class_names, None, cfg.name)
    finally:
        if pool is not None:
            pool.shutdown()

    reference = _reference(cfg, ledger, store, pool_ids, train_cfg, evaluator, ckpt_dir)
    _write_outputs(out, rounds, class_names, reference, cfg.name)
    summary = _summary(cfg, rounds, reference, chash)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / "summary.json")
    return RunResult(out, rounds, summary)


_ROUND0_KEYS = ("seed", "data", "cold_start", "model", "train")


def _share_round0(other_dir: Path, ledger: Ledger, cfg_json: dict, out: Path) -> None:
    """Re-use another run's round-0 model when everything that shapes it is identical (strategy aside):
    training is deterministic for a seed, so retraining would give the same checkpoint."""
    other = Ledger(other_dir / "ledger.jsonl", readonly=True)
    rec = next((r for r in other.rounds() if r["round"] == 0), None)
    hdr = other.header()
    if rec is None or hdr is None or any(hdr["config"].get(k) != cfg_json.get(k) for k in _ROUND0_KEYS):
        return
    ev, ev_other = cfg_json["evaluate"], hdr["config"]["evaluate"]
    if (ev["hd95"], ev["max_test_cases"]) != (ev_other["hd95"], ev_other["max_test_cases"]):
        return
    dst = out / "checkpoints" / "round_00.pt"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(rec["checkpoint"], dst.with_suffix(".tmp"))
    os.replace(dst.with_suffix(".tmp"), dst)
    payload = {k: v for k, v in rec.items() if k != "kind"}
    ledger.append("round", **{**payload, "checkpoint": str(dst), "shared_from": str(other_dir),
                              "config_hash": config_hash(cfg_json)})
    log.info("round 0 shared from %s (same cold-start set, model and training config)", other_dir)


def _score_all(pool, store, checkpoint: str, needs: list[str], lab_needs: list[str], cfg: ExperimentConfig,
               labeled: list[str], pool_ids: list[str]) -> dict[str, np.ndarray]:
    """Features aligned with ``pool_ids``: unlabeled cases from the shards, labelled ones (for the
    embedding-based strategies that measure distances to the labelled set) from Ray tasks."""
    import ray

    from raylearn.evaluate import features_for

    res = pool.score(checkpoint, needs, cfg.features)
    by_id = {cid: i for i, cid in enumerate(res["ids"])}
    lab_feats: dict[str, dict[str, np.ndarray]] = {}
    if lab_needs and labeled:
        parts = np.array_split(np.array(labeled), min(2, len(labeled)))
        refs = [features_for.remote(store, checkpoint, p.tolist(), lab_needs, cfg.features) for p in parts if len(p)]
        for part in ray.get(refs):
            lab_feats.update(part)
    out: dict[str, np.ndarray] = {}
    for name in needs:
        col = res["features"][name]
        rows = []
        for cid in pool_ids:
            if cid in by_id:
                rows.append(np.asarray(col[by_id[cid]]))
            elif cid in lab_feats:
                rows.append(np.asarray(lab_feats[cid][name]))
            else:  # labelled case whose value this strategy does not use: fill so arrays stay aligned
                rows.append(np.full_like(np.asarray(col[0], dtype=np.float32), np.nan))
        out[name] = np.stack(rows).astype(np.float32)
    return out


def _selected_scores(view, chosen: list[str]) -> dict[str, list[float]] | None:
    idx = {c: i for i, c in enumerate(view.ids.tolist())}
    scores = {}
    for name, arr in view.features.items():
        a = np.asarray(arr)
        if a.ndim == 1:
            scores[name] = [float(a[idx[c]]) for c in chosen]
    return scores or None


def _reference(cfg, ledger, store, pool_ids, train_cfg, evaluator, ckpt_dir) -> float | None:
    """The full-pool Dice when ``evaluate.full_data_reference``: one model trained from scratch on every
    pool case with as many optimisation steps as the whole AL run gave its model (``epochs`` x
    ``1 + rounds``, since each round fine-tunes for ``epochs``), so the reference is not under-trained
    relative to the curve it is compared with. A recorded reference with another budget is recomputed."""
    from raylearn.train import fit_round

    if not cfg.evaluate.full_data_reference:
        return None
    epochs = cfg.train.epochs * (1 + cfg.schedule.rounds)
    steps = epochs * cfg.train.iterations_per_epoch
    recs = [r for r in ledger.of_kind("reference") if r.get("train_steps") == steps]
    if recs:
        return recs[-1]["metrics"].get("dice_mean")
    log.info("training the full-pool reference on %d cases (%d epochs)", len(pool_ids), epochs)
    fit = fit_round(store, pool_ids, None, cfg.model, train_cfg.model_copy(update={"seed": cfg.seed, "epochs": epochs}),
                    round_index=-1, name="reference")
    kept = ckpt_dir / "reference.pt"
    shutil.copyfile(fit.checkpoint_path, kept)
    metrics = evaluator(str(kept))
    ledger.append("reference", metrics=metrics, checkpoint=str(kept), train_steps=steps)
    return metrics.get("dice_mean")


def _summary(cfg: ExperimentConfig, rounds: list[dict], reference: float | None, chash: str) -> dict:
    fr = [r["fraction_labelled"] for r in rounds]
    dice = [r["metrics"].get("dice_mean", float("nan")) for r in rounds]
    timing_tot = {k: float(sum(r["timings"].get(k, 0.0) for r in rounds))
                  for k in ("train_s", "score_s", "select_s", "eval_s")}
    return {
        "name": cfg.name, "strategy": cfg.strategy.name, "seed": cfg.seed, "config_hash": chash,
        "rounds": len(rounds), "n_labeled": rounds[-1]["n_labeled"] if rounds else 0,
        "final_metrics": rounds[-1]["metrics"] if rounds else {},
        "curve": [{"fraction_labelled": f, "dice_mean": d} for f, d in zip(fr, dice, strict=True)],
        "alc": alc(fr, dice) if rounds else None,
        "full_data_dice": reference,
        "timings_total_s": timing_tot,
        "selected": [r["selected"] for r in rounds],
    }


def _diff_keys(a: Any, b: Any, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[str] = set()
        for k in set(a) | set(b):
            out |= _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return set() if a == b else {prefix.rstrip(".")}


def run_experiment_cli(config: str | Path, resume: bool = False, allow_config_change: bool = False,
                       out: str | Path | None = None) -> int:
    overrides = {"output_dir": str(out)} if out is not None else None
    cfg = load_experiment(config, overrides)
    res = run_experiment(cfg, resume=resume, allow_config_change=allow_config_change)
    s = res.summary
    print(f"done: {s['rounds']} rounds, {s['n_labeled']} cases labelled, final Dice "
          f"{s['final_metrics'].get('dice_mean', float('nan')):.3f}, ALC {s['alc']:.3f}")
    print(f"outputs: {res.output_dir}/rounds.csv, summary.json, learning_curve.png")
    return 0


DEMO_CONFIG = Path(__file__).resolve().parent.parent / "deployments" / "experiments" / "demo.yaml"


def demo_cli(out: str | Path = "runs/demo") -> int:
    """The main job on the embedded default: an AL experiment on generated phantoms."""
    from importlib import resources

    path = DEMO_CONFIG
    if not path.is_file():  # installed without the repo: use the packaged copy
        path = Path(str(resources.files("raylearn") / "demo.yaml"))
    return run_experiment_cli(path, resume=True, out=out)
