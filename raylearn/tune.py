"""``raylearn tune sweep.yaml``: Ray Tune sweeps of AL strategy hyperparameters.

Each trial is a simulated AL run (:func:`raylearn.loop.run_experiment`) with some experiment keys
overridden; it reports after every round (labelled %, Dice, and the normalised area under the
learning curve so far, ALC — the default objective). ASHA stops weak trials early using the round
index as time. Trials run in ``<output_dir>/trials/<trial_id>`` with their own durable ledgers, so a
sweep restored with ``--resume`` (``Tuner.restore``) repeats no finished trial and continues
unfinished ones from their last recorded round.

Sweep YAML::

    experiment: experiments/phantoms.yaml  # base experiment (relative to this file)
    output_dir: runs/sweep
    metric: alc                            # alc | dice_mean
    num_samples: 1                         # samples per grid point
    max_concurrent_trials: 2
    resources_per_trial: {cpu: 1, gpu: 0}
    scheduler: {kind: asha, grace_period: 1, reduction_factor: 2}
    tracking: {mlflow: auto, tensorboard: false}  # Ray Tune's MLflowLoggerCallback / TBXLoggerCallback
    search_space:
      strategy.name: {choice: [random, least_confidence]}
      schedule.batch_size: {grid: [3, 5]}
      train.lr: {loguniform: [1.0e-4, 1.0e-2]}
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, field_validator

from raylearn.config import ConfigError, StrictModel, load_config, load_yaml, parse_config
from raylearn.experiment import ExperimentConfig, apply_overrides
from raylearn.tracking_tune import TuneTrackingConfig

log = logging.getLogger(__name__)

__all__ = ["SweepConfig", "validate_search_space", "run_sweep", "tune_cli"]

_DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint", "quniform")
_FORBIDDEN = ("data", "output_dir", "name", "oracle", "tracking")


class SchedulerConfig(StrictModel):
    kind: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    max_t: int | None = Field(None, ge=1)


class SearchAlgConfig(StrictModel):
    kind: Literal["random", "optuna"] = "random"
    seed: int | None = 0


class TrialResources(StrictModel):
    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)


class SweepConfig(StrictModel):
    experiment: str
    output_dir: str = "runs/sweep"
    name: str = "sweep"
    metric: Literal["alc", "dice_mean"] = "alc"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(1, ge=1)
    max_concurrent_trials: int = Field(2, ge=1)
    resources_per_trial: TrialResources = TrialResources()
    scheduler: SchedulerConfig = SchedulerConfig()
    search_alg: SearchAlgConfig = SearchAlgConfig()
    top_k_plot: int = Field(5, ge=1)
    #: one MLflow run per trial (default store ``<output_dir>/mlruns``) through Ray Tune's own logger callbacks
    tracking: TuneTrackingConfig = TuneTrackingConfig()
    search_space: dict[str, dict[str, Any]]

    @field_validator("search_space")
    @classmethod
    def _non_empty(cls, v: dict) -> dict:
        if not v:
            raise ValueError("search_space is empty")
        return v


def _field_model(model: type[BaseModel], part: str) -> tuple[bool, Any]:
    fields = model.model_fields
    if part not in fields:
        return False, None
    ann = fields[part].annotation
    for a in (ann, *getattr(ann, "__args__", ())):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return True, a
    return True, ann


def validate_search_space(space: dict[str, dict[str, Any]], base: dict, source: str) -> dict[str, Any]:
    """Check every key path exists in the experiment schema and every domain is well formed;
    then validate the base experiment with one sample of each domain. Returns the Tune param space."""
    from ray import tune

    out: dict[str, Any] = {}
    probe: dict[str, Any] = {}
    for key, spec in space.items():
        where = f"{source}: search_space.{key}"
        parts = key.split(".")
        if parts[0] in _FORBIDDEN:
            raise ConfigError(f"{where}: '{parts[0]}' cannot be swept (trials share one pool store and output dir)")
        model: Any = ExperimentConfig
        for i, part in enumerate(parts):
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                if getattr(model, "__origin__", model) is dict:  # free-form mapping (strategy.params)
                    break
                raise ConfigError(f"{where}: '{'.'.join(parts[:i])}' has no sub-keys")
            ok, model = _field_model(model, part)
            if not ok:
                allowed = ", ".join(sorted(_parent_fields(parts[:i])))
                raise ConfigError(f"{where}: unknown key '{part}' (allowed at this level: {allowed})")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in _DOMAINS:
            raise ConfigError(f"{where}: expected one of {{{', '.join(_DOMAINS)}}}: [...], got {spec!r}")
        kind, vals = next(iter(spec.items()))
        if not isinstance(vals, list) or not vals:
            raise ConfigError(f"{where}: {kind} needs a non-empty list")
        if kind in ("uniform", "loguniform", "randint", "quniform"):
            if len(vals) != (3 if kind == "quniform" else 2) or not all(isinstance(v, int | float) for v in vals):
                raise ConfigError(f"{where}: {kind} needs numbers [low, high{', q' if kind == 'quniform' else ''}]")
            if vals[0] >= vals[1] or (kind == "loguniform" and vals[0] <= 0):
                raise ConfigError(f"{where}: {kind} needs 0 < low < high" if kind == "loguniform"
                                  else f"{where}: {kind} needs low < high")
        domain = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
                  "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v),
                  "quniform": lambda v: tune.quniform(*v)}[kind](vals)
        out[key] = domain
        probe[key] = vals[0] if kind in ("grid", "choice") else (vals[0] if kind != "randint" else int(vals[0]))
    # every grid/choice value must give a valid experiment, not only the first
    for key, spec in space.items():
        kind, vals = next(iter(spec.items()))
        for v in vals if kind in ("grid", "choice") else [probe[key]]:
            parse_config(apply_overrides(base, {**probe, key: v}), ExperimentConfig,
                         source=f"{source}: search_space.{key}={v!r} ->")
    return out


def _parent_fields(parts: list[str]) -> list[str]:
    model: Any = ExperimentConfig
    for p in parts:
        _, model = _field_model(model, p)
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


#: CPUs reserved by the trial function itself: it only orchestrates (its workers and shards hold the rest)
TRIAL_CPU = 0.01


def _floor4(x: float) -> float:
    """``x`` rounded down to Ray's resource granularity (1e-4), so that shares add up to no more than the whole."""
    return math.floor(x * 1e4 + 1e-6) / 1e4


def _fit_inside(exp: dict, res: TrialResources) -> dict:
    """Size the trial's training workers and pool shards so that together they fit in its resources.

    Shards stay alive (and keep their reservation) while the trial trains, so they reserve only a
    tenth of the trial's CPUs between them and the training workers the other nine tenths; the
    shards' torch threads still use the whole allocation while scoring (scoring and training
    alternate within a round). GPUs go to the training workers; shards get GPU fractions the same way.
    """
    train = dict(exp.get("train") or {})
    n_workers = int(train.get("num_workers", 1))
    pool = dict(exp.get("pool") or {})
    n_shards = int(pool.get("n_shards") or max(1, math.floor(res.cpu)))
    cpu = res.cpu - TRIAL_CPU  # the trial function's own share comes out of the trial's CPUs: two 1-CPU trials
    per = {"CPU": _floor4(0.9 * cpu / n_workers)}  # then fit a 2-CPU node together (they took 2.02 of it)
    if res.gpu > 0:
        per["GPU"] = 0.9 * res.gpu / n_workers
        train["use_gpu"] = True
    train["resources_per_worker"] = per
    pool["n_shards"] = n_shards
    pool["num_cpus"] = _floor4(0.1 * cpu / n_shards)
    pool["num_gpus"] = 0.1 * res.gpu / n_shards if res.gpu > 0 else 0
    pool["torch_threads"] = max(1, math.floor(res.cpu / n_shards))
    return {**exp, "train": train, "pool": pool}


def _trainable(config: dict, *, base: dict, out: str, resources: dict) -> None:
    from ray import tune

    from raylearn.curves import alc
    from raylearn.loop import run_experiment
    from raylearn.train.service import live_placement_groups
    from raylearn.tune_release import PG_KEY

    trial_id = tune.get_context().get_trial_id()
    exp = apply_overrides(base, config)
    exp = _fit_inside(exp, TrialResources(**resources))
    exp["output_dir"] = str(Path(out) / "trials" / trial_id)
    exp["name"] = f"{exp.get('name', 'trial')}-{trial_id}"
    exp["tracking"] = {"mlflow": False, "tensorboard": False}  # Tune's callbacks log the trial's reports
    cfg = parse_config(exp, ExperimentConfig, source=f"trial {trial_id}")
    t0 = time.time()

    def report(rec: dict, rounds: list[dict]) -> None:
        fr = [r["fraction_labelled"] for r in rounds]
        dice = [r["metrics"].get("dice_mean", float("nan")) for r in rounds]
        tune.report({"round": rec["round"] + 1, "labelled_pct": 100 * rec["fraction_labelled"],
                     "dice_mean": dice[-1], "alc": alc(fr, dice), "wall_s": time.time() - t0,
                     "run_dir": cfg.output_dir, PG_KEY: " ".join(live_placement_groups())})

    run_experiment(cfg, resume=True, progress=False, on_round=report)


def run_sweep(sweep: SweepConfig, source: str, resume: bool = False) -> dict:
    """Run (or restore) a sweep; writes ``trials.csv``, ``top_curves.png`` and ``best_experiment.yaml``."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from raylearn.runtime import ensure_ray, ensure_store
    from raylearn.tracking_tune import open_tracking_store, tune_callbacks
    from raylearn.tune_release import ReleaseTrialPlacementGroups

    base_path = (Path(source).parent / sweep.experiment).resolve()
    base = load_yaml(base_path) or {}
    if not isinstance(base, dict):
        raise ConfigError(f"{base_path}: expected a mapping")
    base_cfg = parse_config(base, ExperimentConfig, source=str(base_path))
    param_space = validate_search_space(sweep.search_space, base, source)
    out = Path(sweep.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # one pool store for all trials, ingested once up front
    store_dir = base_cfg.data.store or str(out / "store")
    base = apply_overrides(base, {"data.store": str(Path(store_dir).resolve())})
    if base_cfg.data.dataset != "phantom":  # relative to the working directory, as for `raylearn run`
        base = apply_overrides(base, {"data.dataset": str(Path(base_cfg.data.dataset).resolve())})
    ensure_ray()
    ensure_store(parse_config(base, ExperimentConfig, source=str(base_path)))

    cluster_cpu = ray.cluster_resources().get("CPU", 1)
    concurrent = min(sweep.max_concurrent_trials, max(1, int(cluster_cpu // sweep.resources_per_trial.cpu)))
    if concurrent < sweep.max_concurrent_trials:
        log.info("max_concurrent_trials %d -> %d: %.1f CPUs per trial on a %.0f-CPU cluster",
                 sweep.max_concurrent_trials, concurrent, sweep.resources_per_trial.cpu, cluster_cpu)
    trainable = tune.with_parameters(_trainable, base=base, out=str(out),
                                     resources=sweep.resources_per_trial.model_dump())
    # the trial function only orchestrates; its training workers and shards hold the CPUs/GPUs
    trainable = tune.with_resources(trainable, {"cpu": TRIAL_CPU})
    n_rounds = 1 + base_cfg.schedule.rounds
    if sweep.scheduler.kind == "asha":
        scheduler = ASHAScheduler(time_attr="round", max_t=sweep.scheduler.max_t or n_rounds,
                                  grace_period=sweep.scheduler.grace_period,
                                  reduction_factor=sweep.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    search_alg = None
    if sweep.search_alg.kind == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as err:
            raise ConfigError(f"{source}: search_alg.kind: optuna needs `pip install optuna` ({err})") from None
        if any("grid" in s for s in sweep.search_space.values()):
            raise ConfigError(f"{source}: search_alg optuna does not take grid domains; use choice")
        search_alg = OptunaSearch(seed=sweep.search_alg.seed)
    storage = out / "ray_tune"
    exp_path = storage / sweep.name
    if resume:
        if not tune.Tuner.can_restore(str(exp_path)):
            raise ConfigError(f"{exp_path}: no sweep to resume here")
        # else the restored MLflowLoggerCallback refuses MLflow's file store in a fresh `raylearn tune --resume`
        open_tracking_store(sweep.tracking, out)
        tuner = tune.Tuner.restore(str(exp_path), trainable=trainable, resume_errored=True, param_space=param_space)
    else:
        if exp_path.exists() and any(exp_path.iterdir()):
            raise ConfigError(f"{exp_path}: a sweep already exists; pass --resume or choose another output_dir")
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, scheduler=scheduler,
                                        search_alg=search_alg, num_samples=sweep.num_samples,
                                        max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name=sweep.name, storage_path=str(storage), verbose=1,
                                      callbacks=[*tune_callbacks(sweep.tracking, out, sweep.name),
                                                 ReleaseTrialPlacementGroups()]),
        )
    grid = tuner.fit()
    return _write_results(grid, sweep, base, out)


def _write_results(grid, sweep: SweepConfig, base: dict, out: Path) -> dict:
    from raylearn.curves import alc, plot_compare
    from raylearn.ledger import Ledger
    from raylearn.tables import write_csv

    rows = []
    for res in grid:
        m = res.metrics or {}
        params = {k: v for k, v in (res.config or {}).items()}
        rows.append({"trial_id": m.get("trial_id", res.path and Path(res.path).name), **params,
                     "alc": m.get("alc"), "final_dice": m.get("dice_mean"), "rounds": m.get("round"),
                     "labelled_pct": m.get("labelled_pct"), "wall_s": m.get("wall_s"),
                     "status": "error" if res.error else "ok", "run_dir": m.get("run_dir")})
    key = sweep.metric if sweep.metric == "alc" else "final_dice"
    sign = -1 if sweep.mode == "max" else 1
    rows.sort(key=lambda r: (r[key] is None, sign * (r[key] or 0.0)))
    write_csv(out / "trials.csv", rows, columns=list(dict.fromkeys(k for r in rows for k in r)))
    curves = []
    for r in rows[: sweep.top_k_plot]:
        # read the trial's ledger: ASHA may stop a trial right after its last report, before summary.json
        if not r.get("run_dir") or not (Path(r["run_dir"]) / "ledger.jsonl").is_file():
            continue
        rounds = Ledger(Path(r["run_dir"]) / "ledger.jsonl", readonly=True).rounds()
        if not rounds:
            continue
        fr = [x["fraction_labelled"] for x in rounds]
        dice = [x["metrics"].get("dice_mean", float("nan")) for x in rounds]
        label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in r.items() if k in sweep.search_space)
        curves.append({"strategy": label, "fractions": fr, "dice_mean": dice, "dice_sd": [0.0] * len(fr),
                       "alc_mean": alc(fr, dice)})
    if curves:
        plot_compare(curves, out / "top_curves.png", title=f"{sweep.name}: top {len(curves)} trials")
    best = rows[0] if rows and rows[0][key] is not None else None
    if best is not None:
        overrides = {k: best[k] for k in sweep.search_space}
        exp = apply_overrides(base, {**overrides, "output_dir": str(out / "best_run"), "name": f"{sweep.name}-best"})
        tmp = out / "best_experiment.yaml.tmp"
        tmp.write_text(f"# best trial {best['trial_id']} of sweep {sweep.name}: {sweep.metric} = {best[key]:.4f}\n"
                       + yaml.safe_dump(exp, sort_keys=False))
        os.replace(tmp, out / "best_experiment.yaml")
    return {"rows": rows, "best": best, "output_dir": str(out)}


def tune_cli(config: str | Path, resume: bool = False, out: str | Path | None = None) -> int:
    sweep = load_config(config, SweepConfig)
    if out is not None:
        sweep = sweep.model_copy(update={"output_dir": str(out)})
    res = run_sweep(sweep, str(config), resume=resume)
    keys = list(sweep.search_space)
    print(" | ".join(["trial", *keys, "ALC", "final Dice", "rounds", "wall s", "status"]))
    for r in res["rows"]:
        fmt = [str(r["trial_id"]), *[str(r.get(k)) for k in keys],
               "-" if r["alc"] is None else f"{r['alc']:.4f}",
               "-" if r["final_dice"] is None else f"{r['final_dice']:.4f}", str(r["rounds"]),
               "-" if r["wall_s"] is None else f"{r['wall_s']:.0f}", r["status"]]
        print(" | ".join(fmt))
    print(f"outputs: {res['output_dir']}/trials.csv, top_curves.png, best_experiment.yaml")
    return 0
