"""The active learning round orchestrator (``raylearn run``).

Round 0 picks a cold-start set; every round then labels its selection, fine-tunes on the persistent
training service (warm: weights, optimiser and schedule carry over), and evaluates the round's model on the
test split *on the warm pool shards*, queued together with the scoring the next round's strategy needs
(same checkpoint, loaded once per shard). The loop never branches on which strategy runs: the strategy
declares the features it needs and the pool computes exactly those.

Durability: the ledger records each selection before labelling and each round once evaluated; a killed
run resumes from it (``resume=True``) and the training service from its last Ray Train checkpoint, so a
round interrupted mid-training continues where it stopped instead of retraining.

Annotation units (``unit: volume | slice``, :mod:`raylearn.slice_loop`): with slices, selections, budgets and cost
count slice units, the shards score each slice, training reads the cases with an annotated slice (the loss masked to
annotated and pseudo-labelled voxels), and a strategy with a ``propagate`` method runs its pseudo-labelling stage
after each round's labels arrive and before training (recorded in the ledger, re-used on resume).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raylearn.config import ConfigError
from raylearn.experiment import ExperimentConfig, load_experiment
from raylearn.ledger import Ledger, config_hash
from raylearn.outputs import foreground_cost, pool_foreground_voxels, round_line, summary, write_outputs, write_summary
from raylearn.runtime import (
    check_nodes,
    ensure_ray,
    ensure_store,
    label_root,
    plan_cluster,
    replan_training,
    resolved_model,
    round_seed,
    storage_uri,
)

log = logging.getLogger(__name__)

_UNIT_WORDS = {"volume": "cases", "slice": "slices", "patch": "patches"}

__all__ = ["RunResult", "run_experiment", "run_experiment_cli"]


@dataclass
class RunResult:
    output_dir: Path
    rounds: list[dict]
    summary: dict


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


def _strategy(cfg: ExperimentConfig, r: int):
    from raylearn.strategies import build_strategy

    name, params = (cfg.cold_start.strategy, cfg.cold_start.params) if r == 0 else \
        (cfg.strategy.name, cfg.strategy.params)
    return name, build_strategy(name, **{**params, "random_state": round_seed(cfg.seed, r)}).for_round(r)


def _features(pool, checkpoint: str, strategy, cfg: ExperimentConfig, pool_ids: list[str],
              labeled: list[str], round_index: int | None = None, store=None):
    """The strategy's features for every pool case (labelled ones only when it reads them) as a PoolView: model
    features from the shards, ground-truth ones (``LABEL_FEATURES``) from the store, label-free extractor ones
    (``EXTRACTOR_FEATURES``, the cold start's) from the store's cache or the shards; the view knows its round."""
    from raylearn.extract import extractor_records, split_features
    from raylearn.scoring.features import label_feature_records, model_features
    from raylearn.strategies import PoolView

    others, ext_needs = split_features(strategy.requires)
    needs = model_features(others)
    records: dict[str, dict[str, np.ndarray]] = {}
    if needs:
        res = pool.score(checkpoint, needs, cfg.features)
        for k, cid in enumerate(res["ids"]):
            records[str(cid)] = {name: col[k] for name, col in res["features"].items()}
        if strategy.needs_labeled_features():
            records.update(pool.score_cases(checkpoint, labeled, needs, cfg.features))
    gt_needs = sorted(set(others) - set(needs))
    ids = pool_ids if strategy.needs_labeled_features() else [c for c in pool_ids if c not in set(labeled)]
    if gt_needs:
        for cid, rec in label_feature_records(store, ids, gt_needs).items():
            records.setdefault(cid, {}).update(rec)
    if ext_needs:  # the whole pool split is extracted once and cached; the run reads what it needs
        from raylearn.runtime import storage_uri

        ext = extractor_records(pool, store, ext_needs, strategy.extractor_settings(), pool_ids, storage_uri(cfg))
        for cid in ids:
            records.setdefault(cid, {}).update(ext[cid])
    ctx = {"round_index": round_index, "n_rounds": cfg.schedule.rounds}
    if not records:
        return PoolView(ids=np.asarray(pool_ids, dtype=str), labeled_mask=np.isin(pool_ids, labeled), features={},
                        **ctx)
    return PoolView.from_records(pool_ids, set(labeled), records, **ctx)


def _selected_scores(view, chosen: list[str]) -> dict[str, list[float]] | None:
    idx = {c: i for i, c in enumerate(view.ids.tolist())}
    scores = {name: [float(np.asarray(a)[idx[c]]) for c in chosen]
              for name, a in view.features.items() if np.asarray(a).ndim == 1}
    return scores or None


def _config_json(cfg: ExperimentConfig) -> dict:
    """The config as the ledger records and hashes it: ``tracking`` left out (where a run is watched does not change
    what it computes, so a resume may log elsewhere)."""
    exclude = {"tracking"} | (set() if cfg.promptable.enabled else {"promptable"})  # runs from before it hash alike
    if cfg.unit.kind == "volume" and cfg.unit.axis == 2:  # the default: runs from before slice units hash alike
        exclude.add("unit")
    out = cfg.model_dump(mode="json", exclude=exclude)
    if "unit" in out and out["unit"].get("size") is None:  # slice runs from before patch units hash alike
        out["unit"].pop("size", None)
    return out


def _open_ledger(cfg: ExperimentConfig, out: Path, resume: bool, allow_config_change: bool) -> tuple[Ledger, str]:
    from raylearn.data.shards import diff_settings

    cfg_json = _config_json(cfg)
    chash = config_hash(cfg_json)
    ledger = Ledger(out / "ledger.jsonl")
    header = ledger.header()
    if header is not None and not resume:
        raise ConfigError(f"{out}: a run already exists here (ledger.jsonl); pass --resume to continue it "
                          "or choose another output_dir")
    if header is not None and header["config_hash"] != chash and not allow_config_change:
        changed = diff_settings(header["config"], cfg_json)
        raise ConfigError(f"{out}: the config changed since this run began ({'; '.join(changed)}); "
                          "pass --allow-config-change to resume anyway")
    return ledger, chash


def run_experiment(cfg: ExperimentConfig, resume: bool = False, allow_config_change: bool = False,
                   cold_start_from: str | Path | None = None, progress: bool = True,
                   on_round: Callable[[dict, list[dict]], None] | None = None,
                   reference_dir: str | Path | None = None, step_hook=None, case_hook=None,
                   pools: Any = None) -> RunResult:
    """Run (or resume) one AL experiment; returns its rounds and summary.

    Args:
        cfg: validated experiment config.
        resume: continue from ``output_dir/ledger.jsonl``; without it an existing ledger is refused.
        allow_config_change: resume even when the config hash differs from the ledger's header.
        cold_start_from: another run's output dir whose round-0 selection (and model, when everything that
            shapes it is identical) is re-used: ``compare`` shares the cold start across strategies.
        progress: progress bars for ingest and scoring.
        on_round: called after each recorded round with (record, all rounds so far); Ray Tune reports from
            here. Rounds replayed from the ledger on resume are passed too, in order.
        reference_dir: where the full-pool reference is cached (``compare`` shares one); default
            ``output_dir/reference`` when ``evaluate.full_data_reference`` is on.
        step_hook: ``hook(rank, round, step, attempt)`` run in the training workers after every step.
        case_hook: ``hook(shard, position, case_id)`` run in the pool shards after every scored case.
        pools: a :class:`~raylearn.pool_cache.PoolCache` whose live shards this run re-uses and leaves running
            (``compare``); default: the run starts its own and shuts them down.
    """
    from raylearn.extract import split_features
    from raylearn.pool_cache import PoolCache
    from raylearn.reference import full_pool_reference, mean_metrics, reference_cached
    from raylearn.scoring.features import model_features
    from raylearn.slice_loop import propagate_round, slice_view, training_ids, unit_space
    from raylearn.strategies import build_strategy
    from raylearn.train.backends import make_round_trainer

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ledger, chash = _open_ledger(cfg, out, resume, allow_config_change)
    ensure_ray()
    store = ensure_store(cfg, progress=progress)
    pool_ids, test_ids = sorted(store.case_ids("pool")), sorted(store.case_ids("test"))
    pool_fg = pool_foreground_voxels(store, pool_ids)  # denominator of the foreground cost (None if unknown)
    if cfg.evaluate.max_test_cases:
        test_ids = test_ids[: cfg.evaluate.max_test_cases]
    if not pool_ids or not test_ids:
        raise ConfigError(f"{store.path}: needs pool and test cases (pool {len(pool_ids)}, test {len(test_ids)})")
    model_cfg = resolved_model(cfg, store)
    header = ledger.header()
    if header is None:
        ledger.append("header", config_hash=chash, config=_config_json(cfg), pool_ids=pool_ids,
                      test_ids=test_ids, model_resolved=model_cfg.model_dump(mode="json"),
                      started=time.strftime("%Y-%m-%dT%H:%M:%S"))
    elif header["pool_ids"] != pool_ids:
        raise ConfigError(f"{out}: the pool store's case ids differ from the ledger's; refusing to resume")

    if cold_start_from is not None and ledger.selection(0) is None:
        from raylearn.cold_start import share_round0
        from raylearn.propagation import has_stage

        stage = cfg.unit.kind == "slice" and has_stage(build_strategy(cfg.strategy.name, **cfg.strategy.params))
        share_round0(Path(cold_start_from), ledger, _config_json(cfg), model_cfg, out, share_model=not stage)
    rounds = ledger.rounds()
    tracker = _start_tracking(cfg, out, chash, rounds)  # before Ray work: a bad tracking key fails fast
    labeled: list[str] = [cid for r in rounds for cid in r["selected"]]  # unit ids (case ids for volume units)
    units = unit_space(cfg, store, pool_ids)
    checkpoint: str | None = rounds[-1]["checkpoint"] if rounds else None
    last_prop = ledger.last_propagation(len(rounds))  # the pseudo-labelling stage's scores feed the next selection
    prop_scores = None
    if last_prop is not None:
        from raylearn.propagation import load_scores

        prop_scores = load_scores(last_prop["scores_path"])
    if rounds:
        log.info("resuming %s after round %d (%d %s labelled)", out, rounds[-1]["round"], len(labeled),
                 _UNIT_WORDS[units.kind])
    if on_round is not None:
        for i in range(len(rounds)):
            on_round(rounds[i], rounds[: i + 1])

    class_names = {int(k): v for k, v in store.labels.items()}
    from raylearn.annotation import LabelledStore, LabelStore
    from raylearn.annotation.schedule import attach_run, make_schedule

    labels = LabelStore(label_root(cfg), known_ids=set(pool_ids))  # the only labels training reads
    schedule = make_schedule(cfg, store, labels, attach_run(out, cfg, store, labels, pool_ids), pool_ids)
    schedule.restore(labeled)  # rounds already recorded (a shared round 0, a resume) have their labels here
    storage = storage_uri(cfg)  # Ray Train's storage: a URI every node resolves (cluster.storage)
    open_cases = units.open_cases(labeled)  # cases with an unlabelled unit: what the shards hold
    plan = plan_cluster(cfg, len(open_cases))  # ConfigError naming the key when it cannot fit
    if cfg.cluster.check_nodes:
        check_nodes(store, {"cluster.storage": storage, "cluster.label_store": str(labels.root)})
    train_cfg = cfg.train.model_copy(update={"storage_path": storage, "use_gpu": plan.use_gpu})
    n_rounds = 1 + cfg.schedule.rounds
    trainer = make_round_trainer(LabelledStore(store, labels), model_cfg, train_cfg, out, cfg.schedule.rounds,
                                 resume=header is not None or bool(rounds), previous_checkpoint=checkpoint,
                                 step_hook=step_hook, storage=storage, scaling=plan.scaling(),
                                 replan=replan_training(cfg, len(open_cases)), promptable=cfg.promptable)
    schedule.bind(trainer)
    started = len(rounds) < n_rounds
    if started:  # the service's start-up (a thread) overlaps the shards' start-up
        trainer.start()
    own_pools = pools is None
    pools = PoolCache() if own_pools else pools
    try:
        pool = pools.get(store, n_shards=plan.n_shards, resources_per_shard=plan.shard, config=cfg.pool,
                         case_ids=open_cases, case_hook=case_hook, shard_nodes=plan.shard_nodes)
    except BaseException:
        if started:
            trainer.stop()
        raise
    metric_kw = {"hd95": cfg.evaluate.hd95, "surface_tolerance_mm": cfg.evaluate.surface_dice_tolerance_mm}
    prefetched: tuple[int, Any, float] | None = None  # (round, PoolView, seconds) scored beside evaluation
    failed = True
    try:
        for r in range(len(rounds), n_rounds):
            timings = {"score_s": 0.0, "select_s": 0.0}
            recorded = ledger.selection(r)
            if recorded is not None:
                chosen, scores = list(recorded["ids"]), recorded.get("scores")
            else:
                budget = _budget(cfg, r, len(units), len(labeled))
                if budget <= 0 and not schedule.trains_past_budget:
                    log.info("budget spent after %d %s; stopping", len(labeled),
                             _UNIT_WORDS[units.kind])
                    break
                name, strategy = schedule.strategy(r, *_strategy(cfg, r))  # an admin may override it
            if recorded is None and budget <= 0:  # async, budget spent: the round trains on what is labelled
                chosen, scores = [], None
                ledger.append("selected", round=r, ids=chosen, scores=scores, strategy=name)
            elif recorded is None:
                if model_features(split_features(strategy.requires)[0]) and checkpoint is None:
                    raise ConfigError(f"strategy {name!r} needs features {sorted(strategy.requires)}, which need a "
                                      "trained model; use a feature-free cold_start strategy (e.g. random)")
                if prefetched is not None and prefetched[0] == r:
                    view, timings["score_s"] = prefetched[1], prefetched[2]
                else:
                    t0 = time.perf_counter()
                    view = (slice_view(pool, checkpoint, strategy, cfg, units, labeled, r, prop_scores, store)
                            if units.partial else _features(pool, checkpoint, strategy, cfg, pool_ids, labeled, r,
                                                            store))
                    timings["score_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                view = schedule.view(view, labeled)  # async: cases labelled or leased meanwhile are taken
                n_select = schedule.budget(budget, view)  # async: 0 when every free case is labelled or leased
                chosen = [str(c) for c in strategy.select(view, n_select)] if n_select else []
                timings["select_s"] = time.perf_counter() - t0
                scores = _selected_scores(view, chosen)
                ledger.append("selected", round=r, ids=chosen, scores=scores, strategy=name)
            chosen, receipt = schedule.collect(r, chosen, labeled, checkpoint)
            complete = set(units.complete_cases(labeled))
            labeled.extend(chosen)
            pool.mark_labeled([c for c in units.complete_cases(labeled) if c not in complete] if units.partial
                              else chosen)
            prop_rec = None
            if units.slices:  # the main strategy's pseudo-labelling stage, when it has one
                t0 = time.perf_counter()
                main = build_strategy(cfg.strategy.name, **{**cfg.strategy.params,
                                                           "random_state": round_seed(cfg.seed, r)})
                prop_rec, scores_r = propagate_round(ledger, main, cfg, store, labels, units, labeled, r, out,
                                                     plan.use_gpu, int(store.num_classes))
                if prop_rec is not None:
                    prop_scores = scores_r
                    timings["propagate_s"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            checkpoint, info, added = schedule.fit(trainer, r, training_ids(units, labeled, labels),
                                                   seed=round_seed(cfg.seed, r) % 2**31)
            if added:  # async: labels that arrived while the round trained
                labeled.extend(added)
                pool.mark_labeled(added)
                chosen = [*chosen, *added]
            timings["train_s"] = time.perf_counter() - t0
            timings["train_step_s"] = float(info.get("train_s", 0.0))

            t0 = time.perf_counter()
            pending = pool.submit_evaluate(checkpoint, test_ids, metric_kw)
            prefetched = None
            if r + 1 < n_rounds and ledger.selection(r + 1) is None and \
                    _budget(cfg, r + 1, len(units), len(labeled)) > 0:
                _, nxt = schedule.strategy(r + 1, *_strategy(cfg, r + 1))
                if nxt.requires:  # score for the next round while the shards evaluate this one
                    t1 = time.perf_counter()
                    view = (slice_view(pool, checkpoint, nxt, cfg, units, labeled, r + 1, prop_scores, store)
                            if units.partial else _features(pool, checkpoint, nxt, cfg, pool_ids, labeled, r + 1,
                                                            store))
                    prefetched = (r + 1, view, time.perf_counter() - t1)
            metrics = mean_metrics(pool.collect_evaluate(pending, checkpoint, metric_kw))
            timings["eval_s"] = time.perf_counter() - t0 - (prefetched[2] if prefetched else 0.0)
            if cfg.promptable.enabled:  # fine-tuned by the workers beside this evaluation and the next scoring
                t1 = time.perf_counter()
                info["promptable"] = trainer.collect_promptable(r)
                timings["promptable_wait_s"] = time.perf_counter() - t1
            per_unit = {} if not units.partial else {  # slice / patch units: cost counts units
                "unit": units.kind, "n_units": len(units), "n_cases_labelled": len(units.labelled_cases(labeled)),
                "propagation": None if prop_rec is None else {k: prop_rec[k] for k in
                                                              ("round", "pseudo_cases", "pseudo_voxels", "info")}}
            rec = ledger.append(
                "round", round=r, selected=chosen, scores=scores, n_labeled=len(labeled),
                fraction_labelled=len(labeled) / len(units), metrics=metrics, timings=timings,
                checkpoint=checkpoint, train_info=info, annotated_fg_voxels=receipt.foreground_voxels,
                **foreground_cost(rounds, receipt.foreground_voxels, pool_fg), **per_unit,
                config_hash=chash)
            rounds.append(rec)
            schedule.round_done(r, checkpoint)
            print(round_line(rec), flush=True)
            if on_round is not None:
                on_round(rec, rounds)
            write_outputs(out, rounds, class_names, None, cfg.name)
            if tracker is not None:
                tracker.log_rounds(rounds)
        failed = False
    except BaseException as err:
        if tracker is not None:
            tracker.finish(status="KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        schedule.close()
        pools.release(failed=failed or own_pools)  # a run's own pool never outlives it
        if started:
            trainer.stop()

    reference = None
    if cfg.evaluate.full_data_reference or reference_dir is not None:
        ref_dir = Path(reference_dir) if reference_dir else out / "reference"
        if not own_pools and not reference_cached(cfg, model_cfg, test_ids, ref_dir):
            pools.close()  # the reference trains on what the shards would hold, as in a run of its own
        rec = full_pool_reference(cfg, model_cfg, store, pool_ids, test_ids, ref_dir,
                                  evaluate=lambda ckpt: _evaluate_tasks(store, ckpt, test_ids, metric_kw))
        reference = rec["metrics"].get("dice_mean")
    write_outputs(out, rounds, class_names, reference, cfg.name)
    data = summary(cfg.name, cfg.strategy.name, cfg.seed, rounds, reference, chash)
    if cfg.promptable.enabled and cfg.promptable.evaluate:  # (a) / (b) / (c) per round: p2p_rounds.{csv,md,png}
        from raylearn.p2p_rounds import measure_rounds

        p2p = measure_rounds(out, store, rounds, test_ids, cfg.promptable.eval_clicks, cfg.seed,
                             cfg.promptable.eval_max_cases, class_names)
        data["promptable"] = {"summary": p2p["summary"], "goals": p2p["goals"], "wall_s": p2p["wall_s"]}
    write_summary(out, data)
    if tracker is not None:
        tracker.finish(data)
    return RunResult(out, rounds, data)


def _start_tracking(cfg: ExperimentConfig, out: Path, chash: str, rounds: list[dict]):
    """The run's MLflow / TensorBoard tracker (None when off; :class:`ConfigError` naming the key on a bad
    ``tracking`` setting), caught up with the ``rounds`` already recorded (a resume, a shared round 0)."""
    from raylearn.tracking import RunTracker

    tracker = RunTracker.start(cfg, out, _config_json(cfg), chash)
    if tracker is not None:
        tracker.log_rounds(rounds)
    return tracker


def _evaluate_tasks(store, checkpoint: str, test_ids: list[str], metric_kw: dict) -> dict[str, float]:
    """Evaluate a checkpoint with Ray tasks (the reference, trained after the pool's shards are gone)."""
    import os

    import ray

    from raylearn.evaluate import evaluate_chunk
    from raylearn.reference import mean_metrics

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))  # one chunk per GPU on a GPU cluster, else per CPU (the shards are gone by now)
    n = max(1, min(gpus or int(res.get("CPU", 1)), len(test_ids), gpus or os.cpu_count() or 1))
    chunks = [c.tolist() for c in np.array_split(np.array(test_ids), n) if len(c)]
    blob = ray.put(Path(checkpoint).read_bytes())  # the bytes travel, not a driver-local path
    refs = [evaluate_chunk.options(num_gpus=1 if gpus else 0).remote(store, blob, ids, **metric_kw)
            for ids in chunks]
    rows = [row for part in ray.get(refs) for row in part]
    return mean_metrics(rows)


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
