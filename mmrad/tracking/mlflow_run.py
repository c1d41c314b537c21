"""One MLflow run per mmrad run, found again when the same run directory runs again.

The embedded default is a SQLite file (``run.mlflow.store``, ``runs/mlflow.db``), not
MLflow's file store (``mlruns/``): MLflow 3 deprecates the file store, and a database
answers the UI's searches over many runs without walking thousands of small files. A
tracking server (``run.mlflow.tracking_uri`` or ``$MLFLOW_TRACKING_URI``) replaces it on
clusters.

A rerun of a run directory (a resume) reopens the MLflow run tagged with that
directory. Each step is logged once, except a step that runs again after a crash (after
the restored checkpoint): it is logged again, MLflow keeps both points, and its latest
(what charts and the run's summary show) is the run's, as in ``metrics.jsonl``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mmrad.config import RESTART_ROW, MlflowSection
from mmrad.storage import local_path
from mmrad.tracking.values import metric_values, shown

log = logging.getLogger(__name__)

RUN_KEY_TAG = "mmrad.run_key"
RUN_URI_TAG = "mmrad.run_uri"
JOB_TAG = "mmrad.job"
ARTIFACTS_DIR = "mlartifacts"
METRICS_PER_CALL = 1000  # MLflow's log_batch limits
PARAMS_PER_CALL = 100


def tracking_uri(section: MlflowSection) -> str:
    """The configured server, else ``$MLFLOW_TRACKING_URI``, else the embedded store."""
    if section.tracking_uri:
        return section.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{embedded_store(section)}"


RAY_JOB_FILES = ("runtime_resources", "working_dir_files")
"""Where Ray unpacks a submitted job's working directory (and deletes it later)."""


def embedded_store(section: MlflowSection) -> Path:
    """The SQLite file. A store that lies in the copy of the working directory that
    ``ray job submit --working-dir`` made (a relative ``store`` of a submitted job) moves
    to the same place under ``~/mmrad`` on the driver's node: Ray deletes that copy, and
    every submission gets a new one, so the runs would be lost and never resumed."""
    path = Path(os.path.normpath(local_path(section.store).absolute()))
    parts = path.parts
    for index in range(len(parts) - 2):
        if parts[index : index + 2] == RAY_JOB_FILES:
            moved = Path.home() / "mmrad" / Path(*parts[index + 3 :])
            log.info("MLflow: the job's working directory is Ray's copy; store in %s", moved)
            return moved
    return path


def artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store go beside the database file (MLflow's default is a
    folder in the working directory); a server decides for itself."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///") :]).parent / ARTIFACTS_DIR).absolute().as_uri()


def run_key(run_uri: str) -> str:
    """A tag value that identifies a run directory (its URI may hold quotes)."""
    return hashlib.sha256(run_uri.encode()).hexdigest()[:24]


HTTP_DEFAULTS = {
    # MLflow 3 reports usage to its developers unless told not to; a training cluster
    # should not phone home without its owner asking (set the variable to opt in).
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # MLflow's own defaults (7 retries with backoff, 120 s per request) hold a job's
    # driver for many minutes per call when a server is down; a user's settings win.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def mlflow_client(uri: str):
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def experiment_id(client, name: str, location: str | None) -> str:
    """The experiment ``name``, created when missing (another driver may create it at
    the same moment: then theirs is used)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


class MlflowRun:
    """A run in MLflow that takes a run's parameters, metric rows and files."""

    def __init__(self, client, run_id: str, last_steps: dict[str, int]):
        self.client = client
        self.run_id = run_id
        self.last_steps = last_steps  # per metric key, the last step MLflow has

    @classmethod
    def open(
        cls,
        section: MlflowSection,
        experiment: str,
        name: str,
        run_uri: str,
        job: str,
        resume: bool = True,
    ) -> MlflowRun:
        """The run of ``run_uri`` (reopened when ``resume`` and it exists, else new)."""
        uri = tracking_uri(section)
        client = mlflow_client(uri)
        exp_id = experiment_id(client, experiment, artifact_location(uri))
        key = run_key(run_uri)
        earlier = resume and client.search_runs(
            [exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1
        )
        if earlier:
            run_id = earlier[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            last_steps = logged_steps(client, run_id, earlier[0].data.metrics)
            log.info("MLflow: resuming run %s in %s (%s)", run_id, experiment, shown(uri))
            return cls(client, run_id, last_steps)
        tags = {RUN_KEY_TAG: key, RUN_URI_TAG: run_uri, JOB_TAG: job}
        run = client.create_run(exp_id, run_name=name, tags=tags)
        log.info("MLflow: run %s in %s (%s)", run.info.run_id, experiment, shown(uri))
        return cls(client, run.info.run_id, {})

    def log_params(self, params: Mapping[str, str]) -> None:
        """New parameters; one a resume changed keeps its first value (MLflow refuses
        to change one) and is named in a warning (``config.yaml`` holds the new one)."""
        from mlflow.entities import Param

        before = self.client.get_run(self.run_id).data.params
        changed = sorted(k for k, v in params.items() if k in before and before[k] != v)
        if changed:
            log.warning("MLflow run %s keeps the first values of %s", self.run_id, changed)
        new = [Param(k, v) for k, v in params.items() if k not in before]
        for chunk in chunks(new, PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=chunk)

    def log_rows(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Each row's numbers at its ``step``, those of steps past what MLflow has (rows
        come in step order: live, then the run's whole table at the end). A restart row
        (a resumed or restarted run) rewinds to its step: the steps after it are logged
        again, so MLflow's latest value at a step is the one of the run that went on.
        A step counts as logged once its batch is in; a failed batch is sent again."""
        from mlflow.entities import Metric

        last = dict(self.last_steps)
        metrics = []
        for row in rows:
            step = int(row.get("step", 0))
            if RESTART_ROW in row:
                last = {key: min(seen, step) for key, seen in last.items()}
                continue
            stamp = int(1000 * float(row.get("time") or time.time()))
            for key, value in metric_values(row).items():
                if step > last.get(key, -1):
                    last[key] = step
                    metrics.append(Metric(key, value, stamp, step))
        log_metrics(self.client, self.run_id, metrics)
        self.last_steps = last

    def log_files(self, paths: Sequence[Path]) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path))

    def finish(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def log_metrics(client, run_id: str, metrics: Sequence) -> None:
    r"""``metrics`` (MLflow ``Metric``\ s) in as few calls as MLflow allows."""
    for chunk in chunks(metrics, METRICS_PER_CALL):
        client.log_batch(run_id, metrics=chunk)


def logged_steps(client, run_id: str, latest: Mapping[str, float]) -> dict[str, int]:
    """Per metric key of a resumed run, the last step MLflow has."""
    return {
        key: max(point.step for point in client.get_metric_history(run_id, key)) for key in latest
    }


def chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    return (items[start : start + size] for start in range(0, len(items), size))
