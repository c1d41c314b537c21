"""Injecting faults at their critical moment, by watching what a GRPO run's coordinator
reports (:meth:`~mmrad.rl.coordinator.Coordinator.status`), and recording each fault
test's figures in ``runs/faults.json``; ``python -m tests.helpers.fault_table --write
README.md`` keeps them in ``docs/faults.json`` and writes the README's table."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
import ray

from mmrad.rl.coordinator import coordinator_name
from tests.helpers.processes import ray_processes

ROOT = Path(__file__).resolve().parents[2]
LAST_RUN = ROOT / "runs" / "faults.json"  # what the fault tests of the last run measured
T = TypeVar("T")


def coordinator_status(run_name: str) -> dict[str, Any] | None:
    """The run's coordinator's status (``None`` while it is not up)."""
    try:
        actor = ray.get_actor(coordinator_name(run_name))
        return ray.get(actor.status.remote(), timeout=30)
    except (ValueError, ray.exceptions.RayError):
        return None


def wait_for(condition: Callable[[], T], what: str, timeout_s: float = 600.0) -> T:
    """``condition()``'s first truthy value; fails naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(0.1)
    return value


@dataclass
class Kill:
    """One injected death: which worker, at which weight version, and how long the run
    took until a replacement held the weights (``seconds_to_recover``)."""

    worker: str
    version: int
    pid: int
    seconds_to_recover: float = 0.0
    at: float = field(default_factory=time.monotonic)


def idle_before_a_sync(run_name: str) -> dict[str, Any] | None:
    """The status when the engines idle until the learners' next weights: the producer
    waits for them, no receive is in flight and no engine is behind."""
    status = coordinator_status(run_name)
    if status is None or not status["producing"].startswith("waiting for weights"):
        return None
    pool = status["pool"]
    return status if not pool["receiving"] and not pool["behind"] else None


def the_rollout_process() -> int | None:
    """The pid of the only live rollout actor (one-worker pools: its engine core runs in
    it, the in-process layout)."""
    live = []
    for process in ray_processes("ray::RolloutWorker"):
        with contextlib.suppress(psutil.Error):
            if process.status() != psutil.STATUS_ZOMBIE:
                live.append(process.pid)
    return live[0] if len(live) == 1 else None


def kill_rollout_engines_while_they_receive(
    run_name: str, count: int
) -> tuple[threading.Thread, list[Kill]]:
    """Start a thread that, ``count`` times in a row, freezes the rollout worker's
    process (SIGSTOP) while it idles before a sync, waits until the coordinator shows
    its receive of the new weights in flight, SIGKILLs it, and waits until its
    replacement holds the weights. The second kill hits the first's replacement."""
    kills: list[Kill] = []

    def sabotage() -> None:
        for _ in range(count):
            status = wait_for(lambda: idle_before_a_sync(run_name), "the engines idle")
            worker = status["pool"]["workers"][0]
            pid = wait_for(the_rollout_process, f"the process of {worker}")
            os.kill(pid, signal.SIGSTOP)
            (receiving,) = wait_for(lambda w=worker: receive_in_flight(run_name, w),
                                    f"{worker} receiving weights")  # fmt: skip
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            wait_for(lambda w=worker: recovered(run_name, w), f"a replacement of {worker}")
            kills.append(Kill(worker, receiving, pid, time.monotonic() - killed_at))

    thread = threading.Thread(target=sabotage, name="fault-saboteur", daemon=True)
    thread.start()
    return thread, kills


def receive_in_flight(run_name: str, worker: str) -> tuple[int] | None:
    """``(version,)`` of ``worker``'s weight receive in flight, if any."""
    receiving = ((coordinator_status(run_name) or {}).get("pool") or {}).get("receiving", {})
    return (receiving[worker],) if worker in receiving else None


def recovered(run_name: str, dead_worker: str) -> bool:
    """Whether ``dead_worker`` is replaced and every worker holds the current weights."""
    status = coordinator_status(run_name)
    if status is None:
        return False
    pool = status["pool"]
    return dead_worker not in pool["workers"] and not pool["behind"] and not pool["receiving"]


@contextlib.contextmanager
def s3_faults(
    chaos, every: int = 8, limit: int = 6, path: bytes = b"/datasets/"
) -> Iterator[Counter[str]]:
    """For the block, every ``every``-th GET of mmrad's own S3 reads under ``path`` (the
    data sets: images and manifests, not the test's own polling of checkpoints) cut
    mid-body and every ``every``-th answered 503 SlowDown, ``limit`` of each (the
    session's background rate after); yields the counts injected, filled in at the end,
    and fails the test when none of either kind fired."""
    before = chaos.counts()
    replaced = {kind: chaos.fault_every(kind, every, limit, path)
                for kind in ("reset", "unavailable")}  # fmt: skip
    fired: Counter[str] = Counter()
    try:
        yield fired
    finally:
        for kind, setting in replaced.items():
            chaos.restore_every(kind, setting)
        fired.update(chaos.counts() - before)
    assert fired["every_reset"] and fired["every_unavailable"], f"no S3 fault fired: {fired}"


def record_s3_faults(row: str, stage: str, fired: Counter[str], setting: str, outcome: str):
    """:func:`record_fault` for a run under :func:`s3_faults` (``setting``: what was on S3
    and what else happened)."""
    record_fault(row, {
        "stage": stage, "prompts_lost": 0, "samples_repeated_or_skipped": 0,
        "fault": f"{fired['every_reset']} S3 answers cut mid-body and "
                 f"{fired['every_unavailable']} 503 SlowDowns ({setting})",
        "outcome": outcome, "seconds_to_recover": "n/a (retries)",
    })  # fmt: skip


def record_fault(row: str, figures: dict[str, Any]) -> None:
    """Store one fault test's ``figures`` under ``row`` in ``runs/faults.json``, the
    other rows kept."""
    rows = json.loads(LAST_RUN.read_text()) if LAST_RUN.exists() else {}
    rows[row] = figures
    LAST_RUN.parent.mkdir(parents=True, exist_ok=True)
    LAST_RUN.write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n")


def rollout_actor(slot_name: str) -> Any:
    """The handle of the live rollout actor named ``mmrad-<pool>-<slot_name>``."""
    names = [n for n in ray.util.list_named_actors() if n.endswith(f"-{slot_name}")]
    assert len(names) == 1, f"rollout actors named *-{slot_name}: {names}"
    return ray.get_actor(names[0])


def corrupt_engine_after(
    run_name: str, version: int, tensors: dict[str, Any]
) -> tuple[threading.Thread, list[int]]:
    """Start a thread that, once the engines hold weights ``version`` and idle, loads
    ``tensors`` into the only engine behind the learners' back (as its current version:
    the pool does not know); returns the thread and the list it appends that version to."""
    from mmrad.rl.rollout import WeightUpdate

    done: list[int] = []

    def corrupt() -> None:
        wait_for(
            lambda: (s := idle_before_a_sync(run_name)) and s["pool"]["version"] >= version,
            f"the engines idle with weights v{version}",
        )
        actor = rollout_actor("rollout-0")
        current = ray.get(actor.version.remote())
        ray.get(actor.apply.remote(WeightUpdate(current, "full", tensors)))
        done.append(current)

    thread = threading.Thread(target=corrupt, name="fault-corrupter", daemon=True)
    thread.start()
    return thread, done


def learners_wait_for_a_batch_after(run_name: str, step: int) -> bool:
    """Whether both learner ranks wait in ``Coordinator.shard`` for a batch after
    ``step`` that is being made, by engines that all hold the current weights (one fault
    at a time: a replacement after an earlier kill has finished)."""
    status = coordinator_status(run_name)
    return bool(
        status
        and status["learners_in_shard"] == [0, 1]
        and status["producing"].startswith("making batch")
        and int(status["producing"].rsplit(" ", 1)[1]) > step
        and not status["pool"]["behind"]
        and not status["pool"]["receiving"]
    )


def a_learner(status: dict[str, Any]) -> int:
    """The pid of a learner (for :func:`kill_while_learners_wait_in_shard`)."""
    return ray_processes("ray::RayTrainWorker")[0].pid


def the_coordinator(status: dict[str, Any]) -> int:
    """The pid of the coordinator that reported ``status``."""
    return status["pid"]


def kill_while_learners_wait_in_shard(
    run_name: str,
    after_step: int,
    victim: Callable[[dict[str, Any]], int],
    after: threading.Thread | None = None,
) -> tuple[threading.Thread, list[Kill]]:
    """Start a thread that (once ``after`` ended) SIGKILLs the process ``victim(status)``
    names (:func:`a_learner`, :func:`the_coordinator`) while both learner ranks wait in
    ``Coordinator.shard`` for a batch after ``after_step`` (a learner's calls stay behind
    in the coordinator: the restarted group must not lose its batch to them); returns the
    thread and the list it appends the :class:`Kill` to (its ``version`` is the step
    waited after)."""
    killed: list[Kill] = []

    def sabotage() -> None:
        if after is not None:
            after.join()
        wait_for(lambda: learners_wait_for_a_batch_after(run_name, after_step),
                 "both learners waiting in shard")  # fmt: skip
        pid = victim(coordinator_status(run_name) or {})
        os.kill(pid, signal.SIGKILL)
        killed.append(Kill(getattr(victim, "__name__", "victim"), after_step, pid))

    thread = threading.Thread(target=sabotage, name="fault-shard-killer", daemon=True)
    thread.start()
    return thread, killed
