"""``raylearn preannotate``: Table 2 of "From Prediction to Prompt" on a run's last model and its test split.

For every test case: the last round's segmenter predicts (on the pool store's preprocessed grid, mapped back to
the source grid); SAM-Med3D is then prompted per class with 1 / 5 / 10 (``--clicks``) clicks simulated from the
error region against a reference, the segmenter's prediction (pre-annotation) and/or the ground truth (the
authors' public script); each mask is scored against the ground truth with the paper's NSD per class and overall
("Average"), beside the segmenter's own prediction. Writes ``preannotate_cases.csv`` (one row per case x method),
``preannotate.csv`` / ``.md`` (means), ``preannotate.png`` (NSD over clicks) and ``preannotate.json``
(provenance) into ``--out`` (default ``<run>/preannotate``). Runs in this process, on the GPU when present.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from raylearn.config import ConfigError
from raylearn.tables import write_csv

log = logging.getLogger(__name__)

__all__ = ["REFERENCES", "preannotate_cli", "run_table", "summarise", "write_table"]

REFERENCES = ("prediction", "gt")


def _run_dir(target: str | Path) -> tuple[Path, dict]:
    """The run folder (an experiment YAML's ``output_dir``, or a run folder itself) and its ledger header."""
    from raylearn.ledger import Ledger

    p = Path(target)
    if p.is_dir():
        run = p
    elif p.is_file():
        from raylearn.experiment import load_experiment

        run = Path(load_experiment(p).output_dir)
    else:
        raise FileNotFoundError(f"{p}: neither an experiment YAML nor a run folder")
    ledger_path = run / "ledger.jsonl"
    if not ledger_path.is_file():
        raise ConfigError(f"{run}: no ledger.jsonl; run `raylearn run` first (or pass the run folder of a "
                          "`raylearn compare` strategy/seed)")
    ledger = Ledger(ledger_path, readonly=True)
    rounds, header = ledger.rounds(), ledger.header()
    if not rounds or header is None:
        raise ConfigError(f"{run}: the ledger records no finished round yet")
    return run, {"header": header, "last": rounds[-1]}


def run_table(target: str | Path, clicks: Sequence[int] = (1, 5, 10), references: Sequence[str] = REFERENCES,
              sam_preset: str = "full", sam_checkpoint: str | None = None, method: str = "random",
              seed: int = 0, max_cases: int | None = None, device: str = "auto") -> tuple[list[dict], dict]:
    """Per-case rows of the Table-2 protocol and the provenance record.

    Returns:
        ``(rows, info)``: rows ``{"case_id", "method", "reference", "clicks", "nsd_<k>", "dice_<k>",
        "nsd_overall"}`` (method ``"segmenter"`` with ``clicks`` 0, or ``"sam_med3d"``).

    Raises:
        ConfigError: no finished round, unknown reference, a missing checkpoint or dataset.
    """
    import SimpleITK as sitk

    from raylearn.data.readers import discover_dataset, read_case
    from raylearn.data.store import PoolStore
    from raylearn.experiment import ExperimentConfig
    from raylearn.models.loading import load_segmenter
    from raylearn.models.sam_med3d import SamMed3D, SamMed3DConfig, prepare_volume
    from raylearn.p2p import preannotate_volume, score_case
    from raylearn.runtime import ensure_store

    bad = [r for r in references if r not in REFERENCES]
    if bad or not references:
        raise ConfigError(f"--reference: unknown {bad or references} (known: {', '.join(REFERENCES)})")
    counts = sorted({int(c) for c in clicks})
    if not counts or counts[0] < 1:
        raise ConfigError(f"--clicks: click counts must be >= 1, got {list(clicks)}")
    run, rec = _run_dir(target)
    header, last = rec["header"], rec["last"]
    ckpt = Path(last["checkpoint"])
    if not ckpt.is_file():
        raise ConfigError(f"{ckpt}: the last round's checkpoint (round {last['round']}) is missing")
    cfg = ExperimentConfig.model_validate(header["config"])
    store = PoolStore.open(cfg.data.store) if cfg.data.store and Path(cfg.data.store).is_dir() else \
        ensure_store(cfg, progress=False)
    dataset = discover_dataset(store.info["dataset"])
    records = {r.case_id: r for r in dataset.cases}
    test_ids = list(header.get("test_ids") or store.case_ids("test"))[: max_cases or None]
    missing = [c for c in test_ids if c not in records]
    if missing:
        raise ConfigError(f"{dataset.root}: test case(s) {missing[:3]} not found in the source dataset")
    classes = sorted(k for k in store.labels if k != 0)
    segmenter = load_segmenter(ckpt, device=None if device == "auto" else device)
    sam = SamMed3D(SamMed3DConfig(preset=sam_preset, checkpoint=sam_checkpoint, device=device))
    rows: list[dict] = []
    t0 = time.perf_counter()
    for i, cid in enumerate(test_ids):
        images, gt_img = read_case(records[cid], store.labels)
        gt = sitk.GetArrayFromImage(gt_img).astype(np.uint8)
        pred = segmenter.predict_label(np.asarray(store.get(cid).image))
        pred = sitk.GetArrayFromImage(store.restore(cid, pred)).astype(np.uint8)
        rows.append({"case_id": cid, "method": "segmenter", "reference": "-", "clicks": 0,
                     **score_case(pred, gt, classes)})
        volume = prepare_volume(images[0], sam.cfg.target_spacing_mm)
        for ref_name in references:
            ref = pred if ref_name == "prediction" else gt
            res = preannotate_volume(sam, volume, ref, counts, np.random.default_rng([seed, i]), classes=classes,
                                     method=method)
            for n in counts:
                rows.append({"case_id": cid, "method": "sam_med3d", "reference": ref_name, "clicks": n,
                             **score_case(res.label_maps[n], gt, classes)})
        log.info("preannotate: case %s (%d/%d) done", cid, i + 1, len(test_ids))
    info = {"run": str(run), "round": last["round"], "checkpoint": str(ckpt), "n_cases": len(test_ids),
            "classes": {k: store.labels[k] for k in classes}, "clicks": counts, "references": list(references),
            "click_method": method, "seed": seed, "sam_med3d": {"preset": sam_preset, "checkpoint": sam_checkpoint,
                                                                "checkpoint_sha256": sam.checkpoint_sha256,
                                                                "device": str(sam.device)},
            "wall_s": round(time.perf_counter() - t0, 1), "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join(sys.argv), "machine": platform.node()}
    return rows, info


def summarise(rows: list[dict]) -> list[dict]:
    """Means over cases per (method, reference, clicks), in the order the rows came."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["reference"], r["clicks"]), []).append(r)
    out = []
    for (method, ref, n), rs in groups.items():
        keys = [k for k in rs[0] if k.startswith(("nsd_", "dice_"))]
        out.append({"method": method, "reference": ref, "clicks": n, "n_cases": len(rs),
                    **{k: float(np.mean([r[k] for r in rs])) for k in keys}})
    return out


def _label(r: dict) -> str:
    return "segmenter" if r["method"] == "segmenter" else f"SAM-Med3D <- {r['reference']}, {r['clicks']} click(s)"


def write_table(out: Path, rows: list[dict], info: dict) -> dict[str, Path]:
    """Write the per-case CSV, the summary CSV + markdown, the PNG and the provenance JSON; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    paths = {"cases": out / "preannotate_cases.csv", "csv": out / "preannotate.csv", "md": out / "preannotate.md",
             "png": out / "preannotate.png", "json": out / "preannotate.json"}
    write_csv(paths["cases"], rows)
    write_csv(paths["csv"], summary)
    classes = info["classes"]
    cols = [f"nsd_{k}" for k in classes] + ["nsd_overall"]
    head = ["method", "n"] + [f"NSD {v} (%)" for v in classes.values()] + ["NSD Average (%)"] + \
        [f"Dice {v}" for v in classes.values()]
    sam = info["sam_med3d"]
    lines = [f"P2P Table 2 protocol on {info['run']} (round {info['round']}, {info['n_cases']} test cases, "
             f"SAM-Med3D {sam['preset']}, checkpoint {sam['checkpoint'] or 'none: random weights'})",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        vals = [f"{r[c]:.1f}" for c in cols] + [f"{r[f'dice_{k}']:.3f}" for k in classes]
        lines.append(f"| {_label(r)} | {r['n_cases']} | " + " | ".join(vals) + " |")
    paths["md"].write_text("\n".join(lines) + "\n")
    paths["json"].write_text(json.dumps({**info, "summary": summary}, indent=1))
    _plot(paths["png"], summary, info)
    return paths


def _plot(path: Path, summary: list[dict], info: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    seg = [r for r in summary if r["method"] == "segmenter"]
    if seg:
        ax.axhline(seg[0]["nsd_overall"], color="k", ls="--", label="segmenter prediction")
    for ref in info["references"]:
        pts = sorted((r["clicks"], r["nsd_overall"]) for r in summary if r["reference"] == ref)
        ax.plot(*zip(*pts, strict=True), marker="o", label=f"SAM-Med3D, clicks from the {ref}")
    ax.set_xlabel("clicks per class")
    ax.set_ylabel("NSD overall (%), lower is better")
    ax.set_xticks(info["clicks"])
    ax.set_title(f"P2P pre-annotation, round {info['round']}, {info['n_cases']} test cases", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def preannotate_cli(target: str, clicks: str = "1,5,10", reference: str = "prediction,gt", out: str | None = None,
                    sam_preset: str = "full", sam_checkpoint: str | None = None, method: str = "random",
                    seed: int = 0, max_cases: int | None = None, device: str = "auto") -> int:
    """``raylearn preannotate``: run the protocol, write the outputs, print the markdown table."""
    try:
        counts = [int(c) for c in clicks.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"--clicks: expected comma-separated integers such as 1,5,10, got {clicks!r}") from None
    refs = [r.strip() for r in reference.split(",") if r.strip()]
    rows, info = run_table(target, counts, refs, sam_preset=sam_preset, sam_checkpoint=sam_checkpoint,
                           method=method, seed=seed, max_cases=max_cases, device=device)
    paths = write_table(Path(out) if out else Path(info["run"]) / "preannotate", rows, info)
    print(paths["md"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
