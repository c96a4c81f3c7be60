"""``unit: slice`` runs end to end on tiny phantoms: slice selections and cost, partial labels, per-slice scores, the
pseudo-labelling hook (a test-only strategy that copies the nearest annotated slice), and resuming from the ledger
with the stage's recorded result. Config refusals run without Ray."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from raylearn.config import ConfigError, parse_config
from raylearn.experiment import ExperimentConfig
from raylearn.ledger import Ledger
from raylearn.strategies.base import STRATEGIES, PoolView, QueryStrategy, register_strategy
from raylearn.units import PropagationContext, PropagationResult, parse_unit, unit_id

TINY = {
    "name": "tiny-slices",
    "seed": 3,
    "data": {"dataset": "phantom", "phantom": {"n_cases": 8, "shape": [16, 16, 16], "seed": 1}, "n_test": 2},
    "unit": {"kind": "slice", "axis": 2},
    "cold_start": {"strategy": "random", "size": 8},
    "strategy": {"name": "random"},
    "schedule": {"rounds": 1, "batch_size": 4},
    "model": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
    "train": {"first_round_steps": 4, "steps": 2, "batch_size": 2, "checkpoint_every": 50, "log_every": 5,
              "num_workers": 1},
    "pool": {"n_shards": 1, "num_cpus": 0.25, "progress": False},
    "evaluate": {"hd95": False, "surface_dice_tolerance_mm": None},
}


def _cfg(tmp: Path, name: str, **over) -> ExperimentConfig:
    data = json.loads(json.dumps(TINY))
    data["output_dir"] = str(tmp / name)
    data["data"]["store"] = str(tmp.parent / "store")  # one store for the module's runs
    data.update(over)
    return parse_config(data, ExperimentConfig, source=name)


# -- a test-only strategy with a pseudo-labelling stage -----------------------------------------------------------
class CopyNearest(QueryStrategy):
    """Pseudo-labels each unannotated slice next to an annotated one with that slice's labels; scores every other
    unannotated slice by its distance to the nearest annotated slice; selects the highest scores (NaN last)."""

    units = frozenset({"slice"})
    requires = frozenset({"propagation_score"})

    def _select(self, pool: PoolView, budget: int) -> np.ndarray:
        scores = np.nan_to_num(np.asarray(pool.features["propagation_score"], dtype=float), nan=-1.0)
        free = pool.unlabeled_index
        return free[np.argsort(-scores[free], kind="stable")[:budget]]

    def propagate(self, ctx: PropagationContext) -> PropagationResult:
        (ctx.work_dir / "calls").write_text("called")  # the stage owns its work_dir
        calls = ctx.work_dir.parent / "calls.txt"
        calls.write_text(calls.read_text() + f"{ctx.round_index}\n" if calls.exists() else f"{ctx.round_index}\n")
        by_case: dict[str, list[int]] = {}
        for uid in ctx.labelled_units:
            u = parse_unit(uid)
            by_case.setdefault(u.case, []).append(u.index)
        pseudo, scores = {}, {}
        for cid in ctx.case_ids:
            label, annotated = ctx.label(cid)
            n = label.shape[ctx.axis]
            have = sorted(by_case.get(cid, []))
            if not have:
                continue
            filled = np.zeros(label.shape, bool)
            out = np.zeros(label.shape, np.uint8)
            for i in range(n):
                if i in have:
                    continue
                nearest = min(have, key=lambda j: (abs(j - i), j))
                if abs(nearest - i) == 1:
                    idx = (slice(None),) * ctx.axis + (i,)
                    src = (slice(None),) * ctx.axis + (nearest,)
                    out[idx], filled[idx] = label[src], True
                scores[unit_id(cid, ctx.axis, i)] = float(abs(nearest - i))
            assert not (filled & annotated).any()
            pseudo[cid] = (out, filled)
        return PropagationResult(pseudo=pseudo, unit_scores=scores, info={"kept": len(pseudo), "note": "test"})


@pytest.fixture(scope="module")
def copy_nearest():
    """``copy_nearest`` registered for this module's tests only (the contract tests cover the shipped strategies)."""
    register_strategy("copy_nearest")(CopyNearest)
    yield "copy_nearest"
    STRATEGIES.pop("copy_nearest", None)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("slice_runs") / "runs"


def _run(cfg: ExperimentConfig, **kw):
    from raylearn.loop import run_experiment

    return run_experiment(cfg, progress=False, **kw)


# -- config -------------------------------------------------------------------------------------------------------
def test_unit_config_shapes_and_refusals(tmp_path, copy_nearest):
    assert _cfg(tmp_path, "a").unit.axis == 2
    assert _cfg(tmp_path, "b", unit="slice").unit.kind == "slice"
    assert _cfg(tmp_path, "c", unit="volume", strategy={"name": "random"}).unit.kind == "volume"
    for over, match in [
        ({"unit": "slices"}, "unit: must be 'volume', 'slice', 'patch'"),
        ({"unit": {"kind": "slice", "axis": 3}}, "unit.axis"),
        ({"unit": {"kind": "slice", "index": 1}}, "unit.index: unknown key"),
        ({"unit": {"kind": "slice", "size": 4}}, "unit.size: only patch units have a size"),
        ({"strategy": {"name": "typiclust"}}, "strategy.name: 'typiclust' does not support unit: slice"),
        ({"strategy": {"name": "kcenter"}}, "'kcenter' does not support unit: slice"),
        ({"cold_start": {"strategy": "fg_random", "params": {"variant": "predicted_cover"}}},
         "cold_start.strategy: 'fg_random' does not support"),
        ({"model": {"backend": "nnunet"}}, "model.backend: nnunet"),
        ({"oracle": "human"}, "oracle: human"),
        ({"schedule": {"mode": "async"}}, "schedule.mode: async"),
        ({"train": {"val_fraction": 0.2}}, "train.val_fraction"),
        ({"unit": "volume", "strategy": {"name": "copy_nearest"}}, "does not support unit: volume"),
    ]:
        with pytest.raises(ConfigError, match=match):
            _cfg(tmp_path, "bad", **over)


def test_volume_runs_hash_as_before(tmp_path):
    from raylearn.loop import _config_json

    plain = _cfg(tmp_path, "v", unit="volume")
    assert "unit" not in _config_json(plain)  # runs from before slice units resume without a config change
    assert _config_json(_cfg(tmp_path, "s"))["unit"] == {"kind": "slice", "axis": 2}


# -- end to end ---------------------------------------------------------------------------------------------------
def _check_slice_run(res, n_pool_slices: int) -> None:
    rounds = res.rounds
    assert [r["n_labeled"] for r in rounds] == [8, 12]
    chosen = [u for r in rounds for u in r["selected"]]
    assert len(set(chosen)) == 12 and all(parse_unit(u).axis == 2 for u in chosen)
    assert rounds[-1]["fraction_labelled"] == pytest.approx(12 / n_pool_slices)
    assert all(r["unit"] == "slice" and r["n_units"] == n_pool_slices for r in rounds)
    from raylearn.annotation.labels import LabelStore

    labels = LabelStore(res.output_dir / "labels")
    assert sorted(labels.labelled_units()) == sorted(chosen)  # the oracle revealed exactly the chosen slices
    for cid in {parse_unit(u).case for u in chosen}:
        _, mask = labels.read_masked(cid)
        assert mask.sum() == 16 * 16 * sum(parse_unit(u).case == cid for u in chosen)
    assert rounds[-1]["train_info"]["n_train"] == len({parse_unit(u).case for u in chosen})
    rows = list(csv.DictReader((res.output_dir / "rounds.csv").open()))
    assert rows[-1]["unit"] == "slice" and float(rows[-1]["fraction_labelled"]) == pytest.approx(12 / n_pool_slices,
                                                                                                  abs=1e-4)
    summary = json.loads((res.output_dir / "summary.json").read_text())
    assert summary["unit"] == "slice" and summary["n_labeled"] == 12
    assert 0.0 <= rounds[-1]["metrics"]["dice_mean"] <= 1.0  # evaluated on whole test volumes


@pytest.mark.slow  # a whole run: Ray Train's start-up alone is ~20 s
def test_random_slices_end_to_end(ray_session, runs_dir):
    res = _run(_cfg(runs_dir, "random"))
    header = Ledger(res.output_dir / "ledger.jsonl").header()
    _check_slice_run(res, 16 * len(header["pool_ids"]))
    assert res.rounds[-1]["scores"] is None


@pytest.mark.slow
def test_uncertainty_on_slices_end_to_end(ray_session, runs_dir):
    res = _run(_cfg(runs_dir, "entropy", strategy={"name": "entropy"}))
    header = Ledger(res.output_dir / "ledger.jsonl").header()
    _check_slice_run(res, 16 * len(header["pool_ids"]))
    scores = res.rounds[1]["scores"]["entropy"]  # per-slice scores of the chosen slices, highest first
    assert len(scores) == 4 and scores == sorted(scores, reverse=True) and all(np.isfinite(scores))


@pytest.mark.slow
def test_propagation_hook_and_resume_from_the_ledger(ray_session, runs_dir, copy_nearest):
    """The stage runs after each round's labels and before training, writes pseudo-labels (never cost) and scores
    that drive the next selection; a run killed after the stage of its last round resumes without running it
    again and records the same round."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the Ray task unpickles the test strategy
    cfg = _cfg(runs_dir, "prop", strategy={"name": "copy_nearest"}, schedule={"rounds": 2, "batch_size": 4})
    res = _run(cfg)
    out = res.output_dir
    ledger = Ledger(out / "ledger.jsonl")
    assert [r["round"] for r in ledger.of_kind("propagated")] == [0, 1, 2]
    assert (out / "propagation" / "calls.txt").read_text().split() == ["0", "1", "2"]
    assert (out / "propagation" / "round_01" / "calls").exists()
    # round 1 selected the slices farthest from any annotated slice of round 0 (the stage's scores)
    scores0 = json.loads((out / "propagation" / "round_00.scores.json").read_text())["unit_scores"]
    top = sorted(scores0.values(), reverse=True)[:4]
    assert [scores0[u] for u in res.rounds[1]["selected"]] == top
    assert res.rounds[1]["scores"]["propagation_score"] == top
    from raylearn.annotation.labels import LabelStore

    labels = LabelStore(out / "labels")
    assert labels.pseudo_ids() and sorted(labels.labelled_units()) == sorted(u for r in res.rounds
                                                                              for u in r["selected"])
    prop = res.rounds[-1]["propagation"]
    assert prop["round"] == 2 and prop["info"] == {"kept": prop["info"]["kept"], "note": "test"}
    # training read the cases with pseudo-labels too
    assert res.rounds[-1]["train_info"]["n_train"] == len(set(labels.labelled_ids()) | set(labels.pseudo_ids()))
    assert res.rounds[-1]["n_labeled"] == 16  # pseudo-labels are not cost

    # "kill" after round 2's stage was recorded: drop the round record, resume
    lines = (out / "ledger.jsonl").read_text().splitlines(keepends=True)
    kinds = [json.loads(line)["payload"]["kind"] for line in lines]
    cut = max(i for i, k in enumerate(kinds) if k == "propagated") + 1
    assert kinds[cut:] == ["round"]
    (out / "ledger.jsonl").write_text("".join(lines[:cut]))
    again = _run(cfg, resume=True)
    assert (out / "propagation" / "calls.txt").read_text().split() == ["0", "1", "2"]  # the stage was not rerun
    assert [r["selected"] for r in again.rounds] == [r["selected"] for r in res.rounds]
    assert again.rounds[-1]["propagation"]["round"] == 2
