"""Finding and killing the processes of this test session's Ray (descendants of the
pytest process only: another Ray on the same machine is never touched)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import psutil


def ray_processes(title_prefix: str) -> list[psutil.Process]:
    """This session's Ray worker processes whose title starts with ``title_prefix``
    (``ray::RayTrainWorker``, ``ray::RolloutWorker.generate``, ...)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            title = process.cmdline()[0] if process.cmdline() else ""
        except psutil.Error:
            continue
        if title.startswith(title_prefix):
            found.append(process)
    return found


def train_workers() -> list[int]:
    return [p.pid for p in ray_processes("ray::RayTrainWorker")]


def busy_train_workers(threshold: float = 10.0) -> list[int]:
    """Train workers computing right now (above ``threshold`` percent of a CPU over a
    short window), not waiting on a remote call such as a learner's wait for its batch
    in ``Coordinator.shard``, which takes no CPU. Low, because on a loaded 2-core machine
    a computing learner may get a quarter of a core: at 30% the kill never came."""
    workers = ray_processes("ray::RayTrainWorker")
    try:
        for process in workers:
            process.cpu_percent(None)
        time.sleep(0.3)
        return [p.pid for p in workers if p.cpu_percent(None) > threshold]
    except psutil.Error:
        return []


def kill_one_when(
    ready: Callable[[], bool], victims: Callable[[], list[int]], timeout_s: float = 900
) -> tuple[threading.Thread, list[int]]:
    """Start a thread that SIGKILLs one of ``victims()`` once ``ready()`` (no injected
    exception: the process just dies); returns the thread and the list it appends the
    killed pid to."""
    killed: list[int] = []

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready() and (pids := victims()):
                os.kill(pids[-1], signal.SIGKILL)
                killed.append(pids[-1])
                return
            time.sleep(0.1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, killed
