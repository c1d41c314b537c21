"""``mmrad tune`` / ``python -m ray_jobs.tune``: a reward-weight sweep on Ray Tune.

Each trial runs a short GRPO (:func:`mmrad.rl.job.run_grpo`, its own ``TorchTrainer``
of learners and vLLM rollout pool inside the trial, the Train V2 way) from the shared SFT
export, with the trial's values of the search space set on the GRPO config. The GRPO run
validates every ``validate_every`` steps; ``TuneReportCallback`` hands those reports to
Tune, so ASHA stops weak trials on ``val/objective`` while they run. With
``trial.reuse_engines`` (and the FIFO scheduler) Tune runs the next trial in a finished
trial's process (``reuse_actors``), which keeps its vLLM engines for it, reset to the
starting weights (:mod:`mmrad.rl.kept_engines`): one engine start per concurrent trial
instead of one per trial.

The sweep lives under ``<run.storage_path>/<run.name>``: Tune's experiment state, each
trial's GRPO run in ``grpo/<trial id>``, and at the end ``results.csv``, ``results.md``,
``objective.png`` and ``best_grpo.yaml`` (the winning trial's GRPO config, runnable as
is). Rerunning the same sweep resumes it with ``Tuner.restore``: finished trials are kept,
unfinished ones start again and their GRPO runs continue from their last checkpoint. A
rerun with another search space or base config is refused (:mod:`mmrad.tune.resume`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mmrad.config import validate_config, with_absolute_paths
from mmrad.placement import Request, Shape, actor_shape, check_or_log
from mmrad.ray_env import init_ray
from mmrad.rl.config import GRPOJobConfig
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
    Tune runs on it (:mod:`mmrad.rl.kept_engines`)."""
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
    run_grpo(job, train_callbacks=[TuneReportCallback()], engines=KEPT if reuse_engines else None)


def make_scheduler(job: TuneJobConfig, max_steps: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if job.scheduler.kind == "fifo":
        return FIFOScheduler()
    validations = -(-max_steps // job.validate_every)
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=max(validations, job.scheduler.grace_period),
        grace_period=job.scheduler.grace_period,
        reduction_factor=job.scheduler.reduction_factor,
    )


def make_tuner(
    job: TuneJobConfig,
    base: dict[str, Any],
    sweep_uri: str,
    storage: Storage,
    callbacks: Sequence = (),
):
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    reuse = reuses_engines(job)
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
            reuse_actors=reuse,  # the next trial runs in a finished one's process
        ),
        run_config=tune.RunConfig(
            name=job.run.name,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=tune.FailureConfig(max_failures=job.trial.max_failures),
            callbacks=list(callbacks),
        ),
    )


def reuses_engines(job: TuneJobConfig) -> bool:
    """Whether trials keep their engines for the next trial (``trial.reuse_engines``).
    Only where no trial is stopped early: a trial that ASHA stops goes on running its
    GRPO run in its process, and Tune's reset of that process for the next trial fails
    (that trial errors) unless the run ends within seconds."""
    if job.trial.reuse_engines and job.scheduler.kind != "fifo":
        log.info("trial.reuse_engines applies to scheduler.kind=fifo only; engines not kept")
    return job.trial.reuse_engines and job.scheduler.kind == "fifo"


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
