"""A sweep's trials tracked by Ray Tune's own logger callbacks (mmrad's MLflow one and
Ray's W&B one, offline), on the session's Ray with a trainable that reports like a GRPO
trial: each validation with its ``step``, and a run folder of its own."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from ray import cloudpickle

from mmrad.config import MlflowSection, StorageConfig, TrackedRunSection, WandbSection
from mmrad.storage import Storage
from mmrad.tracking.run import tracked
from mmrad.tracking.tune import tune_callbacks
from tests.helpers.tracking import artifact_names, history
from tests.helpers.wandb_offline import offline_history

pytestmark = pytest.mark.integration
# Tune's trial actors cannot import this test module by name: send its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def a_trial(config: dict, runs: str) -> None:
    """Two validations at GRPO steps 1 and 2, and a metrics table in the trial's folder."""
    from ray import tune

    folder = Path(runs) / tune.get_context().get_trial_id()
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    for step in (1, 2):
        tune.report({"step": step, "val/objective": config["x"] * step})


def test_each_trial_is_a_run_under_the_sweeps_with_its_validations_and_files(ray_cluster, tmp_path):
    from mlflow import MlflowClient
    from ray import tune

    run = TrackedRunSection(
        loggers=["mlflow", "wandb"],
        mlflow=MlflowSection(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"),
        wandb=WandbSection(mode="offline", dir=str(tmp_path / "wandb")),
    )
    sweep, runs = str(tmp_path / "sweep"), str(tmp_path / "sweep" / "grpo")
    with tracked(run, "tune", sweep, run, Storage()) as tracking:
        callbacks = tune_callbacks(run, tracking, runs, StorageConfig())
        trainable = tune.with_resources(tune.with_parameters(a_trial, runs=runs), {"cpu": 0.1})
        tuner = tune.Tuner(
            trainable,
            param_space={"x": tune.grid_search([1, 2])},
            run_config=tune.RunConfig(
                name="t", storage_path=str(tmp_path / "tune"), callbacks=callbacks
            ),
        )
        results = tuner.fit()
        parent = tracking.trackers["mlflow"].run_id
    assert not results.errors

    client = MlflowClient(tracking_uri=run.mlflow.tracking_uri)
    trials = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent}'",
    )
    assert len(trials) == 2
    objectives = set()
    for trial in trials:
        assert trial.info.status == "FINISHED"
        points = history(trial.info.run_id, client)["val/objective"]
        assert [step for step, _ in points] == [1, 2]  # at the GRPO step, not Tune's count
        objectives.add(tuple(value for _, value in points))
        assert "metrics.jsonl" in artifact_names(trial.info.run_id, client)
        assert trial.data.params["x"] in ("1", "2")
    assert objectives == {(1.0, 2.0), (2.0, 4.0)}

    wandb_dir = tmp_path / "wandb"
    logged = {}
    for folder in wandb_dir.glob("wandb/offline-run-*"):
        run_id = folder.name.rsplit("-", 1)[1]
        steps = offline_history(wandb_dir, run_id)
        values = sorted(row["val/objective"] for row in steps.values() if "val/objective" in row)
        if values:
            logged[run_id] = values
    assert sorted(logged.values()) == [[1, 2], [2, 4]]  # both trials, from Ray's W&B actors
