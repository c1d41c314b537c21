"""A progress bar in the driver for work that runs in Ray workers.

Workers push ``(step, total, summary)`` to a small named actor; the driver runs the
blocking call (``trainer.fit``) in a thread and polls the actor into a rich progress bar.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mmrad.actor_names import wait_until_free


@ray.remote(num_cpus=0)
class ProgressBoard:
    def __init__(self):
        self.step, self.total, self.summary = 0, None, ""

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


def run_with_progress(description: str, run_name: str, work: Callable[[], Any]) -> Any:
    """Run ``work()`` in a thread while drawing the board of ``run_name``."""
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
            except Exception:
                time.sleep(0.5)
    ray.kill(board)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")
