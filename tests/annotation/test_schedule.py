"""Leases, the suggestion queue and the async schedule's decisions (no Ray), and an async run end to end (slow)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from raylearn.annotation.labels import LabelStore
from raylearn.annotation.schedule import AsyncSchedule, SyncSchedule, attach_run
from raylearn.annotation.simulate import DirectClient, SimulatedAnnotators
from raylearn.annotation.workspace import LeaseError, Workspace
from raylearn.experiment import ExperimentConfig
from raylearn.strategies import PoolView


def test_leases_queue_and_next_case(tmp_path):
    ws = Workspace(tmp_path / "annotation")
    ws.publish(1, ["c", "a", "b", "d"], None, 0)
    first = ws.next_case("alice", set(), ttl_s=60)
    assert first.case_id == "c" and first.user == "alice"
    assert ws.next_case("alice", set(), ttl_s=60).case_id == "c"  # her open case again
    assert ws.next_case("bob", set(), ttl_s=60).case_id == "a"
    assert ws.next_case("carol", {"b"}, ttl_s=60).case_id == "d"  # labelled cases are skipped
    assert ws.next_case("dave", {"b"}, ttl_s=60) is None
    assert ws.leased_ids() == {"c", "a", "d"} and ws.leased_ids(exclude_user="bob") == {"c", "d"}
    with pytest.raises(LeaseError, match="leased by 'alice'") as err:
        ws.acquire("c", "bob", 60)
    assert err.value.status == 409
    with pytest.raises(LeaseError, match="holds no lease"):
        ws.check_upload("b", "bob")
    ws.acquire("b", "bob", ttl_s=0.05)
    time.sleep(0.1)
    with pytest.raises(LeaseError, match="expired") as err:
        ws.check_upload("b", "bob")
    assert err.value.status == 410
    assert ws.renew("a", "bob", 60).user == "bob"
    ws.release("c", "alice")
    assert "c" not in ws.leases()
    rng = np.random.default_rng(0)
    pick = ws.next_case("erin", {"b"}, 60, strategy="random", pool_ids=["a", "b", "c", "d", "e"], rng=rng)
    assert pick.case_id in {"c", "e"}  # free: not labelled, not leased
    # another process's view of the same workspace
    assert Workspace(tmp_path / "annotation").leases().keys() == ws.leases().keys()


class _Store:
    """The few pool-store members a schedule uses: ground truth of 8 cases."""

    path = "/nonexistent"
    labels = {0: "background", 1: "fg"}

    def __init__(self):
        self.cases = {f"c{i}": np.full((2, 3, 4), i % 2, np.uint8) for i in range(8)}

    def case_ids(self, split=None):
        return list(self.cases)

    def get(self, cid):
        from types import SimpleNamespace

        return SimpleNamespace(label=self.cases[cid], image=np.zeros((1, 2, 3, 4), np.float32))


def _cfg(tmp_path, **schedule) -> ExperimentConfig:
    return ExperimentConfig(output_dir=str(tmp_path), oracle="human", schedule={"batch_size": 2, **schedule})


def test_sync_schedule_changes_nothing_the_strategy_sees(tmp_path):
    store = _Store()
    labels = LabelStore(tmp_path / "labels")
    cfg = ExperimentConfig(output_dir=str(tmp_path))  # simulated oracle
    sched = SyncSchedule(cfg, store, labels, attach_run(tmp_path, cfg, store, labels, list(store.cases)))
    view = PoolView(ids=np.array(list(store.cases)), labeled_mask=np.zeros(8, bool), features={})
    assert sched.view(view, []) is view and sched.budget(2, view) == 2
    chosen, receipt = sched.collect(0, ["c1", "c2"], [], None)
    assert chosen == ["c1", "c2"] and receipt.ids == ["c1", "c2"]
    assert [(r.case_id, r.source) for r in labels.records()] == [("c1", "simulated"), ("c2", "simulated")]
    assert sched.ws.queue()["candidates"] == ["c1", "c2"]


def test_async_schedule_view_budget_and_label_driven_rounds(tmp_path):
    store = _Store()
    labels = LabelStore(tmp_path / "labels")
    cfg = _cfg(tmp_path, mode="async", lookahead=3, round_timer_s=0.5, max_labeled=5)
    ws = attach_run(tmp_path, cfg, store, labels, list(store.cases))
    sched = AsyncSchedule(cfg, store, labels, ws, list(store.cases))
    labels.put("c0", store.cases["c0"], "human", "alice")
    ws.acquire("c5", "bob", 60)
    view = PoolView(ids=np.array(list(store.cases)), labeled_mask=np.zeros(8, bool), features={})
    v = sched.view(view, [])
    assert v.ids[v.labeled_mask].tolist() == ["c0", "c5"]  # labelled meanwhile, and leased: not suggested
    # 2 + 3 lookahead, capped by the label budget: 5 - c0 (in) - c5 (leased: a label in progress) = 3
    assert sched.budget(2, v) == 3 and sched.budget(0, v) == 0
    # round 1 starts once k = batch_size new labels are in (c0 is one; c3 arrives)
    labels.put("c3", store.cases["c3"], "human", "bob")
    new, receipt = sched.collect(1, ["c3", "c4"], [], "ckpt")
    assert new == ["c0", "c3"] and receipt.ids == new
    # with one new label the timer starts the round
    labels.put("c4", store.cases["c4"], "human", "bob")
    t0 = time.monotonic()
    new, _ = sched.collect(2, ["c6", "c7"], ["c0", "c3"], "ckpt")
    assert new == ["c4"] and time.monotonic() - t0 >= 0.5
    # the label budget caps what a round takes
    for c in ("c1", "c2", "c6"):
        labels.put(c, store.cases[c], "human", "x")
    assert sched._new(["c0", "c3", "c4"]) == ["c1", "c2"]
    new, _ = sched.collect(3, ["c7", "c5"], ["c0", "c3", "c4"], "ckpt")
    assert new == ["c1", "c2"]
    # budget spent: the round does not wait, it trains on the labels there are; nothing more is suggested
    labeled = ["c0", "c3", "c4", "c1", "c2"]
    t0 = time.monotonic()
    assert sched.collect(4, [], labeled, "ckpt")[0] == [] and time.monotonic() - t0 < 0.5
    sched.view(view, labeled)
    assert sched.budget(2, v) == 0 and sched.trains_past_budget


def test_async_rounds_take_every_label_in_and_round_zero_streams(tmp_path):
    store = _Store()
    labels = LabelStore(tmp_path / "labels")
    cfg = _cfg(tmp_path, mode="async", round_timer_s=30)
    ws = attach_run(tmp_path, cfg, store, labels, list(store.cases))
    sched = AsyncSchedule(cfg, store, labels, ws, list(store.cases))
    # round 0 (cold start of 2) starts on the first label: the trainer does not wait for the rest
    labels.put("c2", store.cases["c2"], "human", "alice")
    t0 = time.monotonic()
    new, _ = sched.collect(0, ["c2", "c5"], [], None)
    assert new == ["c2"] and time.monotonic() - t0 < 5
    # a later round takes every label that has arrived, not just k = 2 (no max_labeled: no cap)
    for c in ("c5", "c1", "c7"):
        labels.put(c, store.cases[c], "human", "bob")
    new, _ = sched.collect(1, ["c1"], ["c2"], "ckpt")
    assert new == ["c5", "c1", "c7"]


class _Service:
    """A training service that records calls: its round finishes once released (or at once when not held)."""

    def __init__(self, on_wait=None):
        self.calls, self.held, self.on_wait, self.waits = [], False, on_wait, 0

    def submit_round(self, r, ids, seed=None, hold=False):
        self.calls.append(("submit", r, list(ids), hold))
        self.held = hold

    def extend_round(self, r, ids):
        self.calls.append(("extend", r, list(ids)))

    def release_round(self, r):
        self.calls.append(("release", r))
        self.held = False

    def wait_round(self, r, timeout_s=None):
        from types import SimpleNamespace

        self.waits += 1
        if self.on_wait is not None:
            self.on_wait(self.waits)
        if self.held:
            time.sleep(0.01)
            raise TimeoutError
        return SimpleNamespace(info={"trained_steps": 4, "steps": 4}, wall_s=0.1,
                               save=lambda path: path)


def test_async_rounds_train_while_they_wait_for_their_labels(tmp_path):
    """train_while_waiting: round 0 starts on its first label and is held until the cold start is in; a later
    round starts at once and is held until k new labels are in; with nobody labelling, the timer ends it and the
    next round waits for a label instead of training on."""
    from types import SimpleNamespace

    store = _Store()
    labels = LabelStore(tmp_path / "labels")
    cfg = _cfg(tmp_path, mode="async", round_timer_s=0.6, lookahead=2)
    ws = attach_run(tmp_path, cfg, store, labels, list(store.cases))
    sched = AsyncSchedule(cfg, store, labels, ws, list(store.cases))
    arrivals = {3: "c4", 6: "c6"}  # labels people hand in while round 0 trains (at the 3rd and 6th wait)
    svc = _Service(on_wait=lambda n: n in arrivals and labels.put(arrivals[n], store.cases[arrivals[n]], "human",
                                                                  "alice"))
    trainer = SimpleNamespace(service=svc, ckpt_dir=tmp_path)
    sched.bind(trainer)
    view = PoolView(ids=np.array(list(store.cases)), labeled_mask=np.zeros(8, bool), features={})
    sched.view(view, [])
    assert sched.budget(3, view) == 5  # a cold start of 3, + 2 lookahead
    labels.put("c1", store.cases["c1"], "human", "bob")
    new, _ = sched.collect(0, ["c1", "c4", "c6", "c2", "c3"], [], None)
    assert new == ["c1"]
    _, info, added = sched.fit(trainer, 0, ["c1"], seed=0)
    assert svc.calls[0] == ("submit", 0, ["c1"], True)  # held: 1 of the 3 cold-start labels
    assert added == ["c4", "c6"] and svc.calls[-1] == ("release", 0) and info["held_until_s"] > 0
    # round 1 starts at once with no new label; held until k = 2 arrive
    svc.calls.clear()
    svc.waits, arrivals = 0, {2: "c2", 4: "c3"}
    labeled = ["c1", "c4", "c6"]
    assert sched.collect(1, ["c2", "c3"], labeled, "ckpt")[0] == []
    _, _, added = sched.fit(trainer, 1, labeled, seed=0)
    assert svc.calls[0][3] is True and added == ["c2", "c3"] and ("release", 1) in svc.calls
    # nobody labels: the timer releases round 2 and round 3 waits for a label rather than training on
    svc.calls.clear()
    svc.waits, arrivals = 0, {}
    labeled += ["c2", "c3"]
    assert sched.collect(2, ["c0"], labeled, "ckpt")[0] == []
    t0 = time.monotonic()
    assert sched.fit(trainer, 2, labeled, seed=0)[2] == [] and time.monotonic() - t0 >= 0.6
    import threading

    threading.Timer(0.3, lambda: labels.put("c0", store.cases["c0"], "human", "bob")).start()
    t0 = time.monotonic()
    assert sched.collect(3, ["c0"], labeled, "ckpt")[0] == ["c0"] and time.monotonic() - t0 >= 0.25


def test_train_while_waiting_needs_a_constant_lr_schedule(tmp_path):
    with pytest.raises(ValueError, match="train.schedule: constant"):
        ExperimentConfig(output_dir=str(tmp_path), schedule={"mode": "async"}, train={"schedule": "cosine"})
    ExperimentConfig(output_dir=str(tmp_path), schedule={"mode": "async", "train_while_waiting": False},
                     train={"schedule": "cosine"})


def test_simulated_annotators_label_the_queue_with_leases(tmp_path):
    store = _Store()
    labels = LabelStore(tmp_path / "labels")
    ws = Workspace(tmp_path / "annotation")
    ws.publish(0, ["c1", "c2", "c3"], None, None)
    team = SimulatedAnnotators([DirectClient(store, labels, ws, f"sim-{i}", 60) for i in range(2)], store,
                               (0.05, 0.1), seed=0).start()
    deadline = time.monotonic() + 20
    while len(labels.labelled_ids()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    team.stop()
    assert sorted(labels.labelled_ids()) == ["c1", "c2", "c3"] and not team.errors
    assert {r.annotator for r in labels.records()} <= {"sim-0", "sim-1"} and ws.leases() == {}
    assert len(labels.records()) == 3 and team.idle_s() > 0  # nobody labelled a case twice; idle once done


@pytest.mark.slow
def test_async_run_end_to_end(ray_session, tmp_path):
    """``schedule.mode: async`` with simulated annotators: rounds driven by labels, the budget respected."""
    from raylearn.loop import run_experiment

    cfg = ExperimentConfig.model_validate({
        "name": "async", "seed": 1, "output_dir": str(tmp_path / "run"),
        "data": {"dataset": "phantom", "phantom": {"n_cases": 14, "shape": [24, 24, 24], "seed": 1}, "n_test": 4,
                 "store": str(tmp_path / "store")},
        "cold_start": {"strategy": "random", "size": 2}, "strategy": {"name": "least_confidence"},
        "schedule": {"rounds": 2, "batch_size": 2, "max_labeled": 6, "mode": "async", "round_timer_s": 5,
                     "simulated_annotators": 2, "simulated_delay_s": [0.2, 0.5], "label_timeout_s": 300},
        "model": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
        "train": {"first_round_steps": 20, "steps": 10, "batch_size": 2, "checkpoint_every": 10, "log_every": 2},
        "pool": {"n_shards": 1, "num_cpus": 0.25, "progress": False}, "evaluate": {"hd95": False}})
    res = run_experiment(cfg, progress=False)
    assert len(res.rounds) == 3 and res.rounds[-1]["n_labeled"] <= 6
    labels = LabelStore(tmp_path / "run" / "labels")
    trained = [c for r in res.rounds for c in r["selected"]]
    assert len(set(trained)) == len(trained) and set(trained) <= set(labels.labelled_ids())
    assert {r.source for r in labels.records()} == {"simulated"}
    assert {r.annotator for r in labels.records()} <= {"sim-0", "sim-1"}


def test_admin_strategy_override_and_pause(tmp_path):
    import threading

    store = _Store()
    labels = LabelStore(tmp_path / "labels")
    cfg = ExperimentConfig(output_dir=str(tmp_path))
    sched = SyncSchedule(cfg, store, labels, attach_run(tmp_path, cfg, store, labels, list(store.cases)))
    default = object()
    assert sched.strategy(1, "least_confidence", default) == ("least_confidence", default)
    sched.ws.update("control", strategy={"name": "random", "params": {}})
    assert sched.strategy(1, "least_confidence", default)[1] is default  # latched for round 1
    name, strat = sched.strategy(2, "least_confidence", default)
    assert name == "random" and strat is not default
    assert sched.strategy(0, "random", default)[1] is default  # the cold start is the config's
    sched.ws.update("control", paused=True)
    done = threading.Event()
    t = threading.Thread(target=lambda: (sched.collect(1, ["c1"], [], None), done.set()))
    t.start()
    assert not done.wait(1.0) and labels.records() == []  # no round while paused
    sched.ws.update("control", paused=False)
    assert done.wait(10) and labels.labelled_ids() == ["c1"]


def test_restore_reveals_labels_of_recorded_rounds(tmp_path):
    """A round 0 shared by ``compare`` (or a resumed run) has its labels in this run's store before training."""
    store = _Store()
    labels = LabelStore(tmp_path / "labels")
    labels.put("c1", store.cases["c1"], "simulated", "simulated")
    cfg = ExperimentConfig(output_dir=str(tmp_path))
    sched = SyncSchedule(cfg, store, labels, attach_run(tmp_path, cfg, store, labels, list(store.cases)))
    sched.restore(["c1", "c2", "c3"])
    assert labels.labelled_ids() == ["c1", "c2", "c3"] and len(labels.records()) == 3
