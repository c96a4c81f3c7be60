"""``raylearn compare``: strategies x seeds on one experiment, a papers-style table and one plot.

For each seed the cold-start set is shared across strategies (the first strategy's round-0 selection
is re-used by the others), as the papers do. Runs land in ``<out>/<strategy>/seed_<s>`` and are
resumable; the table (mean ± sd Dice at each labelled %, ALC, S% = least labelled % reaching the
full-data Dice, S95% = the same for 95 % of it, the share of the pool's foreground labelled and nnActive's
foreground efficiency) and a seed-paired comparison of every strategy against the best random baseline
(``random`` / ``fg_random`` / ``fg_random33``, by ALC) go to ``compare.md`` / ``compare.json``, the plot (Dice
against % labelled and against % of the foreground labelled) to ``compare.png``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from raylearn.config import ConfigError, parse_config
from raylearn.curves import (
    best_random_baseline,
    format_paired,
    format_table,
    paired_comparison,
    plot_compare,
    summarise_runs,
)
from raylearn.experiment import ExperimentConfig, load_experiment

log = logging.getLogger(__name__)

__all__ = ["compare", "compare_cli"]


def compare(base: ExperimentConfig, strategies: Sequence[str], seeds: Sequence[int], out: str | Path,
            resume: bool = True, strategy_params: dict[str, dict] | None = None) -> dict:
    """Run every (strategy, seed) pair and summarise. Returns ``{"rows": [...], "table": str, ...}``."""
    from raylearn.strategies import build_strategy

    if not strategies:
        raise ConfigError("compare: give at least one strategy")
    for name in strategies:  # fail before any run starts
        try:
            build_strategy(name, **(strategy_params or {}).get(name, {}))
        except (ValueError, TypeError, KeyError) as err:
            raise ConfigError(f"compare: --strategies: {err}") from None
        # the strategy against the base model too (e.g. sbc needs model.arch: sbc_unet), as `run` would check it
        parse_config({**base.model_dump(mode="json"),
                      "strategy": {"name": name, "params": (strategy_params or {}).get(name, {})}},
                     ExperimentConfig, source=f"compare --strategies {name}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = base.data.store or str(out / "store")
    # the full-pool reference is trained once for the whole comparison (by the first run) and reused
    reference_dir = out / "reference" if base.evaluate.full_data_reference else None
    from raylearn.tracking import CompareTracker

    # MLflow: a parent run for the comparison, each (strategy, seed) run nested under it in the same store
    tracker = CompareTracker.start(base, out, list(strategies), list(seeds))
    try:
        result = _run_all(base, strategies, seeds, out, resume, strategy_params, store, reference_dir, tracker)
    except BaseException as err:
        if tracker is not None:
            tracker.finish(None, status="KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    if tracker is not None:
        tracker.finish(result)
    return result


def _run_all(base: ExperimentConfig, strategies: Sequence[str], seeds: Sequence[int], out: Path, resume: bool,
             strategy_params: dict[str, dict] | None, store: str, reference_dir: Path | None, tracker) -> dict:
    from raylearn.pool_cache import PoolCache

    pools = PoolCache()  # one set of pool shards for every run (each start is 25-40 s of imports on 2 cores)
    try:
        return _run_each(base, strategies, seeds, out, resume, strategy_params, store, reference_dir, tracker, pools)
    finally:
        pools.close()
        log.info("compare: %d pool start(s), %d re-use(s)", pools.started, pools.reused)


def _run_each(base: ExperimentConfig, strategies: Sequence[str], seeds: Sequence[int], out: Path, resume: bool,
              strategy_params: dict[str, dict] | None, store: str, reference_dir: Path | None, tracker,
              pools) -> dict:
    from raylearn.loop import run_experiment

    curves: dict[str, list[list[tuple]]] = {s: [] for s in strategies}
    references: list[float] = []
    for seed in seeds:
        first_dir: Path | None = None
        for name in strategies:
            run_dir = out / name / f"seed_{seed}"
            update = {
                "name": f"{base.name}-{name}-s{seed}",
                "seed": seed,
                "output_dir": str(run_dir),
                "data": base.data.model_copy(update={"store": store}),
                "strategy": base.strategy.model_copy(update={"name": name,
                                                             "params": (strategy_params or {}).get(name, {})}),
            }
            if tracker is not None:
                update["tracking"] = tracker.child(base.tracking, f"{name}/seed_{seed}")
            cfg = base.model_copy(update=update)
            log.info("compare: %s seed %d -> %s", name, seed, run_dir)
            res = run_experiment(cfg, resume=resume, cold_start_from=first_dir, reference_dir=reference_dir,
                                 pools=pools)
            curves[name].append([(r["fraction_labelled"], r["metrics"].get("dice_mean", float("nan")),
                                  r.get("fraction_fg_labelled")) for r in res.rounds])
            if res.summary.get("full_data_dice") is not None and not references:
                references.append(res.summary["full_data_dice"])
            first_dir = first_dir or run_dir
    reference = float(sum(references) / len(references)) if references else None
    rows = summarise_runs(curves, reference=reference)
    table = format_table(rows, unit=base.unit.kind)
    baseline = best_random_baseline(rows)
    paired = paired_comparison(rows, baseline) if baseline is not None and len(rows) > 1 else []
    if paired:
        table += (f"\n\nPaired by seed against the best random baseline ({baseline}, by ALC):\n"
                  + format_paired(paired, rows[0]["fractions"]))
    result = {"strategies": list(strategies), "seeds": list(seeds), "unit": base.unit.kind,
              "reference_dice": reference, "rows": rows,
              "baseline": baseline, "paired": paired, "table": table}
    tmp = out / "compare.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out / "compare.json")
    (out / "compare.md").write_text(table + "\n")
    plot_compare(rows, out / "compare.png", reference=reference, title=base.name, unit=base.unit.kind)
    return result


def compare_cli(config: str | Path, strategies: Sequence[str], seeds: int = 3, out: str | Path | None = None) -> int:
    """Finished (strategy, seed) runs under ``out`` are re-used; unfinished ones resume from their ledgers."""
    base = load_experiment(config)
    out = Path(out) if out is not None else Path(base.output_dir) / "compare"
    res = compare(base, strategies, list(range(seeds)), out, resume=True)
    print(res["table"])
    print(f"outputs: {out}/compare.md, compare.json, compare.png")
    return 0
