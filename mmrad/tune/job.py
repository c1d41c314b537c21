"""``mmrad tune`` / ``python -m ray_jobs.tune``: a reward-weight sweep on Ray Tune.

Each trial runs a short GRPO (:func:`mmrad.rl.job.run_grpo`, its own ``TorchTrainer``
of learners and vLLM rollout pool inside the trial, the Train V2 way) from the shared SFT
export, with the trial's values of the search space set on the GRPO config. The GRPO run
validates every ``validate_every`` steps; ``TuneReportCallback`` hands those reports to
Tune, so ASHA stops weak trials on ``val/objective`` while they run (never at their last
step: :mod:`mmrad.tune.scheduler`). With
``trial.reuse_engines`` Tune runs the next trial in a finished or stopped trial's process
(``reuse_actors``), which keeps its vLLM engines for it, reset to the starting weights
(:mod:`mmrad.rl.kept_engines`): one engine start per concurrent trial instead of one per
trial. A trial that the scheduler stops ends its GRPO run first (:class:`TrialStop`).

The sweep lives under ``<run.storage_path>/<run.name>``: Tune's experiment state, each
trial's GRPO run in ``grpo/<trial id>``, and at the end ``results.csv``, ``results.md``,
``objective.png`` and ``best_grpo.yaml`` (the winning trial's GRPO config, runnable as
is). Rerunning the same sweep resumes it with ``Tuner.restore``: finished trials are kept,
unfinished ones start again and their GRPO runs continue from their last checkpoint. A
rerun with another search space or base config is refused (:mod:`mmrad.tune.resume`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mmrad.config import validate_config, with_absolute_paths
from mmrad.placement import Request, Shape, actor_shape, check_or_log
from mmrad.ray_env import init_ray
from mmrad.rl.config import GRPOJobConfig
from mmrad.rl.coordinator import coordinator_name
from mmrad.rl.job import grpo_records
from mmrad.rl.resources import grpo_requests
from mmrad.storage import Storage, join
from mmrad.tracking.run import check_tracking, tracked
from mmrad.tracking.tune import trial_loggers, tune_callbacks
from mmrad.tune.config import OBJECTIVE_METRIC, TuneJobConfig, trial_base
from mmrad.tune.report import write_sweep_outputs
from mmrad.tune.resume import check_or_record_sweep, sweep_identity
from mmrad.tune.space import apply_params, to_tune_space

log = logging.getLogger(__name__)

TRIAL_RUNS = "grpo"  # each trial's GRPO run: <sweep>/grpo/<trial id>

STOPPED = "the trial was stopped by the Tune scheduler"
"""Why a stopped trial's GRPO run ends (what its coordinator's ``fail`` records)."""

RESET_WAIT_S = 600
"""How long Tune's reset of a reused trial process waits for the previous trial's thread
(``TUNE_FUNCTION_THREAD_TIMEOUT_S``, 2 s unless set): a stopped trial's GRPO run ends at
its learners' next batch, so within a GRPO step and the guard's seconds. A run that
takes longer fails the reset: the next trial errors and Tune ends the process."""

POLL_S = 1.0
FAIL_TIMEOUT_S = 10.0


@dataclass
class TuneResult:
    sweep_uri: str
    trials: int
    best_trial: str | None
    best_objective: float | None
    best_config_uri: str | None
    results_uri: str


def grpo_trial(
    params: dict[str, Any], *, base: dict[str, Any], runs_uri: str, reuse_engines: bool = False
) -> None:
    """One trial: GRPO with ``params`` (dotted keys) set on ``base``, reporting each
    validation to Tune. A restarted trial resumes its GRPO run (same run name). With
    ``reuse_engines`` the rollout engines stay in this process for the next trial that
    Tune runs on it (:mod:`mmrad.rl.kept_engines`), and a trial that Tune stops while
    its run goes on ends that run and returns (:class:`TrialStop`)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mmrad.rl.job import run_grpo
    from mmrad.rl.kept_engines import KEPT

    trial_id = tune.get_context().get_trial_id()
    config = apply_params(base, params)
    loggers = trial_loggers(config["run"]["loggers"])
    config["run"] = {
        **config["run"],
        "storage_path": runs_uri,
        "name": trial_id,
        "loggers": loggers,
    }
    job = validate_config(GRPOJobConfig, config, f"trial {trial_id} with {params}")
    report = TuneReportCallback()
    if not reuse_engines:  # Tune ends a stopped trial's process, and its run with it
        run_grpo(job, train_callbacks=[report])
        return
    # Tune's reset of this process for the next trial (FunctionTrainable.reset_config)
    # waits this long for this thread; the variable is read when the reset happens.
    os.environ["TUNE_FUNCTION_THREAD_TIMEOUT_S"] = str(RESET_WAIT_S)
    stop = TrialStop(trial_id)
    try:
        run_grpo(job, train_callbacks=[report], engines=KEPT)
    except Exception as error:
        if not stop.stopped.is_set():
            raise
        # Tune has moved on (the trial is TERMINATED): returning lets the reset go on.
        log.info("trial %s: its GRPO run ended on the scheduler's stop (%s: %s)",
                 trial_id, type(error).__name__, error)  # fmt: skip
    finally:
        stop.close()


class TrialStop:
    """Ends this trial's GRPO run (run name ``run_name``) once Tune stops the trial.

    Tune tells a function trial to stop by setting its session's ``stop_event`` (which
    Tune reads in its own thread only): when it hands the process of a stopped trial to
    the next one (``reuse_actors``: ``reset_config``, which then waits for this trial's
    thread), or before it ends the process (``Trainable.stop``). A GRPO run does not
    look at it, so a daemon thread waits for it while the run goes on; then it

    - records the stop (:attr:`stopped`: the trial thread returns instead of raising),
    - has the run's coordinator ``fail`` with :data:`STOPPED`: the learners raise at
      their next batch and the guard ends the run (:mod:`mmrad.rl.guard`), whose driver
      leaves the kept engines alive for the next trial,
    - takes the run's reports to Tune off their queue (Tune reads it no more; Tune's
      report callback would block the run's Ray Train controller on the full queue).

    A run past its last batch (exporting) is not cut short: it ends as it would have.

    Must be made in the trial's thread, after the run's ``TuneReportCallback``.
    """

    def __init__(self, run_name: str):
        from ray.train._internal.session import get_session

        session = get_session()
        self.run_name = run_name
        self.stopped = threading.Event()
        self._done = threading.Event()
        # the session outlives the trial; its reset makes a new event and report queue
        self._signal = session.stop_event
        self._reports = session._get_or_create_inter_actor_queue()
        threading.Thread(target=self._watch, name="trial-stop", daemon=True).start()

    def close(self) -> None:
        """The run has ended: stop watching (and dropping its reports)."""
        self._done.set()

    def _watch(self) -> None:
        while not self._signal.wait(POLL_S):
            if self._done.is_set():
                return
        if self._done.is_set():
            return
        self.stopped.set()
        log.info("trial %s was stopped by the scheduler: ending its GRPO run", self.run_name)
        failed = False
        while not self._done.is_set():
            if not failed:  # the coordinator may not be up yet: try again
                failed = self._fail_run()
            self._drop_reports()

    def _fail_run(self) -> bool:
        import ray

        try:
            coordinator = ray.get_actor(coordinator_name(self.run_name))
            ray.get(coordinator.fail.remote(STOPPED, requested=True), timeout=FAIL_TIMEOUT_S)
        except Exception as error:
            log.debug("trial %s: could not fail its coordinator yet: %s", self.run_name, error)
            return False
        return True

    def _drop_reports(self) -> None:
        """Take the run's reports off Tune's queue (waits up to :data:`POLL_S`)."""
        from ray.util.queue import Empty

        try:
            self._reports.get(timeout=POLL_S)
        except Empty:
            pass
        except Exception as error:  # the queue's actor is gone: nothing blocks on it
            log.debug("trial %s: its report queue: %s", self.run_name, error)
            time.sleep(POLL_S)


def make_tuner(
    job: TuneJobConfig,
    base: dict[str, Any],
    sweep_uri: str,
    storage: Storage,
    callbacks: Sequence = (),
):
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from mmrad.tune.scheduler import make_scheduler

    reuse = job.trial.reuse_engines
    trainable = tune.with_resources(
        tune.with_parameters(
            grpo_trial, base=base, runs_uri=trial_runs_uri(sweep_uri), reuse_engines=reuse
        ),
        tune.PlacementGroupFactory([trial_shape(job)]),
    )
    filesystem, path = storage.arrow_filesystem(job.run.storage_path)
    experiment = join(path, job.run.name)
    resuming = tune.Tuner.can_restore(experiment, storage_filesystem=filesystem)
    identity = sweep_identity(job.model_dump(mode="json")["search_space"], base)
    check_or_record_sweep(storage, sweep_uri, identity, resuming)
    if resuming:
        log.info("resuming the sweep in %s", sweep_uri)
        return tune.Tuner.restore(
            experiment, trainable, resume_errored=True, storage_filesystem=filesystem
        )
    return tune.Tuner(
        trainable,
        param_space=to_tune_space(job.search_space),
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE_METRIC,
            mode="max",
            num_samples=job.num_samples,
            scheduler=make_scheduler(job, base["schedule"]["max_steps"]),
            # our own search algorithm caps concurrency (Tune's max_concurrent_trials
            # is ignored when a search algorithm is given)
            search_alg=BasicVariantGenerator(
                random_state=job.seed, max_concurrent=job.max_concurrent_trials
            ),
            reuse_actors=reuse,  # the next trial runs in a finished or stopped one's process
        ),
        run_config=tune.RunConfig(
            name=job.run.name,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=tune.FailureConfig(max_failures=job.trial.max_failures),
            callbacks=list(callbacks),
        ),
    )


def trial_runs_uri(sweep_uri: str) -> str:
    return join(sweep_uri, TRIAL_RUNS)


def trial_shape(job: TuneJobConfig) -> Shape:
    """A trial's own actor (the GRPO run's driver); its learners and engines ask for theirs."""
    return actor_shape(job.ray, cpus=job.trial.cpus)


def sweep_requests(job: TuneJobConfig, base: GRPOJobConfig) -> list[Request]:
    """What one trial asks: its own actor and its GRPO run's. Tune runs up to
    ``max_concurrent_trials`` of them where they fit and queues the rest, so one must fit."""
    return [Request("a trial's driver", trial_shape(job)), *grpo_requests(base)]


def run_tune(job: TuneJobConfig) -> TuneResult:
    base_job = with_absolute_paths(validate_config(GRPOJobConfig, trial_base(job)))
    base = base_job.model_dump(mode="json")
    job = with_absolute_paths(job)  # trials run in their own working directories
    storage = Storage.from_config(job.storage)
    grpo_records(base_job, storage)  # an empty split fails here, not in every trial
    check_tracking(job.run)
    init_ray(job.ray)
    check_or_log(job.ray, sweep_requests(job, base_job))
    sweep_uri = join(job.run.storage_path, job.run.name)
    with tracked(job.run, "tune", sweep_uri, job, storage) as tracking:
        callbacks = tune_callbacks(job.run, tracking, trial_runs_uri(sweep_uri), job.storage)
        results = make_tuner(job, base, sweep_uri, storage, callbacks).fit()
        outputs = write_sweep_outputs(results, job, base, sweep_uri, storage)
        tracking.log_rows(
            [{"step": 0, "trials": len(results), "best/objective": outputs.best_objective}]
        )
    return TuneResult(
        sweep_uri=sweep_uri,
        trials=len(results),
        best_trial=outputs.best_trial,
        best_objective=outputs.best_objective,
        best_config_uri=outputs.best_config_uri,
        results_uri=outputs.results_uri,
    )
