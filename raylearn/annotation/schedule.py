"""Rounds driven by labels: ``schedule.mode: sync | async`` (what :func:`raylearn.loop.run_experiment` asks).

The round loop stays one loop; a schedule decides four things in it:

- ``view(view, labeled)``: which cases the strategy may pick. Sync: unchanged (the same selections as ever for a
  seed). Async: cases labelled meanwhile, and cases somebody holds a lease on, count as labelled.
- ``budget(b, view)``: sync ``b``; async ``b + lookahead`` ranked suggestions (annotators never run dry).
- ``collect(r, chosen, labeled, checkpoint)``: publishes the suggestions to the annotation workspace (the API
  serves them) and returns the round's labels. Sync: the oracle labels ``chosen`` (simulated: ground truth into
  the label store; human: waits for the uploads). Async: a round starts once ``labels_per_round`` *new* labels
  (any cases) are in, or ``round_timer_s`` passed with at least one; round 0 starts on the first cold-start
  label (the trainer does not wait for the whole cold start). The round takes every label that has arrived,
  up to the label budget (``schedule.max_labeled``): expert time is the scarce resource, so no finished label
  waits a round for a quota. Once the budget is spent, the remaining rounds train on the labels there are
  (so an async run trains as many rounds, and steps, as a sync one) and suggest nothing.
- ``fit(trainer, r, labeled, seed)``: sync: one blocking round. Async: the round is submitted and labels that
  arrive while it trains join it (``TrainingService.extend_round``; the workers pick them up between steps);
  returns those ids too. With ``schedule.train_while_waiting`` (default) a round short of its labels is
  *held*: it keeps training past its step budget on the labels it has until they are in (or the timer), then
  it is released (``TrainingService.release_round``). A later round then starts at once, its labels joining
  it while it trains; only after a round whose timer ran out with no label at all does the next one wait for
  a label. So the trainer does not idle while people label, and people do not wait for a quota.
- Suggestions in async mode are capped by what the budget can still take (labels in and cases leased count),
  so annotators are not handed cases whose labels no round could use.

With ``oracle: simulated`` in async mode, :class:`raylearn.annotation.simulate.SimulatedAnnotators` label the
suggestions in threads after a delay (people stand-ins); with ``oracle: human`` people do, over HTTP.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raylearn.annotation.labels import LabelStore
from raylearn.annotation.workspace import Workspace
from raylearn.oracle import LabelReceipt, OracleTimeout, make_oracle

__all__ = ["AsyncSchedule", "SyncSchedule", "make_schedule", "attach_run"]

log = logging.getLogger(__name__)


def attach_run(out: Path, cfg, store, labels: LabelStore, pool_ids: list[str]) -> Workspace:
    """Create the run's annotation workspace and write ``run.json`` (what the annotation API reads)."""
    ws = Workspace(Path(out) / "annotation")
    with ws.lock():
        ws.write("run", {"name": cfg.name, "output_dir": str(Path(out).resolve()), "store": str(store.path),
                         "labels": str(labels.root), "ledger": str((Path(out) / "ledger.jsonl").resolve()),
                         "pool_ids": list(pool_ids), "classes": {int(k): v for k, v in store.labels.items()},
                         "mode": cfg.schedule.mode, "oracle": cfg.oracle, "strategy": cfg.strategy.name,
                         "lease_s": cfg.schedule.lease_s, "started": time.time()})
    return ws


def _receipt(labels: LabelStore, ids: list[str]) -> LabelReceipt:
    rec = LabelReceipt(ids=list(ids))
    for cid in ids:
        r = labels.latest(cid)
        rec.voxels += int(np.prod(r.shape))
        rec.foreground_voxels += r.foreground_voxels
        rec.per_case[cid] = r.foreground_voxels
    return rec


class SyncSchedule:
    """Label the selection, then train (the papers' protocol; selections identical to a plain run's)."""

    mode = "sync"
    trains_past_budget = False  # a spent label budget ends the run

    def __init__(self, cfg, store, labels: LabelStore, workspace: Workspace) -> None:
        self.cfg, self.labels, self.ws = cfg, labels, workspace
        self.oracle = make_oracle(cfg.oracle, store, labels, timeout_s=cfg.schedule.label_timeout_s)
        self.annotator_idle_s = 0.0
        self._strategies: dict[int, tuple[str, Any]] = {}

    def strategy(self, r: int, name: str, strategy):
        """The strategy of round ``r``: the config's, unless an admin set one (``PUT /v1/annotation/strategy``)
        for the rounds after the cold start. Latched per round, so scoring ahead and selecting agree."""
        if r not in self._strategies:
            override = (self.ws.read("control") or {}).get("strategy")
            if override and r > 0:
                from raylearn.runtime import round_seed
                from raylearn.strategies import build_strategy

                params = {**override.get("params", {}), "random_state": round_seed(self.cfg.seed, r)}
                log.info("round %d: strategy %s (set by an admin)", r, override["name"])
                self._strategies[r] = (override["name"], build_strategy(override["name"], **params))
            else:
                self._strategies[r] = (name, strategy)
        return self._strategies[r]

    def wait_unpaused(self) -> None:
        """Block while an admin has paused the run (``POST /v1/annotation/pause``): no new round starts."""
        said = False
        while (self.ws.read("control") or {}).get("paused"):
            if not said:
                log.info("paused by an admin; waiting for POST /v1/annotation/resume")
                said = True
            time.sleep(0.5)

    def restore(self, labeled: list[str]) -> None:
        """Labels of rounds recorded before this process (a round 0 shared by ``compare``, a resumed run) into the
        label store: the simulated oracle reveals them again (idempotent); a human oracle waits for them."""
        missing = [c for c in labeled if self.labels.latest(c) is None]
        if missing:
            log.info("label store: %d labelled case(s) of recorded rounds are not in it yet", len(missing))
            self.oracle.label(missing)

    def view(self, view, labeled: list[str]):
        return view

    def budget(self, budget: int, view) -> int:
        return budget

    def collect(self, r: int, chosen: list[str], labeled: list[str], checkpoint: str | None
                ) -> tuple[list[str], LabelReceipt]:
        self.wait_unpaused()
        self.ws.publish(r, chosen, checkpoint, r - 1 if checkpoint else None)
        return list(chosen), self.oracle.label(chosen)

    def bind(self, trainer) -> None:
        """The run's trainer (the async schedule holds rounds on a training service)."""
        return None

    def fit(self, trainer, r: int, labeled: list[str], seed: int) -> tuple[str, dict[str, Any], list[str]]:
        checkpoint, info = trainer.fit(r, list(labeled), seed=seed)
        return checkpoint, info, []

    def round_done(self, r: int, checkpoint: str) -> None:
        q = self.ws.queue()
        self.ws.publish(r, q["candidates"], checkpoint, r, q.get("scores"))

    def close(self) -> None:
        return None


@dataclass
class _AsyncRound:
    """What an async round learns between the loop's calls: ``view`` and ``budget`` set the first two, ``collect``
    the last two, and ``fit`` reads them."""

    labeled_now: list[str] = field(default_factory=list)  # the labels the round's selection started from
    budget: int = 0  # the loop's selection budget for the round
    base: int = 0  # labels in when the round was collected
    want: int = 0  # new labels the round is for (0 until ``collect``)


class AsyncSchedule(SyncSchedule):
    """People label while the model trains; a round is for ``labels_per_round`` new labels (or a timer), and is
    held, training on, until they are in."""

    mode = "async"
    trains_past_budget = True  # rounds go on, training on the final labels, until ``schedule.rounds``

    def __init__(self, cfg, store, labels: LabelStore, workspace: Workspace, pool_ids: list[str]) -> None:
        super().__init__(cfg, store, labels, workspace)
        s = cfg.schedule
        self.k = s.labels_per_round or s.batch_size
        self.timer_s, self.lookahead, self.timeout_s = s.round_timer_s, s.lookahead, s.label_timeout_s
        self.train_while_waiting = s.train_while_waiting
        self._service = None  # set by bind(): held rounds need the training service
        self._round = _AsyncRound(want=self.k)  # the round in progress
        self._cold_start = self.k  # round 0 is for the whole cold start (its size is known at round 0's collect)
        self._starved = False  # the last held round's timer ran out with no label at all
        self.annotators = None
        if cfg.oracle == "simulated":
            from raylearn.annotation.simulate import DirectClient, SimulatedAnnotators

            self.annotators = SimulatedAnnotators(
                [DirectClient(store, labels, workspace, f"sim-{i}", s.lease_s) for i in range(s.simulated_annotators)],
                store, s.simulated_delay_s, seed=cfg.seed).start()

    def view(self, view, labeled: list[str]):
        import dataclasses

        self._round = _AsyncRound(labeled_now=list(labeled), want=self.k)
        taken = set(labeled) | set(self.labels.labelled_ids()) | self.ws.leased_ids()
        return dataclasses.replace(view, labeled_mask=np.isin(view.ids, sorted(taken)))

    def _room(self, labeled: list[str]) -> int | None:
        """Labels the budget can still take beyond ``labeled`` (None: no ``max_labeled``)."""
        cap = self.cfg.schedule.max_labeled
        return None if cap is None else max(0, cap - len(labeled))

    def budget(self, budget: int, view) -> int:
        """``budget + lookahead`` suggestions, capped by the free cases and by what the label budget can still
        take once the labels already in and the cases leased (labels in progress) are counted."""
        self._round.budget = budget
        if budget <= 0:
            return 0
        free = int((~np.asarray(view.labeled_mask)).sum())
        n = min(budget + self.lookahead, free)
        room = self._room(self._round.labeled_now)
        if room is not None:
            have, done = set(self._round.labeled_now), set(self.labels.labelled_ids())
            arrived = len(done - have)
            in_progress = len(self.ws.leased_ids() - have - done)
            n = min(n, max(0, room - arrived - in_progress))
        return max(0, n)

    def _new(self, labeled: list[str]) -> list[str]:
        """Labelled ids not in ``labeled`` yet, in label order, capped at ``schedule.max_labeled``."""
        have = set(labeled)
        new = [c for c in self.labels.labelled_ids() if c not in have]
        room = self._room(labeled)
        return new if room is None else new[:room]

    def _want(self, r: int, room: int | None) -> int:
        """New labels round ``r`` is for: the whole cold start in round 0, ``labels_per_round`` after; at most
        what the budget can still take."""
        want = self._cold_start if r == 0 else self.k
        return want if room is None else max(1, min(want, room))

    def collect(self, r: int, chosen: list[str], labeled: list[str], checkpoint: str | None
                ) -> tuple[list[str], LabelReceipt]:
        self.wait_unpaused()
        self.ws.publish(r, chosen, checkpoint, r - 1 if checkpoint else None)
        if r == 0:
            self._cold_start = int(self._round.budget or len(chosen) or self.k)
        room = self._room(labeled)
        self._round.base, self._round.want = len(labeled), self._want(r, room)
        if room == 0:  # the label budget is spent: this round trains on the labels there are
            log.info("round %d: label budget spent; training on the %d labels in", r, len(labeled))
            return [], _receipt(self.labels, [])
        # Round 0 starts on its first label. With train_while_waiting, a later round starts at once (its labels
        # join it while it trains and holds), unless the round before ran out its timer with no label at all
        # (nobody labelling: wait for one rather than train on). Otherwise a round waits for its labels or the
        # timer (with at least one).
        holding = self.train_while_waiting and self._service is not None
        if holding and r > 0 and not self._starved:
            new = self._new(labeled)
            log.info("round %d: starts with %d new label(s); the rest join while it trains", r, len(new))
            return new, _receipt(self.labels, new)
        want = 1 if (r == 0 or holding) else self._round.want
        t0 = time.monotonic()
        while True:
            new = self._new(labeled)
            waited = time.monotonic() - t0
            if len(new) >= want or (new and waited >= self.timer_s):
                break
            if self.timeout_s is not None and waited > self.timeout_s:
                raise OracleTimeout(f"round {r}: {len(new)} of {want} labels after {self.timeout_s:g} s")
            time.sleep(0.2)
        log.info("round %d: %d new label(s) after %.1f s", r, len(new), time.monotonic() - t0)
        return new, _receipt(self.labels, new)

    def bind(self, trainer) -> None:
        """The run's trainer: rounds are held only on a training service (nnU-Net rounds are one task each)."""
        self._service = getattr(trainer, "service", None)

    def fit(self, trainer, r: int, labeled: list[str], seed: int) -> tuple[str, dict[str, Any], list[str]]:
        service = getattr(trainer, "service", None)
        if service is None:  # nnU-Net rounds are one task each: nothing to extend
            return super().fit(trainer, r, labeled, seed)
        base, want = self._round.base, self._round.want
        have, added, t0 = list(labeled), [], time.monotonic()

        def labels_in() -> bool:  # the round's labels are in, or no more can come
            return len(have) - base >= want or self._room(have) == 0

        hold = self.train_while_waiting and not labels_in()
        service.submit_round(r, list(labeled), seed=seed, hold=hold)
        self._starved, held_s = False, 0.0
        while True:
            try:
                res = service.wait_round(r, timeout_s=1.0)
                break
            except TimeoutError:
                new = self._new(have)  # every label in since, up to the budget
                if new:
                    service.extend_round(r, new)
                    added += new
                    have += new
                # a held round ends once its labels are in (or no more can come), or at the timer
                if hold and (labels_in() or time.monotonic() - t0 >= self.timer_s):
                    self._starved = len(have) == len(labeled) and not labels_in()
                    service.release_round(r)
                    hold, held_s = False, time.monotonic() - t0
        path = res.save(trainer.ckpt_dir / f"round_{r:02d}.pt")
        info = {**res.info, "wall_s": res.wall_s, "labels_added_mid_round": len(added),
                "held_until_s": round(held_s, 1)}  # seconds from submit to release (0: not held)
        # ids that arrived too late for any step of this round still count as this round's labels
        return str(path), info, added

    def close(self) -> None:
        if self.annotators is not None:
            self.annotators.stop()
            self.annotator_idle_s = self.annotators.idle_s()


def make_schedule(cfg, store, labels: LabelStore, workspace: Workspace, pool_ids: list[str]):
    """The schedule of ``cfg.schedule.mode``."""
    if cfg.schedule.mode == "async":
        return AsyncSchedule(cfg, store, labels, workspace, pool_ids)
    return SyncSchedule(cfg, store, labels, workspace)
