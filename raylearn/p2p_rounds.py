"""The promptable model measured per round: does pre-annotation with the model trained here save corrections?

For every recorded round (its segmenter checkpoint and the promptable checkpoint the training service fine-tuned
after it) and every test case, three label maps are scored against the ground truth:

- ``a`` segmenter: the round's segmenter prediction alone;
- ``b`` pre-annotation: segmenter prediction -> ``eval_clicks`` clicks per class simulated from the error region
  against the prediction -> the round's promptable model (:func:`raylearn.p2p.preannotate_volume`);
- ``c`` expert clicks: the same with the clicks simulated against the ground truth.

Scores: P2P's NSD (``(FP + FN) / |P U G|``, %, per class and overall, the share of voxels left to fix) and Dice.
Everything runs on the pool store's grid (cases resampled to SAM-Med3D's spacing for the promptable model, as in
training, and its masks mapped back). Ray tasks, one per chunk of test cases and round; checkpoints travel as
bytes. Writes ``p2p_rounds.csv`` (per round and method), ``p2p_rounds_cases.csv``, ``p2p_rounds.md``,
``p2p_rounds.png`` and ``p2p_rounds.json`` into the run's folder.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from raylearn.tables import write_csv

log = logging.getLogger(__name__)

__all__ = ["METHODS", "check_goals", "measure_rounds", "score_round_cases", "summarise_rounds", "write_rounds"]

METHODS = {"a": "segmenter", "b": "segmenter -> clicks -> promptable", "c": "GT clicks -> promptable"}


def score_round_cases(store, segmenter_ckpt: bytes, promptable_ckpt: bytes, ids: Sequence[str], n_clicks: int,
                      seed: int, round_index: int) -> list[dict]:
    """Rows ``{round, case_id, method, nsd_overall, nsd_<k>, dice_<k>, dice_mean}`` for methods a, b, c (no Ray).

    Args:
        store: the pool store; segmenter_ckpt / promptable_ckpt: checkpoint bytes.
        ids: test case ids; n_clicks: clicks per class; seed: the clicks of case i come from ``[seed, round, i]``.
    """
    from raylearn.models.loading import load_segmenter
    from raylearn.models.promptable_train import load_promptable, stored_image
    from raylearn.models.sam_med3d import prepare_volume
    from raylearn.p2p import preannotate_volume, score_case

    classes = sorted(int(k) for k in store.labels if int(k) != 0)
    with tempfile.TemporaryDirectory(prefix="raylearn-p2p-") as tmp:
        (Path(tmp) / "seg.pt").write_bytes(segmenter_ckpt)
        (Path(tmp) / "sam.pt").write_bytes(promptable_ckpt)
        seg = load_segmenter(Path(tmp) / "seg.pt", device="cpu")
        sam = load_promptable(Path(tmp) / "sam.pt", device="cpu")
    rows = []
    for cid in ids:
        case = store.get(cid)
        gt = np.asarray(case.label).astype(np.uint8)
        pred = seg.predict_label(np.asarray(case.image)).astype(np.uint8)
        volume = prepare_volume(stored_image(case.image, case.spacing), sam.cfg.target_spacing_mm)
        i = zlib.crc32(str(cid).encode())  # the case's clicks do not depend on how the cases were chunked
        maps = {"a": pred}
        for m, ref in (("b", pred), ("c", gt)):
            rng = np.random.default_rng([int(seed), int(round_index), i, ord(m)])
            maps[m] = preannotate_volume(sam, volume, ref, n_clicks, rng, classes=classes).label_maps[n_clicks]
        for m, lab in maps.items():
            s = score_case(lab, gt, classes)
            rows.append({"round": int(round_index), "case_id": cid, "method": m, **s,
                         "dice_mean": float(np.mean([s[f"dice_{k}"] for k in classes]))})
    return rows


def measure_rounds(out: str | Path, store, rounds: list[dict], test_ids: Sequence[str], n_clicks: int = 5,
                   seed: int = 0, max_cases: int | None = None, class_names: dict | None = None) -> dict:
    """Score every round that has a promptable checkpoint (Ray tasks) and write the table, PNG and JSON.

    Args:
        out: the run's folder; rounds: ledger round records (``checkpoint``, ``train_info.promptable.checkpoint``).

    Returns:
        ``{"summary": [...], "goals": {...}, "paths": {...}, "wall_s": s}``.
    """
    import ray

    t0 = time.perf_counter()
    ids = list(test_ids)[: max_cases or None]
    todo = [r for r in rounds if (r.get("train_info") or {}).get("promptable")]
    if not todo:
        raise ValueError("no recorded round has a promptable checkpoint (promptable.enabled was off?)")
    n_chunks = max(1, min(len(ids), int(ray.cluster_resources().get("CPU", 1))))
    task = ray.remote(num_cpus=1, max_retries=2, scheduling_strategy="DEFAULT")(_chunk)
    refs = []
    for r in todo:
        seg_ref = ray.put(Path(r["checkpoint"]).read_bytes())
        sam_ref = ray.put(Path(r["train_info"]["promptable"]["checkpoint"]).read_bytes())
        refs += [task.remote(store, seg_ref, sam_ref, c.tolist(), n_clicks, seed, r["round"])
                 for c in np.array_split(np.asarray(ids), n_chunks) if len(c)]
    rows = [row for part in ray.get(refs) for row in part]
    info = {r["round"]: {"n_labeled": r["n_labeled"], "version": r["train_info"]["promptable"].get("version"),
                         "promptable_loss": r["train_info"]["promptable"].get("loss")} for r in todo}
    summary = summarise_rounds(rows, info)
    goals = check_goals(summary)
    classes = class_names or {int(k): v for k, v in store.labels.items() if int(k) != 0}
    paths = write_rounds(Path(out), rows, summary, goals, {k: v for k, v in classes.items() if int(k) != 0},
                         n_clicks, len(ids))
    wall = time.perf_counter() - t0
    log.info("p2p rounds: %d rounds x %d test cases in %.0f s -> %s", len(todo), len(ids), wall, paths["md"])
    return {"summary": summary, "goals": goals, "paths": {k: str(v) for k, v in paths.items()}, "wall_s": wall}


def _chunk(store, seg_blob, sam_blob, ids, n_clicks, seed, round_index):
    import torch

    torch.set_num_threads(1)
    return score_round_cases(store, seg_blob, sam_blob, ids, n_clicks, seed, round_index)


def summarise_rounds(rows: list[dict], info: dict[int, dict]) -> list[dict]:
    """Means over cases per (round, method), with the round's labelled count and promptable version."""
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["round"], r["method"]), []).append(r)
    out = []
    for (rnd, m), rs in sorted(groups.items()):
        keys = [k for k in rs[0] if k.startswith(("nsd_", "dice_"))]
        out.append({"round": rnd, "n_labeled": info.get(rnd, {}).get("n_labeled"), "method": m,
                    "label": METHODS[m], "n_cases": len(rs), **{k: float(np.mean([r[k] for r in rs])) for k in keys},
                    "promptable_version": info.get(rnd, {}).get("version")})
    return out


def check_goals(summary: list[dict]) -> dict:
    """The issue's goals: (b) leaves less to fix than (a) in every round from round 2 on; (c) <= 20 % NSD in the
    last round."""
    by = {(s["round"], s["method"]): s["nsd_overall"] for s in summary}
    rounds = sorted({s["round"] for s in summary})
    later = [r for r in rounds if r >= 2]
    b_better = {r: by[(r, "b")] < by[(r, "a")] for r in rounds}
    last = rounds[-1]
    return {"b_fewer_corrections_than_a": b_better,
            "b_beats_a_from_round_2": bool(later) and all(b_better[r] for r in later),
            "c_nsd_last_round": by[(last, "c")], "c_at_most_20pct_last_round": by[(last, "c")] <= 20.0}


def write_rounds(out: Path, rows: list[dict], summary: list[dict], goals: dict, classes: dict, n_clicks: int,
                 n_cases: int) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "p2p_rounds.csv", "cases": out / "p2p_rounds_cases.csv", "md": out / "p2p_rounds.md",
             "png": out / "p2p_rounds.png", "json": out / "p2p_rounds.json"}
    write_csv(paths["csv"], summary)
    write_csv(paths["cases"], rows)
    head = ["round", "labelled", "method", "NSD overall (%)"] + [f"NSD {v} (%)" for v in classes.values()] + \
        ["Dice mean"]
    lines = [f"Promptable model per round: {n_cases} test cases, {n_clicks} simulated clicks per class "
             "(NSD: P2P's (FP + FN) / |P U G|, lower is better)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        vals = [f"{s['nsd_overall']:.1f}"] + [f"{s[f'nsd_{k}']:.1f}" for k in classes] + [f"{s['dice_mean']:.3f}"]
        lines.append(f"| {s['round']} | {s['n_labeled']} | ({s['method']}) {s['label']} | " + " | ".join(vals) + " |")
    lines += ["", f"Goals: (b) fewer corrections than (a) from round 2 on: {goals['b_beats_a_from_round_2']} "
              f"(per round: {goals['b_fewer_corrections_than_a']}); (c) <= 20 % NSD in the last round: "
              f"{goals['c_at_most_20pct_last_round']} ({goals['c_nsd_last_round']:.1f} %)."]
    paths["md"].write_text("\n".join(lines) + "\n")
    paths["json"].write_text(json.dumps({"summary": summary, "goals": {**goals, "b_fewer_corrections_than_a": {
        str(k): v for k, v in goals["b_fewer_corrections_than_a"].items()}}, "n_clicks": n_clicks,
        "n_cases": n_cases, "classes": {str(k): v for k, v in classes.items()}}, indent=1))
    _plot(paths["png"], summary, n_clicks, n_cases)
    return paths


def _plot(path: Path, summary: list[dict], n_clicks: int, n_cases: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for m, label in METHODS.items():
        pts = sorted((s["round"], s["nsd_overall"], s["dice_mean"]) for s in summary if s["method"] == m)
        if not pts:
            continue
        rounds, nsd, dsc = zip(*pts, strict=True)
        axes[0].plot(rounds, nsd, marker="o", label=f"({m}) {label}")
        axes[1].plot(rounds, dsc, marker="o", label=f"({m}) {label}")
    axes[0].axhline(20.0, color="grey", ls=":", lw=1, label="goal for (c): 20 %")
    axes[0].set_ylabel("NSD overall (%), lower is better")
    axes[1].set_ylabel("Dice (mean over classes)")
    for ax in axes:
        ax.set_xticks(sorted({s["round"] for s in summary}))
        ax.set_xlabel("round")
        ax.legend(fontsize=7)
    fig.suptitle(f"Promptable model per round ({n_clicks} clicks per class, {n_cases} test cases)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
