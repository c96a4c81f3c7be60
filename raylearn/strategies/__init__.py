"""raylearn.strategies: query strategies (scikit-learn style) and their registry. No Ray.

Importing this package registers every strategy module in :data:`STRATEGIES`.
"""

from raylearn.strategies import clasp, csal3d, diversity, hybrid, random, sbc, star, sugfw, uncertainty  # noqa: F401  (registers)
from raylearn.strategies.base import (
    STRATEGIES,
    PoolView,
    QueryStrategy,
    build_strategy,
    register_strategy,
)

__all__ = ["STRATEGIES", "PoolView", "QueryStrategy", "build_strategy", "register_strategy"]
