"""Reading what a job logged back through MLflow's own client (the session's store)."""

from __future__ import annotations

import os
from collections import defaultdict

from mlflow import MlflowClient

from mmrad.tracking.mlflow_run import RUN_KEY_TAG, run_key
from mmrad.tracking.values import metric_values


def client() -> MlflowClient:
    return MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


def runs_of(run_uri: str, experiment: str):
    """Every MLflow run tagged with the run directory ``run_uri``."""
    found = client().get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment}"
    return client().search_runs(
        [found.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key(run_uri)}'"
    )


def the_run_of(run_uri: str, experiment: str):
    runs = runs_of(run_uri, experiment)
    assert len(runs) == 1, f"{len(runs)} MLflow runs for {run_uri}"
    return runs[0]


def history(run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every logged point of every metric of the run: key -> [(step, value)] by step."""
    run = client().get_run(run_id)
    return {
        key: sorted((p.step, p.value) for p in client().get_metric_history(run_id, key))
        for key in run.data.metrics
    }


def table_history(rows) -> dict[str, list[tuple[int, float]]]:
    """The same shape from a run's ``metrics.jsonl`` rows."""
    out = defaultdict(list)
    for row in rows:
        for key, value in metric_values(row).items():
            out[key].append((int(row["step"]), value))
    return {key: sorted(points) for key, points in out.items()}


def artifact_names(run_id: str) -> set[str]:
    return {item.path for item in client().list_artifacts(run_id)}


TIMINGS = ("perf/", "time/")
"""Metrics that measure speed: a step that ran again after a crash (and that MLflow keeps
from its first run) measured another speed; every other metric is reproduced exactly."""


def assert_tracked_as_its_table(run_uri: str, experiment: str):
    """The run directory has one MLflow run, finished, whose every metric holds each
    step once with the value of the run's ``metrics.jsonl`` (timings: the steps only);
    returns the run."""
    from mmrad.storage import Storage
    from mmrad.train.metrics_log import read_metrics

    run = the_run_of(run_uri, experiment)
    assert run.info.status == "FINISHED"
    logged, table = history(run.info.run_id), table_history(read_metrics(Storage(), run_uri))
    for points in (logged, table):
        for key in points:
            if key.startswith(TIMINGS):
                points[key] = [step for step, _ in points[key]]
    differ = {key: (logged.get(key), table.get(key)) for key in logged.keys() | table.keys()
              if logged.get(key) != table.get(key)}  # fmt: skip
    assert not differ, f"MLflow vs metrics.jsonl: {differ}"
    return run
