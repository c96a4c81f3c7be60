"""raylearn.data: datasets on disk -> preprocessed, memory-mapped pool store (no Ray here).

Modules: ``readers`` (MSD / nnU-Net raw / folder layouts, SimpleITK), ``imageio`` (checked file reads),
``preprocess`` (reorient, resample, crop, normalise, pad, and the inverse), ``phantom`` (the embedded
synthetic dataset), ``store`` + ``shards`` (Arrow IPC shards, Parquet manifest, ``PoolStore``),
and ``fetch`` (MSD download via MONAI). The command line (``raylearn ingest``, ``raylearn data ...``) lives in
:mod:`raylearn.cli`.
"""
