"""Release the training placement groups of Ray Tune trials that ended while their training service was up.

Tune stops a trial (ASHA, or its last round reaching ``max_t``) by ending the trial's actor while the trial's
persistent training service (:mod:`raylearn.train.service`) is still running. Ray Train's controller dies with
the actor, and the worker group's placement group is left to Ray Train's ``PlacementGroupCleaner``, which polls
the controller through the dashboard's state API. On a local instance started without the dashboard (how
raylearn starts one) that poll never succeeds: each stopped trial kept 0.9 of its CPUs reserved for good, and
later trials timed out waiting for their workers ("worker group startup timed out").

So each trial reports its placement groups (``PG_KEY``, from :func:`raylearn.train.service.live_placement_groups`)
and :class:`ReleaseTrialPlacementGroups`, a callback of the sweep's driver, removes those still present when the
trial completes or errors. Removing one ends only that trial's training workers, which are being stopped anyway.
This module imports Ray Tune at import time; :mod:`raylearn.tune` imports it only inside ``run_sweep``.
"""

from __future__ import annotations

import logging

from ray.tune import Callback

__all__ = ["PG_KEY", "ReleaseTrialPlacementGroups"]

log = logging.getLogger(__name__)

#: the report key carrying a trial's training placement groups (hex ids, space-separated) to the sweep's driver
PG_KEY = "train_placement_groups"


class ReleaseTrialPlacementGroups(Callback):
    """Remove each finished trial's reported training placement groups that outlived it."""

    def __init__(self) -> None:
        self.groups: dict[str, set[str]] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        ids = str(result.get(PG_KEY) or "").split()
        self.groups.setdefault(trial.trial_id, set()).update(ids)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.release(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.release(trial.trial_id)

    def release(self, trial_id: str) -> list[str]:
        """Remove the trial's placement groups that still exist; returns the hex ids removed."""
        from ray import PlacementGroupID
        from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

        removed = []
        for hex_id in sorted(self.groups.pop(trial_id, set())):
            pg = PlacementGroup(PlacementGroupID(bytes.fromhex(hex_id)))
            try:
                if placement_group_table(pg).get("state") in (None, "REMOVED"):
                    continue  # the trial's service stopped it (a trial that returned) or Ray already did
                remove_placement_group(pg)
            except Exception as err:  # noqa: BLE001 - best effort: the group may be going away by itself
                log.warning("trial %s: could not release training placement group %s: %s", trial_id, hex_id, err)
                continue
            log.info("trial %s: released its training placement group %s (the trial ended with its service up)",
                     trial_id, hex_id[:12])
            removed.append(hex_id)
        return removed
