"""The trackers ``run.loggers`` names, opened for one run by its driver.

Opening checks everything a user can get wrong (a tracker not installed, a server that
does not answer) and fails before Ray starts. Once the run is going, a tracker that
fails is named in a warning and the run goes on: the run directory's own tables stay
complete, and the final pass logs what a tracker missed.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from mmrad.config import TrackedRunSection
from mmrad.storage import Storage, is_remote, local_path
from mmrad.tracking.values import flat_params, shown

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 100 * 2**20
"""Run files bigger than this stay in the run directory only (prediction tables of a
whole benchmark can be)."""


class TrackingError(RuntimeError):
    """A tracker named in ``run.loggers`` cannot be used; the message says why."""


def experiment_name(run: TrackedRunSection, job: str) -> str:
    return run.mlflow.experiment or f"mmrad-{job}"


class RunTracking:
    """One run's trackers: every call goes to each of them. A tracker that fails while
    the run goes on is left alone for the rest of it (a server that is down would hold
    the driver's progress loop at every row); the last pass tries it again."""

    def __init__(self, trackers: Mapping[str, Any], storage: Storage, run_uri: str):
        self.trackers = dict(trackers)
        self.storage = storage
        self.run_uri = run_uri
        self.failing: set[str] = set()

    def log_rows(self, rows: Iterable[Mapping[str, Any]]) -> None:
        rows = list(rows)
        if rows:
            self._each("log metrics", lambda tracker: tracker.log_rows(rows))

    def last_pass(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """The run's whole table, for what a tracker has not had (every tracker again)."""
        self.failing.clear()
        self.log_rows(rows)

    def log_run_files(self) -> None:
        """The run directory's own files (config, run info, tables, reports, figures),
        not its folders (checkpoints, exports, TensorBoard)."""
        if not self.trackers:
            return
        with run_files(self.storage, self.run_uri) as paths:
            self._each("log files", lambda tracker: tracker.log_files(paths))

    def finish(self, failed: bool) -> None:
        self._each("finish", lambda tracker: tracker.finish(failed))

    def _each(self, what: str, call: Callable[[Any], None]) -> None:
        for name, tracker in self.trackers.items():
            if name in self.failing:
                continue
            try:
                call(tracker)
            except Exception as err:  # the run matters more than its tracking
                self.failing.add(name)
                log.warning("%s: %s failed (%s: %s); the run goes on", name, what,
                            type(err).__name__, shown(str(err)))  # fmt: skip


def check_tracking(run: TrackedRunSection) -> None:
    """Fail fast (before Ray starts) when a tracker of ``run.loggers`` cannot be used: not
    installed, or a tracking store that does not answer."""
    if "mlflow" in run.loggers:
        _opened("mlflow", lambda: _mlflow_answers(run))
    if "wandb" in run.loggers:
        _opened("wandb", lambda: importlib.import_module("wandb"), extra=EXTRAS["wandb"])
        if run.wandb.mode == "online" and not wandb_key_known():
            raise TrackingError(
                "run.loggers names wandb online, but no W&B key is set: export "
                "WANDB_API_KEY (or run `wandb login`), or set run.wandb.mode=offline"
            )


def wandb_key_known() -> bool:
    """A key in the environment or in ``~/.netrc`` (where ``wandb login`` puts it)."""
    netrc = Path.home() / ".netrc"
    in_netrc = netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="replace")
    return bool(os.environ.get("WANDB_API_KEY")) or in_netrc


CHECK_RETRIES = "1"
CHECK_TIMEOUT_S = "10"


def _mlflow_answers(run: TrackedRunSection) -> None:
    """One query to the store; a server gets one retry (MLflow's default backoff would
    keep a user waiting minutes for a mistyped address) unless the user set their own."""
    from mmrad.tracking.mlflow_run import mlflow_client, tracking_uri

    quick = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": CHECK_RETRIES,
        "MLFLOW_HTTP_REQUEST_TIMEOUT": CHECK_TIMEOUT_S,
    }
    added = [name for name in quick if name not in os.environ]
    os.environ.update({name: quick[name] for name in added})
    try:
        mlflow_client(tracking_uri(run.mlflow)).search_experiments(max_results=1)
    finally:
        for name in added:
            os.environ.pop(name, None)


def open_tracking(
    run: TrackedRunSection,
    job: str,
    run_uri: str,
    config: BaseModel,
    storage: Storage,
    resume: bool = True,
) -> RunTracking:
    """The trackers of ``run.loggers`` (none when it names neither MLflow nor W&B), each
    with the run's resolved config as parameters. ``resume``: a rerun of ``run_uri``
    continues its tracked run (training); else every call starts a new one (evaluation
    writes its results afresh). Raises :class:`TrackingError`."""
    params = flat_params(config.model_dump(mode="json"))
    name = "/".join(run_uri.rstrip("/").split("/")[-2:])  # e.g. sft-4cace6d610/sft
    openers = {
        "mlflow": lambda: _mlflow(run, job, name, run_uri, resume, params),
        "wandb": lambda: _wandb(run, job, name, run_uri, params, resume),
    }
    trackers: dict[str, Any] = {}
    try:
        for logger in [logger for logger in run.loggers if logger in openers]:
            trackers[logger] = _opened(logger, openers[logger], extra=EXTRAS.get(logger))
    except TrackingError:
        RunTracking(trackers, storage, run_uri).finish(failed=True)  # none left RUNNING
        raise
    return RunTracking(trackers, storage, run_uri)


EXTRAS = {"wandb": "wandb"}  # the pip extra that installs a tracker mmrad does not require


def _mlflow(run: TrackedRunSection, job: str, name: str, run_uri: str, resume: bool, params):
    from mmrad.tracking.mlflow_run import MlflowRun

    opened = MlflowRun.open(run.mlflow, experiment_name(run, job), name, run_uri, job, resume)
    opened.log_params(params)
    return opened


def _wandb(run: TrackedRunSection, job: str, name: str, run_uri: str, params, resume: bool):
    from mmrad.tracking.wandb_run import WandbRun

    return WandbRun.open(run.wandb, name, run_uri, job, params, resume)


def _opened(logger: str, opener: Callable[[], Any], extra: str | None = None):
    try:
        return opener()
    except ModuleNotFoundError as err:
        hint = f"pip install 'mmrad[{extra}]'" if extra else "reinstall mmrad"
        raise TrackingError(
            f"run.loggers names {logger}, but {err.name} is not installed ({hint}), "
            f"or leave {logger} out of run.loggers"
        ) from None
    except Exception as err:
        raise TrackingError(
            f"run.loggers names {logger}, which cannot be opened: "
            f"{type(err).__name__}: {shown(str(err))}"
        ) from None


@contextlib.contextmanager
def tracked(
    run: TrackedRunSection,
    job: str,
    run_uri: str,
    config: BaseModel,
    storage: Storage,
    final_rows: Callable[[], Iterable[Mapping[str, Any]]] | None = None,
    resume: bool = True,
) -> Iterator[RunTracking]:
    """Open the run's trackers (see :func:`open_tracking`) and, for a rerun, log the rows
    of ``final_rows`` a tracker lacks (a driver killed before it forwarded them: the
    table's rows before its restart row never reach the live rows); at the end, also when
    the run fails, log the rows a tracker has not had, the run directory's files, and
    the outcome."""
    tracking = open_tracking(run, job, run_uri, config, storage, resume)
    if tracking.trackers and final_rows is not None and resume:
        with contextlib.suppress(Exception):  # no table yet: a new run
            tracking.log_rows(final_rows())
    failed = True
    try:
        yield tracking
        failed = False
    finally:
        if tracking.trackers:
            if final_rows is not None:
                with contextlib.suppress(Exception):  # no table yet: a run that never started
                    tracking.last_pass(final_rows())
            tracking.log_run_files()
            tracking.finish(failed)


@contextlib.contextmanager
def run_files(storage: Storage, run_uri: str) -> Iterator[list[Path]]:
    """Local paths of the files at the top of the run directory (downloaded from object
    storage into a temporary folder), skipping hidden ones (Ray Train's markers) and any
    over :data:`MAX_FILE_BYTES`."""
    base = run_uri.rstrip("/")
    names = {uri: uri[len(base) + 1 :] for uri in storage.list(base)}
    uris = [uri for uri, name in names.items() if "/" not in name and not name.startswith(".")]
    if not is_remote(base):
        yield [p for p in map(local_path, uris) if p.stat().st_size <= MAX_FILE_BYTES]
        return
    with tempfile.TemporaryDirectory(prefix="mmrad-run-files-") as scratch:
        paths = []
        for uri in uris:
            data = storage.read_bytes(uri)
            if len(data) <= MAX_FILE_BYTES:
                path = Path(scratch) / uri.rsplit("/", 1)[-1]
                path.write_bytes(data)
                paths.append(path)
        yield paths
