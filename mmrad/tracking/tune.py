"""Ray Tune's own logger callbacks for a sweep's trials, under the sweep's tracked run.

Each trial is a short GRPO run; its driver is the trial's actor, so the trial's own
trackers are off (:func:`trial_loggers`) and Tune's driver logs every trial instead,
through Ray's integrations: one MLflow run per trial, nested under the sweep's run, with
the trial's point of the search space as parameters, each validation it reports as a
metric at the GRPO step it was made, and its GRPO run's files when it ends.

A resumed sweep keeps the callbacks it started with (``Tuner.restore`` reads them back
from the sweep folder): loggers added to a rerun apply to new sweeps only.

Ray's MLflow callback opens a new MLflow run whenever a trial starts, so a resumed sweep
would hold two runs for a trial that started again; :class:`TrialRuns` finds the trial's
run first (tagged with the sweep and the trial). Ray's W&B callback logs each trial from
a small actor of its own (W&B's ``dir`` is then on that actor's node: on a cluster, use
W&B online rather than offline).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from ray.air.integrations.mlflow import MLflowLoggerCallback

from mmrad.config import StorageConfig, TrackedRunSection
from mmrad.storage import Storage, join
from mmrad.tracking.mlflow_run import (
    artifact_location,
    experiment_id,
    log_metrics,
    mlflow_client,
    run_key,
    tracking_uri,
)
from mmrad.tracking.run import RunTracking, experiment_name, run_files
from mmrad.tracking.values import flat_metrics, shown

log = logging.getLogger(__name__)

SWEEP_TAG = "mmrad.sweep_key"
PARENT_TAG = "mlflow.parentRunId"  # how MLflow nests a run under another


def trial_loggers(loggers: list[str]) -> list[str]:
    """A trial's GRPO run writes TensorBoard only: Tune's driver tracks the trial."""
    return [name for name in loggers if name == "tensorboard"]


class TrialRuns(MLflowLoggerCallback):
    """:class:`MLflowLoggerCallback` that resumes a trial's run, logs at the GRPO step
    and adds the trial's GRPO run files (``runs_uri/<trial id>``) at its end.

    The tracking URI is resolved when Tune starts the callback (``setup``), not when it
    is made: Tune pickles its callbacks into the sweep folder (``tuner.pkl``), and a
    URI from ``$MLFLOW_TRACKING_URI`` may hold a password. A tracking failure is a
    warning, never the sweep's end (Tune does not catch its callbacks' errors)."""

    def __init__(
        self,
        run: TrackedRunSection,
        sweep_uri: str,
        runs_uri: str,
        storage: StorageConfig,
        parent_run_id: str,
    ):
        super().__init__(
            experiment_name=experiment_name(run, "tune"),
            tags={SWEEP_TAG: run_key(sweep_uri), PARENT_TAG: parent_run_id},
        )
        self.section = run.mlflow
        self.runs_uri = runs_uri
        self.storage = storage

    def setup(self, *args, **kwargs) -> None:
        self.tracking_uri = tracking_uri(self.section)
        client = cached_client(self.tracking_uri)
        experiment_id(client, self.experiment_name, artifact_location(self.tracking_uri))
        super().setup(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "tracking_uri": None}

    def log_trial_start(self, trial) -> None:
        def start() -> None:
            if trial not in self._trial_runs:
                found = self._earlier_run(str(trial))
                if found is not None:
                    self._trial_runs[trial] = found
            super(TrialRuns, self).log_trial_start(trial)

        self._safely(f"start of trial {trial}", start)

    def log_trial_result(self, iteration: int, trial, result: dict[str, Any]) -> None:
        """The result's numbers at its GRPO step, in one call (Ray's logs one call per
        metric, which held Tune's loop, and so its experiment snapshots, for a second)."""
        from mlflow.entities import Metric

        step = int(result.get("step") or result.get("training_iteration") or iteration)
        stamp = int(1000 * time.time())
        values = flat_metrics({k: v for k, v in result.items() if k != "config"})
        metrics = [Metric(key, value, stamp, step) for key, value in values.items()]
        self._safely(
            f"result of trial {trial}",
            lambda: log_metrics(
                cached_client(self.tracking_uri), self._trial_runs[trial], metrics
            ),  # fmt: skip
        )

    def log_trial_end(self, trial, failed: bool = False) -> None:
        def end() -> None:
            run_id = self._trial_runs[trial]
            with run_files(Storage.from_config(self.storage),
                           join(self.runs_uri, trial.trial_id)) as paths:  # fmt: skip
                for path in paths:
                    cached_client(self.tracking_uri).log_artifact(run_id, str(path))
            super(TrialRuns, self).log_trial_end(trial, failed)

        self._safely(f"end of trial {trial}", end)

    def _earlier_run(self, trial_name: str) -> str | None:
        client = cached_client(self.tracking_uri)
        found = client.search_runs(
            [self.mlflow_util.experiment_id],
            filter_string=f"tags.`{SWEEP_TAG}` = '{self.tags[SWEEP_TAG]}' "
            f"and tags.trial_name = '{trial_name}'",
            max_results=1,
        )
        if not found:
            return None
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id

    @staticmethod
    def _safely(what: str, call) -> None:
        try:
            call()
        except Exception as err:  # the sweep matters more than its tracking
            log.warning("MLflow: %s not logged (%s: %s)", what, type(err).__name__,
                        shown(str(err)))  # fmt: skip


@functools.cache
def cached_client(uri: str):
    """One client per tracking URI in Tune's driver (the callback itself is pickled)."""
    return mlflow_client(uri)


def tune_callbacks(
    run: TrackedRunSection, tracking: RunTracking, runs_uri: str, storage: StorageConfig
) -> list:
    """Tune's logger callbacks for the trackers the sweep's run has open."""
    callbacks: list = []
    mlflow_run = tracking.trackers.get("mlflow")
    if mlflow_run is not None:
        callbacks.append(TrialRuns(run, tracking.run_uri, runs_uri, storage, mlflow_run.run_id))
    wandb_run = tracking.trackers.get("wandb")
    if wandb_run is not None:
        from ray.air.integrations.wandb import WandbLoggerCallback

        section = run.wandb
        callbacks.append(
            WandbLoggerCallback(
                project=section.project,
                entity=section.entity,
                group=wandb_run.run.id,
                mode=section.mode,
                dir=section.dir,
                resume="allow",  # a trial that starts again continues its W&B run
            )
        )
    return callbacks
