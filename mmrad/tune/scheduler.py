"""The sweep's trial schedulers: FIFO, or ASHA in GRPO steps that lets a trial's last
step finish (:class:`ASHAToTheEnd`)."""

from __future__ import annotations

import math

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from mmrad.rl.config import LAST_STEP
from mmrad.tune.config import TuneJobConfig


class ASHAToTheEnd(ASHAScheduler):
    """ASHA that never stops a trial at its run's last step (each report's
    :data:`~mmrad.rl.config.LAST_STEP`; a sweep may vary ``schedule.max_steps``).

    A GRPO run reports its last step before it writes its export, and a trial that Tune
    stops while no other trial waits for its process has that process ended within
    seconds, its run's learners with it: ASHA's stop at ``max_t`` would lose the export
    of a run that completed. Such a trial goes on instead, and ends when its run
    returns."""

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if result.get(self._time_attr, 0) >= result.get(LAST_STEP, math.inf):
            return TrialScheduler.CONTINUE
        return decision


def make_scheduler(job: TuneJobConfig, max_steps: int) -> TrialScheduler:
    if job.scheduler.kind == "fifo":
        return FIFOScheduler()
    # in GRPO steps, which every report carries: Tune's training_iteration also counts
    # the checkpoint reports, which would move the rungs (and max_t) wherever
    # checkpoint_every and validate_every do not line up
    grace = job.scheduler.grace_period * job.validate_every
    return ASHAToTheEnd(
        time_attr="step",
        max_t=max(max_steps, grace),
        grace_period=grace,
        reduction_factor=job.scheduler.reduction_factor,
    )
