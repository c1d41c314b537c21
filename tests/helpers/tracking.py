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


def latest_by_step(points) -> dict[int, float]:
    """MLflow metric points as ``step -> value``, the latest logged where a step has
    several (a step a resumed run ran again)."""
    return {p.step: p.value for p in sorted(points, key=lambda p: (p.step, p.timestamp))}


def history(run_id: str, store: MlflowClient | None = None) -> dict[str, list[tuple[int, float]]]:
    """Every metric of the run: key -> [(step, latest value at that step)] by step."""
    store = store or client()
    run = store.get_run(run_id)
    return {
        key: sorted(latest_by_step(store.get_metric_history(run_id, key)).items())
        for key in run.data.metrics
    }


def table_history(rows) -> dict[str, list[tuple[int, float]]]:
    """The same shape from a run's ``metrics.jsonl`` rows."""
    out = defaultdict(list)
    for row in rows:
        for key, value in metric_values(row).items():
            out[key].append((int(row["step"]), value))
    return {key: sorted(points) for key, points in out.items()}


def artifact_names(run_id: str, store: MlflowClient | None = None) -> set[str]:
    return {item.path for item in (store or client()).list_artifacts(run_id)}


def assert_tracked_as_its_table(run_uri: str, experiment: str):
    """The run directory has one MLflow run, finished, whose every metric has every step
    of the run's ``metrics.jsonl`` with its value there (the latest point where a resumed
    run logged a step again); returns the run."""
    from mmrad.storage import Storage
    from mmrad.train.metrics_log import read_metrics

    run = the_run_of(run_uri, experiment)
    assert run.info.status == "FINISHED"
    logged, table = history(run.info.run_id), table_history(read_metrics(Storage(), run_uri))
    differ = {key: (logged.get(key), table.get(key)) for key in logged.keys() | table.keys()
              if logged.get(key) != table.get(key)}  # fmt: skip
    assert not differ, f"MLflow vs metrics.jsonl: {differ}"
    return run
