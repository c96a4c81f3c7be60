"""Which promptable-model settings make pre-annotation worth it: the same training, one setting changed at a time.

The per-round benchmark (``benchmarks/p2p_rounds.py``) runs a whole AL experiment; this one isolates the promptable
model. For each setting it trains the small SAM-Med3D from scratch (CPU, one thread, seeded: the same setting gives
the same figures) for ``--steps`` steps on the first ``--train-cases`` pool cases of a hippocampus store, with
SAM-Med3D's recipe (:class:`raylearn.models.promptable_train.PromptableTrainer`), then scores the first
``--test-cases`` test cases exactly as the per-round measurement does (:func:`raylearn.p2p_rounds.score_round_cases`):

- (a) the segmenter's prediction alone (``--segmenter``, e.g. the last round of a ``p2p_rounds.py`` run),
- (b) prediction -> 5 clicks per class from the error region against the prediction -> promptable model,
- (c) 5 clicks per class against the ground truth -> promptable model.

NSD is P2P's ((FP + FN) / |P U G|, %, lower is better). Settings are ``name:key=value,key=value`` over the
``promptable:`` section (e.g. ``p4_1mm:patch_size=4,target_spacing_mm=1.0``). Writes
``benchmarks/results/promptable_settings.json`` (with the command, date, machine and load average)::

    .venv/bin/python benchmarks/p2p_rounds.py       # once: the store and the round-4 segmenter it uses
    .venv/bin/python benchmarks/promptable_settings.py \\
        --settings base:patch_size=8 p4:patch_size=4 p4_1mm:patch_size=4,target_spacing_mm=1.0

Quality figures do not depend on the machine's load (training is seeded and single-threaded); the seconds do.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _provenance import load_avg, provenance  # noqa: E402

log = logging.getLogger("promptable_settings")

BASE = {"enabled": True, "variant": "small", "batch_size": 4, "clicks": 5, "lr": 0.001}


def parse_setting(text: str) -> tuple[str, dict]:
    """``"name:key=value,key=value"`` -> ``(name, {key: value})`` (values parsed as YAML scalars)."""
    name, _, body = text.partition(":")
    if not name:
        raise SystemExit(f"--settings {text!r}: expected name:key=value,...")
    params = {}
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--settings {text!r}: {item!r} is not key=value")
        params[key.strip()] = yaml.safe_load(value)
    return name, params


def run_setting(store, seg_bytes: bytes, train_ids: list[str], test_ids: list[str], params: dict, steps: int,
                seed: int) -> dict:
    """Train one setting and score it; returns the NSD/Dice means per method, the loss and the seconds."""
    import torch

    from raylearn.config import parse_config
    from raylearn.models.promptable import PromptableConfig
    from raylearn.models.promptable_train import PromptableTrainer, model_grid_case
    from raylearn.p2p_rounds import score_round_cases

    torch.set_num_threads(1)
    cfg = parse_config({**BASE, **params}, PromptableConfig, source="promptable")
    trainer = PromptableTrainer(cfg, seed=seed)
    cases = []
    for cid in train_ids:
        case = store.get(cid)
        array, label = model_grid_case(case.image, case.label, case.spacing, trainer.target_spacing_mm)
        cases.append((cid, array, label))
    t0 = time.perf_counter()
    losses = trainer.fit(cases, steps, seed=[seed],
                         on_step=lambda s, loss: s % 100 == 0 and log.info("  step %d loss %.3f", s, loss))
    train_s = time.perf_counter() - t0
    rows = score_round_cases(store, seg_bytes, trainer.checkpoint_bytes({"version": "bench"}), test_ids, 5, seed,
                             round_index=4)
    out = {"train_s": round(train_s, 1), "loss_last50": float(np.mean(losses[-50:])),
           "trainable_params": trainer.num_trainable, "low_res_size": trainer.sam_cfg.low_res_size}
    for m in ("a", "b", "c"):
        mine = [r for r in rows if r["method"] == m]
        out[f"nsd_{m}"] = round(float(np.mean([r["nsd_overall"] for r in mine])), 2)
        out[f"dice_{m}"] = round(float(np.mean([r["dice_mean"] for r in mine])), 4)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", type=Path, default=REPO / "runs" / "p2p_rounds" / "store")
    p.add_argument("--segmenter", type=Path, default=REPO / "runs" / "p2p_rounds" / "run" / "checkpoints" /
                   "round_04.pt")
    p.add_argument("--settings", nargs="+", required=True, help="name:key=value,... over promptable:")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--train-cases", type=int, default=20)
    p.add_argument("--test-cases", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "promptable_settings.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from raylearn.data.store import PoolStore

    for path, what in ((args.store, "store"), (args.segmenter, "segmenter")):
        if not path.exists():
            raise SystemExit(f"--{what} {path} does not exist: run benchmarks/p2p_rounds.py first, or name one")
    settings = [parse_setting(s) for s in args.settings]
    store = PoolStore.open(args.store)
    train_ids = sorted(store.case_ids("pool"))[: args.train_cases]
    test_ids = sorted(store.case_ids("test"))[: args.test_cases]
    seg_bytes = args.segmenter.read_bytes()
    load_before = load_avg()
    results = []
    for name, params in settings:
        log.info("setting %s %s: %d steps on %d cases", name, params, args.steps, len(train_ids))
        res = {"name": name, "params": params, **run_setting(store, seg_bytes, train_ids, test_ids, params,
                                                              args.steps, args.seed)}
        log.info("setting %s: NSD a %.1f  b %.1f  c %.1f  (%.0f s)", name, res["nsd_a"], res["nsd_b"], res["nsd_c"],
                 res["train_s"])
        results.append(res)
    report = {**provenance(load_before), "steps": args.steps, "train_cases": len(train_ids),
              "test_cases": len(test_ids), "segmenter": str(args.segmenter), "seed": args.seed, "base": BASE,
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"{'setting':<12} {'NSD a':>7} {'NSD b':>7} {'NSD c':>7} {'train s':>8}")
    for r in results:
        print(f"{r['name']:<12} {r['nsd_a']:>7.1f} {r['nsd_b']:>7.1f} {r['nsd_c']:>7.1f} {r['train_s']:>8.0f}")
    return report


if __name__ == "__main__":
    main()
