"""The round coordinator: the actor between the driver and the persistent Ray Train workers.

The driver submits rounds (labelled ids, step budget, seed); workers block in :meth:`next_round` until one
is there, train it, and rank 0 hands back the round's weights with :meth:`done` (and, when the promptable model
is fine-tuned too, its weights with :meth:`prompt_done` after that phase). The labelled set of a round
may grow while it trains (:meth:`extend`): workers poll :meth:`labels` between steps, which is how people
labelling through the annotation API feed a round that is already running. A round submitted with ``hold``
keeps training past its step budget until the driver calls :meth:`release` (asynchronous labelling: the trainer
goes on learning from the labels it has while it waits for the round's labels, instead of idling).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray

__all__ = ["RoundCoordinator"]


@ray.remote(num_cpus=0, max_restarts=0, scheduling_strategy="DEFAULT")
class RoundCoordinator:
    """Async actor holding submitted rounds, their results, worker registrations and progress."""

    def __init__(self) -> None:
        self._rounds: dict[int, dict[str, Any]] = {}
        self._results: dict[int, dict[str, Any]] = {}
        self._prompt_results: dict[int, dict[str, Any]] = {}  # the promptable model's phase of each round
        self._workers: list[dict[str, Any]] = []
        self._progress: dict[str, Any] = {}
        self._stopped = False
        self._cond: asyncio.Condition | None = None

    def _c(self) -> asyncio.Condition:
        if self._cond is None:  # created inside the actor's event loop
            self._cond = asyncio.Condition()
        return self._cond

    async def submit(self, spec: dict[str, Any]) -> None:
        """Driver: queue round ``spec["round"]`` (``ids``, ``steps``, ``seed``, optional ``hold``); a resubmission
        replaces it."""
        async with self._c():
            self._rounds[int(spec["round"])] = {**spec, "version": 0}
            self._results.pop(int(spec["round"]), None)
            self._c().notify_all()

    async def extend(self, round_index: int, ids: list[str]) -> int:
        """Add labelled ids to a submitted round (asynchronous labelling); returns the new label version."""
        async with self._c():
            spec = self._rounds[int(round_index)]
            new = [i for i in ids if i not in set(spec["ids"])]
            if new:
                spec["ids"] = [*spec["ids"], *new]
                spec["version"] += 1
            return spec["version"]

    async def release(self, round_index: int) -> int:
        """Driver: a held round may end; returns the new version.

        Released within its step budget, the round ends at the budget. Released past it, the round ends at a
        step every worker will still see coming: a multiple of the workers' poll interval at least 4 polls past
        rank 0's last reported step (data-parallel workers must stop at the same step)."""
        async with self._c():
            spec = self._rounds[int(round_index)]
            if spec.get("hold"):
                poll = max(1, int(spec.get("poll", 1)))
                at = int(self._progress.get("step", 0)) if self._progress.get("round") == int(round_index) else 0
                if at + 4 * poll > int(spec["steps"]):
                    spec["steps"] = -(-(at + 4 * poll) // poll) * poll
                spec["hold"] = False
                spec["version"] += 1
            return spec["version"]

    def labels(self, round_index: int, version: int) -> tuple[int, list[str], bool, int] | None:
        """Workers: ``(version, ids, hold, steps)`` when the round changed since ``version``, else None."""
        spec = self._rounds.get(int(round_index))
        if spec is None or spec["version"] == version:
            return None
        return spec["version"], list(spec["ids"]), bool(spec.get("hold", False)), int(spec["steps"])

    async def next_round(self, after: int) -> dict[str, Any] | None:
        """Workers: block until a round later than ``after`` is submitted (the earliest) or the service stops."""
        async with self._c():
            while True:
                later = sorted(r for r in self._rounds if r > after)
                if later:
                    return dict(self._rounds[later[0]])
                if self._stopped:
                    return None
                await self._c().wait()

    async def done(self, round_index: int, result: dict[str, Any]) -> None:
        """Rank 0: the round's result (metrics and the published checkpoint bytes)."""
        async with self._c():
            self._results[int(round_index)] = {**result, "published_at": time.time()}
            self._c().notify_all()

    async def wait_result(self, round_index: int, timeout_s: float) -> dict[str, Any] | None:
        """Driver: the round's result, or None after ``timeout_s`` (the driver then checks the trainer)."""
        async with self._c():
            try:
                await asyncio.wait_for(self._c().wait_for(lambda: int(round_index) in self._results), timeout_s)
            except TimeoutError:
                return None
            return self._results[int(round_index)]

    async def prompt_done(self, round_index: int, result: dict[str, Any]) -> None:
        """Rank 0: the promptable model's result for the round (metrics and its checkpoint bytes)."""
        async with self._c():
            self._prompt_results[int(round_index)] = {**result, "published_at": time.time()}
            self._c().notify_all()

    async def wait_prompt(self, round_index: int, timeout_s: float) -> dict[str, Any] | None:
        """Driver: the promptable model's result of the round, or None after ``timeout_s``."""
        async with self._c():
            try:
                await asyncio.wait_for(self._c().wait_for(lambda: int(round_index) in self._prompt_results),
                                       timeout_s)
            except TimeoutError:
                return None
            return self._prompt_results[int(round_index)]

    async def stop(self) -> None:
        async with self._c():
            self._stopped = True
            self._c().notify_all()

    def hello(self, rank: int, pid: int, attempt: int, placement_group: str | None = None) -> None:
        """Workers register at start: one entry per worker process the service ever started, with the hex id of
        the worker group's placement group."""
        self._workers.append({"rank": rank, "pid": pid, "attempt": attempt, "time": time.time(),
                              "placement_group": placement_group})

    def progress(self, round_index: int, step: int, steps: int, loss: float) -> None:
        self._progress = {"round": round_index, "step": step, "steps": steps, "loss": loss, "time": time.time()}

    def status(self) -> dict[str, Any]:
        """``{workers, progress, submitted, finished}`` for monitoring and tests."""
        return {"workers": list(self._workers), "progress": dict(self._progress),
                "submitted": sorted(self._rounds), "finished": sorted(self._results),
                "promptable_finished": sorted(self._prompt_results)}
