"""Sharing round 0 across the strategies of a comparison, as the papers do.

``compare`` runs several strategies from the same cold-start set. The first run's round-0 selection is
re-used by the others; its round-0 model too when everything that shapes it (seed, data, cold start, the
resolved model, training recipe, evaluation) is identical: training is deterministic for a seed, so
retraining would give the same checkpoint. The shared checkpoint carries the training state, so the next
run's training service continues from it exactly.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from raylearn.config import ConfigError
from raylearn.ledger import Ledger, config_hash

__all__ = ["share_round0"]

log = logging.getLogger(__name__)

_ROUND0_KEYS = ("seed", "data", "cold_start", "train", "unit")


def share_round0(other_dir: Path, ledger: Ledger, cfg_json: dict, model_cfg, out: Path,
                 share_model: bool = True) -> bool:
    """Copy ``other_dir``'s round-0 selection (and model when shareable) into ``ledger``; True if the model was.

    ``share_model=False`` (this run's strategy pseudo-labels before training, slice units), or a pseudo-labelling
    stage in the other run's round 0, keep the selection only: the round-0 model depends on the pseudo-labels."""
    other = Ledger(Path(other_dir) / "ledger.jsonl", readonly=True)
    sel = other.selection(0)
    if sel is None:
        raise ConfigError(f"{other_dir}: has no round-0 selection to share")
    ledger.append("selected", round=0, ids=sel["ids"], scores=None, shared_from=str(other_dir))
    rec = next((r for r in other.rounds() if r["round"] == 0), None)
    hdr = other.header()
    if rec is None or hdr is None or any(hdr["config"].get(k) != cfg_json.get(k) for k in _ROUND0_KEYS):
        return False
    if not share_model or other.propagation(0) is not None:
        return False
    if hdr.get("model_resolved") != model_cfg.model_dump(mode="json"):
        return False  # e.g. MC-dropout strategies train with dropout, others without
    ev, ev_other = cfg_json["evaluate"], hdr["config"]["evaluate"]
    if (ev["hd95"], ev["max_test_cases"]) != (ev_other["hd95"], ev_other["max_test_cases"]):
        return False
    dst = out / "checkpoints" / "round_00.pt"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(rec["checkpoint"], dst.with_suffix(".tmp"))
    os.replace(dst.with_suffix(".tmp"), dst)
    payload = {k: v for k, v in rec.items() if k != "kind"}
    ledger.append("round", **{**payload, "checkpoint": str(dst), "shared_from": str(other_dir),
                              "config_hash": config_hash(cfg_json)})
    log.info("round 0 shared from %s (same cold-start set, model and training config)", other_dir)
    return True
