"""Small table writers shared by the result reports (no Ray, no plotting)."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """Write ``rows`` as a CSV file with a header line.

    Args:
        path: the file to (over)write.
        rows: one mapping per line, column name -> value.
        columns: the header, in order (default: the first row's keys). A row with a key outside it is an error.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    fieldnames = list(columns) if columns is not None else list(rows[0])
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fieldnames)
        w.writeheader()
        w.writerows(rows)
    return path
