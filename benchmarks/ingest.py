"""Ingest benchmark: the hippocampus dataset into a pool store, then random-access reads, in one run.

Measures:

- ingest throughput (cases/s) of all cases with the default ``PreprocessConfig`` (1 process);
- peak resident memory (RSS) of the process (``resource.getrusage``) and the RSS before ingesting;
- random-access read time per case (random order, several passes, median per case) of
  (a) ``PoolStore.get`` touching every byte of image and label (memory-mapped, zero-copy),
  (b) ``PoolStore.get`` alone (returns views; nothing read yet),
  (c) reading image + label NIfTI with SimpleITK into numpy,
  (d) (c) followed by the same preprocessing the store holds,
  and the ratios (c)/(a) and (d)/(a). All timings with a warm page cache (files read just before).

Usage::

    .venv/bin/python benchmarks/ingest.py
    .venv/bin/python benchmarks/ingest.py --dataset DIR --repeats 5 --out benchmarks/results/ingest.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "msd_hippocampus"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def _per_case(fn, ids: list[str], repeats: int) -> float:
    """Median over ``repeats`` passes of the mean seconds per case of ``fn(case_id)``."""
    passes = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for cid in ids:
            fn(cid)
        passes.append((time.perf_counter() - t0) / len(ids))
    return statistics.median(passes)


def main(argv: list[str] | None = None) -> dict:
    import numpy as np
    import SimpleITK as sitk

    from raylearn.data.preprocess import PreprocessConfig, preprocess_case
    from raylearn.data.readers import discover_dataset, read_case
    from raylearn.data.store import PoolStore, ingest

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--repeats", type=int, default=3, help="passes over all cases per read method")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ingest.json")
    args = ap.parse_args(argv)
    if not (args.dataset / "dataset.json").is_file():
        sys.exit(f"dataset not found: {args.dataset}")

    cfg = PreprocessConfig()
    tmp = Path(tempfile.mkdtemp(prefix="raylearn-ingest-bench-"))
    try:
        rss_before = _rss_mb()
        t0 = time.perf_counter()
        report = ingest(args.dataset, tmp / "store", cfg, seed=args.seed, progress=False)
        ingest_s = time.perf_counter() - t0
        peak_after_ingest = _peak_rss_mb()
        t0 = time.perf_counter()
        store = PoolStore.open(tmp / "store")
        open_ms = (time.perf_counter() - t0) * 1e3

        info = discover_dataset(args.dataset)
        records = {r.case_id: r for r in info.cases}
        ids = list(np.random.default_rng(args.seed).permutation(store.case_ids()))

        def store_touch(cid):
            c = store.get(cid)
            float(c.image.sum())
            int(c.label.sum(dtype=np.int64))

        def store_view(cid):
            store.get(cid)

        def nifti_raw(cid):
            rec = records[cid]
            sitk.GetArrayFromImage(sitk.ReadImage(str(rec.image_paths[0])))
            sitk.GetArrayFromImage(sitk.ReadImage(str(rec.label_path)))

        def nifti_pre(cid):
            preprocess_case(*read_case(records[cid], info.labels), cfg)

        for fn in (store_touch, nifti_raw):  # warm the page cache and code paths once
            for cid in ids[:20]:
                fn(cid)
        t_touch = _per_case(store_touch, ids, args.repeats)
        t_view = _per_case(store_view, ids, args.repeats)
        t_raw = _per_case(nifti_raw, ids, args.repeats)
        t_pre = _per_case(nifti_pre, ids, args.repeats)
        store_bytes = sum(p.stat().st_size for p in (tmp / "store").rglob("*") if p.is_file())
        source_bytes = sum(p.stat().st_size for r in info.cases for p in (*r.image_paths, r.label_path))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "dataset": str(args.dataset),
        "cases": report.n_cases,
        "splits": {"pool": report.n_pool, "test": report.n_test},
        "preprocess": cfg.model_dump(mode="json"),
        "ingest_s": round(ingest_s, 2),
        "ingest_cases_per_s": round(report.n_cases / ingest_s, 1),
        "rss_before_ingest_mb": rss_before,
        "peak_rss_mb": peak_after_ingest,
        "store_mb": round(store_bytes / 2**20, 1),
        "source_mb": round(source_bytes / 2**20, 1),
        "store_open_ms": round(open_ms, 2),
        "read_ms_per_case": {
            "store_get_touch_all_bytes": round(t_touch * 1e3, 4),
            "store_get_view_only": round(t_view * 1e3, 4),
            "nifti_sitk_image_plus_label": round(t_raw * 1e3, 4),
            "nifti_sitk_plus_preprocess": round(t_pre * 1e3, 4),
        },
        "ratio_nifti_raw_over_store": round(t_raw / t_touch, 1),
        "ratio_nifti_preprocess_over_store": round(t_pre / t_touch, 1),
        "repeats": args.repeats,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        },
    }
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
