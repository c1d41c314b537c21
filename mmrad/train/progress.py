"""A progress bar in the driver for work that runs in Ray workers.

Workers push ``(step, total, summary)`` to a small named actor; the driver runs the
blocking call (``trainer.fit``) in a thread and polls the actor into a rich progress bar.
The same actor carries the run's metric rows to the driver, which logs them to the run's
trackers (:mod:`mmrad.tracking`) as they come.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mmrad.actor_names import wait_until_free

MAX_WAITING_ROWS = 10_000
"""Rows the board keeps for a driver that does not take them (the oldest go first; the
driver's last pass over the run's table logs them anyway)."""


@ray.remote(num_cpus=0)
class ProgressBoard:
    def __init__(self):
        self.step, self.total, self.summary = 0, None, ""
        self.rows: collections.deque = collections.deque(maxlen=MAX_WAITING_ROWS)

    def post_rows(self, rows: list[dict]) -> None:
        self.rows.extend(rows)

    def take_rows(self) -> list[dict]:
        rows = list(self.rows)
        self.rows.clear()
        return rows

    def update(self, step: int, total: int | None, summary: str = "") -> None:
        self.step, self.total, self.summary = step, total, summary

    def read(self) -> tuple[int, int | None, str]:
        return self.step, self.total, self.summary


def board_name(run_name: str) -> str:
    return f"mmrad-progress-{run_name}"


def open_board(run_name: str):
    name = board_name(run_name)
    wait_until_free(name, f"run.name {run_name}")  # a killed driver's board is ending
    return ProgressBoard.options(name=name).remote()


def report_progress(run_name: str, step: int, total: int | None, summary: str = "") -> None:
    """Called from a worker; never fails the caller."""
    with contextlib.suppress(Exception):
        ray.get_actor(board_name(run_name)).update.remote(step, total, summary)


def post_rows(run_name: str, rows: list[dict]) -> None:
    """Called from a worker: metric rows for the driver's trackers; never fails the caller."""
    with contextlib.suppress(Exception):
        ray.get_actor(board_name(run_name)).post_rows.remote(rows)


def row_poster(run) -> Callable[[dict], None] | None:
    """What rank 0 hands each metrics row to (``run``: the job's run section): the run's
    board, when its driver logs to trackers."""
    if not run.driver_trackers:
        return None
    return RowPoster(run.name)


class RowPoster:
    """Posts rows to the board of ``run_name``, looked up once (not at every row); never
    fails the caller."""

    def __init__(self, run_name: str):
        self.run_name = run_name
        self.board = None

    def __call__(self, row: dict) -> None:
        with contextlib.suppress(Exception):
            self.board = self.board or ray.get_actor(board_name(self.run_name))
            self.board.post_rows.remote([row])


def run_with_progress(
    description: str,
    run_name: str,
    work: Callable[[], Any],
    on_rows: Callable[[list[dict]], None] | None = None,
) -> Any:
    """Run ``work()`` in a thread while drawing the board of ``run_name``, handing the
    metric rows workers post to ``on_rows``."""
    board = open_board(run_name)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as err:
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[summary]}"),
    ]
    with Progress(*columns) as bar:
        task = bar.add_task(description, total=None, summary="")
        thread.start()
        while thread.is_alive():
            thread.join(timeout=1.0)
            try:
                step, total, summary = ray.get(board.read.remote(), timeout=5)
                bar.update(task, completed=step, total=total, summary=summary)
                hand_over_rows(board, on_rows)
            except Exception:
                time.sleep(0.5)
    with contextlib.suppress(Exception):
        hand_over_rows(board, on_rows)
    ray.kill(board)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def hand_over_rows(board, on_rows: Callable[[list[dict]], None] | None) -> None:
    if on_rows is not None:
        rows = ray.get(board.take_rows.remote(), timeout=5)
        if rows:
            on_rows(rows)
