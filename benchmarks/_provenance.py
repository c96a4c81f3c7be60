"""Where a benchmark figure came from: the command, the date, the machine and the load around the run.

Every benchmark JSON under ``benchmarks/results/`` starts with these keys, so that a figure can be checked against
the conditions it was taken in (a pool-scaling ratio read 0.89x at load 6-34 and 1.80x on a quiet machine). Run a
benchmark as ``python benchmarks/NAME.py``: its folder is then first on ``sys.path`` and ``from _provenance import
...`` finds this file.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
from pathlib import Path


def load_avg() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded."""
    return [round(v, 2) for v in os.getloadavg()]


def provenance(load_before: list[float] | tuple[float, ...]) -> dict:
    """The header of a benchmark's result: call it at the end of the run with the load taken at its start."""
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.platform()} | {os.cpu_count()} CPUs | {platform.processor() or platform.machine()}",
        "load_avg_before": [round(v, 2) for v in load_before],
        "load_avg_after": load_avg(),
    }
