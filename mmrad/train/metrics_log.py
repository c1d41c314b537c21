"""Training metrics to JSONL and TensorBoard in the run directory.

Each row also goes to ``on_row`` (rank 0 posts it to the driver, which logs it to the
run's trackers: :mod:`mmrad.tracking`). TensorBoard is written when ``run.loggers``
names it.

Files are written locally (on the reporting worker): in the run directory itself when it
is local, else in a scratch folder that is uploaded whole to the object-store run directory
at every checkpoint (:meth:`MetricsLog.sync`) and at the end (objects cannot be appended
to).

Resumes. A run that restarts (a rerun of the same run name, or Ray Train restarting the
worker group) opens its log at the step it restored (``resume_step``: the checkpoint's
step, 0 when there was none). The JSONL tables the log owns (``metrics.jsonl`` and those
registered with :meth:`MetricsLog.table`, e.g. ``samples.jsonl``) are then read from the
run directory, cut to their rows with ``step <= resume_step`` (kept in their order; rows
of later steps will be logged again by the steps that run again, and a line torn by a
crash is dropped), written back (atomically: temp file + rename locally, one PUT on S3)
and appended to from there, so across any number of resumes each table holds every step's
rows exactly once.

TensorBoard event files cannot be cut: every (re)start writes a new event file beside the
earlier ones, and the earlier ones are left as they are, so after a resume TensorBoard may
show two points for the steps between the restored checkpoint and the crash (and, on S3,
keeps the points of steps whose event file was uploaded before the crash).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmrad.config import RESTART_ROW
from mmrad.storage import Storage, atomic_write_local, is_remote, join

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsLog:
    """The run's metrics (rank 0 only). ``local_dir`` is where the files are written (see
    :func:`metrics_dir`); ``resume_step`` is the step the run restored (0 for a fresh run:
    the tables of an earlier attempt without a checkpoint are emptied)."""

    def __init__(
        self,
        local_dir: Path,
        run_uri: str,
        storage: Storage,
        resume_step: int = 0,
        *,
        tensorboard: bool = True,
        on_row: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.local_dir = Path(local_dir)
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self.run_uri = run_uri
        self.storage = storage
        self.resume_step = resume_step
        self.tables: dict[str, Path] = {}
        self.metrics_path = self.table(METRICS_FILE)
        self.on_row = on_row
        if on_row is not None:  # the steps after resume_step run (again) from here
            on_row({"step": resume_step, RESTART_ROW: resume_step})
        self.writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(self.local_dir / TENSORBOARD_DIR))

    def table(self, name: str) -> Path:
        """The local path of the JSONL table ``name`` in this log's folder (rows with an
        integer ``step``; append to it). The first call cuts the run directory's table
        to its rows of steps up to ``resume_step``; the table is uploaded with the metrics."""
        if name in self.tables:
            return self.tables[name]
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"{name!r}: a table is a file name in the run directory")
        path = self.local_dir / name
        self.tables[name] = path
        remote = join(self.run_uri, name) if is_remote(self.run_uri) else None
        if remote is not None:
            text = self.storage.read_text(remote) if self.storage.exists(remote) else ""
        else:
            text = path.read_text(encoding="utf-8") if path.exists() else ""
        rows = _lines(text, remote or str(path))
        kept = [line for line, row in rows if _step_at_most(row, self.resume_step)]
        kept_text = "".join(line + "\n" for line in kept)
        if remote is not None or kept_text != text:
            atomic_write_local(path, kept_text.encode("utf-8"))
        if remote is not None and kept_text != text:
            self.storage.write_text(remote, kept_text)
        if kept_text != text:
            log.info("%s: kept %d rows up to step %d", remote or path, len(kept), self.resume_step)
        return path

    def log(self, step: int, metrics: dict[str, float | int | str]) -> None:
        row = {"step": step, "time": time.time(), **metrics}
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.on_row is not None:
            self.on_row(row)
        if self.writer is None:
            return
        for key, value in metrics.items():
            if isinstance(value, int | float):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)
            self.writer.flush()

    def sync(self) -> None:
        """Copy the metrics files into the run directory (a no-op when it is local)."""
        if is_remote(self.run_uri):
            self.storage.upload_dir(self.local_dir, self.run_uri)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.sync()


def _step_at_most(row: dict[str, Any], last: int) -> bool:
    step = row.get("step")
    return isinstance(step, int | float) and step <= last


def _lines(text: str, uri: str) -> list[tuple[str, dict[str, Any]]]:
    """``(line, row)`` for each JSON object line; a line that is not one (torn by a crash
    mid-write) is left out with a warning."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            out.append((line, row))
        else:
            log.warning("%s: line %d is not a JSON object; left out", uri, number)
    return out


def metrics_dir(run_uri: str, scratch: Path) -> Path:
    """Where a worker writes metrics: the run directory itself when local, else scratch."""
    return scratch if is_remote(run_uri) else Path(run_uri)


def read_table(storage: Storage, run_uri: str | Path, name: str) -> list[dict[str, Any]]:
    """The rows of the JSONL table ``name`` in the run directory (local or object store)."""
    text = storage.read_text(join(str(run_uri), name))
    lines = [line for line in text.splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if number == len(lines) and not text.endswith("\n"):
                break  # the last row, still being written
            raise
    return rows


def read_metrics(storage: Storage, run_uri: str) -> list[dict]:
    return read_table(storage, run_uri, METRICS_FILE)


def readable_metrics(storage: Storage, run_uri: str) -> list[dict]:
    """Every row of the run's ``metrics.jsonl`` that can be read, a line torn by a crash
    left out with a warning (for the trackers' last pass, which must not lose a whole
    table to one line)."""
    uri = join(str(run_uri), METRICS_FILE)
    return [row for _, row in _lines(storage.read_text(uri), uri)]
