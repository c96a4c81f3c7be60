"""``raylearn demo``: the main job on the embedded default data.

A small AL experiment on the 60 MSD hippocampus cases shipped in the package (``demo_data/demo.yaml``):
random cold start, then rounds of the configured uncertainty strategy and of random from the same round 0,
and the full-pool reference; one plot (``compare.png``) with both curves and the reference line.
"""

from __future__ import annotations

from pathlib import Path

from raylearn.runtime import DEMO_DATA

__all__ = ["DEMO_CONFIG", "demo_cli"]

DEMO_CONFIG = DEMO_DATA / "demo.yaml"


def demo_cli(out: str | Path = "runs/demo", config: str | Path | None = None) -> int:
    """Run (or resume) the demo into ``out``; prints a line per round and the comparison table."""
    from raylearn.compare import compare
    from raylearn.experiment import load_experiment

    cfg = load_experiment(config or DEMO_CONFIG, {"output_dir": str(out)})
    strategies = list(dict.fromkeys([cfg.strategy.name, "random"]))
    res = compare(cfg, strategies, [cfg.seed], out, resume=True)
    print(res["table"])
    print(f"outputs: {out}/compare.png (learning curves + full-pool line), compare.md, "
          f"<strategy>/seed_{cfg.seed}/rounds.csv")
    return 0
