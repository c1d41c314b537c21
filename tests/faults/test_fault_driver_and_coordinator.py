"""Fault rows of a GRPO run whose driver, then coordinator, dies (``EXACT_RUN``, the same
command rerun after each):

1. the driver (``python -m ray_jobs.grpo``, joined to the session's Ray) SIGKILLed after
   the step-2 checkpoint and the same command run again at once: Ray ends the actors
   the dead driver owned (coordinator, engines, learners), the rerun waits until their
   names are free and resumes from the last checkpoint, and none of them lives on;
2. during that rerun the coordinator SIGKILLed while both learners wait in
   ``Coordinator.shard``: the run ends naming the dead actor, with no learner restart
   (each would reload the model and call a dead actor again; the seconds it took are
   recorded, not asserted);
3. the same command again resumes and finishes, through a 25 s S3 outage from the
   moment its coordinator is up: its prompt stream's reads wait with backoff.

The images are read from S3 (a copy of the local set); the final checkpoint equals an
uninterrupted run's on the local copy: nothing lost, repeated or skipped."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from mmrad.rl.coordinator import coordinator_name
from mmrad.rl.job import run_grpo
from mmrad.storage import Storage
from mmrad.train.fail_fast import RunCannotRecover
from mmrad.train.metrics_log import read_metrics
from tests.helpers.checkpoints import (
    committed_step,
    differences,
    latest_checkpoint,
    read_checkpoint,
)
from tests.helpers.faults import (
    ROOT,
    coordinator_status,
    kill_while_learners_wait_in_shard,
    record_fault,
    the_coordinator,
    wait_for,
)
from tests.helpers.grpo import (
    CONFIG,
    EXACT_RUN,
    EXACT_STEPS,
    grpo_config,
    grpo_overrides,
    steps_of,
)
from tests.helpers.processes import ray_processes

pytestmark = pytest.mark.e2e

OUTAGE_S = 25.0  # beyond the backoff's 10 s cap (0.5 + 1 + 2 + 4 + 8 s, then 10 s)
RUN_ACTORS = ("ray::Coordinator", "ray::RolloutWorker", "ray::RayTrainWorker",
              "ray::TrainController")  # fmt: skip


def alive(pids: list[int]) -> list[int]:
    living = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                living.append(pid)
    return living


class LearnerCensus:
    """The pids of every learner process seen while the block runs: two for a run that
    never restarted its learners (each restart starts new ones)."""

    def __init__(self):
        self.seen: set[int] = set()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._count, daemon=True)

    def _count(self) -> None:
        while not self._done.wait(0.1):
            self.seen.update(p.pid for p in ray_processes("ray::RayTrainWorker"))

    def __enter__(self) -> LearnerCensus:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def __repr__(self) -> str:
        return f"learner pids {sorted(self.seen)}"


def kill_driver_after_checkpoint(driver: subprocess.Popen, run_uri: str, log: Path, step: int):
    """SIGKILL the driver once the checkpoint of ``step`` is committed; returns the pids
    of the run's actors just before, by title."""
    deadline = time.monotonic() + 900
    while committed_step(Storage(), run_uri) < step:
        if driver.poll() is not None or time.monotonic() > deadline:
            driver.kill()
            pytest.fail(f"the driver ended or stalled before step {step}:\n"
                        f"{log.read_text()[-4000:]}")  # fmt: skip
        time.sleep(0.2)
    actors = {title: [p.pid for p in ray_processes(title)] for title in RUN_ACTORS}
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)
    return actors


def pause_once_the_coordinator_is_up(
    chaos, run_name: str, seconds: float
) -> tuple[threading.Thread, list[float]]:
    """Start a thread that stops S3 for ``seconds`` once the run's coordinator is up
    (before its prompt stream reads); returns it and the list it appends the start to."""
    started: list[float] = []

    def pause() -> None:
        wait_for(lambda: coordinator_status(run_name), "the coordinator")
        chaos.pause(seconds)
        started.append(time.time())

    thread = threading.Thread(target=pause, name="fault-s3-outage", daemon=True)
    thread.start()
    return thread, started


def test_a_killed_driver_and_coordinator_and_an_s3_outage_cost_nothing_but_reruns(
    ray_cluster, s3_chaos, grpo_uninterrupted, sft_trained, synthetic_local_on_s3, tmp_path
):
    name, storage, data = "orphaned", str(tmp_path), synthetic_local_on_s3
    run_uri = f"{storage}/{name}"
    overrides = grpo_overrides(sft_trained.export_uri, data, storage, name, *EXACT_RUN)
    address = ray_cluster.get_runtime_context().gcs_address
    log = tmp_path / "driver.log"
    with log.open("w") as output:
        driver = subprocess.Popen(
            [sys.executable, "-m", "ray_jobs.grpo", "--config", CONFIG, *overrides,
             f"ray.address={address}"],
            cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "token"}, stdout=output,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        old_actors = kill_driver_after_checkpoint(driver, run_uri, log, step=2)
    killed_at = time.monotonic()
    assert all(old_actors[title] for title in RUN_ACTORS[:3]), old_actors
    old_pids = [pid for pids in old_actors.values() for pid in pids]
    orphans_ended: list[float] = []
    watcher = threading.Thread(target=lambda: (
        wait_for(lambda: not alive(old_pids), "the killed driver's actors to end", 120),
        orphans_ended.append(time.monotonic() - killed_at),
    ), daemon=True)  # fmt: skip
    watcher.start()
    stopped = committed_step(Storage(), run_uri)
    before = [row for row in read_metrics(Storage(), run_uri) if row["step"] <= stopped]

    saboteur, kills = kill_while_learners_wait_in_shard(name, stopped, the_coordinator)
    learners = LearnerCensus()
    with learners, pytest.raises(RunCannotRecover, match=coordinator_name(name)):
        run_grpo(grpo_config(sft_trained.export_uri, data, storage, name, *EXACT_RUN,
                             "run.max_failures=3"))  # fmt: skip
    saboteur.join()
    assert kills, "the coordinator was not killed"
    ended_s = time.monotonic() - kills[0].at
    watcher.join()
    assert orphans_ended and not alive(old_pids), "actors of the killed driver live on"
    started = learners.seen - set(old_pids)  # the killed driver's may still be ending
    assert len(started) == 2, f"learners restarted after the coordinator died: {learners}"
    assert read_metrics(Storage(), run_uri)[: len(before)] == before  # resumed, not restarted
    resumed = committed_step(Storage(), run_uri)
    assert resumed == stopped + 1  # the rerun trained one step, then lost its coordinator

    refused_before = s3_chaos.injected["paused"]
    outage, outage_started = pause_once_the_coordinator_is_up(s3_chaos, name, OUTAGE_S)
    try:
        result = run_grpo(grpo_config(sft_trained.export_uri, data, storage, name, *EXACT_RUN))
    finally:
        s3_chaos.pause(0)  # never into the next test
    outage.join()
    refused = s3_chaos.injected["paused"] - refused_before
    assert outage_started and refused > 0, "the S3 outage refused no request"
    first_after = next(row for row in steps_of(result.run_uri) if row["step"] == resumed + 1)
    waited_s = first_after["time"] - outage_started[0]
    assert waited_s > OUTAGE_S  # its batch's images were read once S3 was back
    final = read_checkpoint(Storage(), latest_checkpoint(Storage(), result.run_uri))
    assert final["trainer_state"]["step"] == EXACT_STEPS
    assert differences(final, grpo_uninterrupted) == []  # same prompts, samples, weights

    same = {"prompts_lost": 0, "samples_repeated_or_skipped": 0, "stage": "GRPO"}
    record_fault("grpo/4 driver killed, then rerun", {
        **same, "fault": f"the GRPO driver SIGKILLed after checkpoint {stopped}",
        "outcome": "Ray ends its actors; the rerun waits for them and resumes from the last "
                   "checkpoint; equals a clean run",
        "seconds_to_recover": f"old actors ended in {orphans_ended[0]:.1f} s",
    })  # fmt: skip
    record_fault(f"grpo/6 a {OUTAGE_S:.0f} s S3 outage", {
        **same, "fault": f"S3 refuses every connection for {OUTAGE_S:.0f} s from when the "
                         "coordinator is up (images on S3)",
        "outcome": f"the prompt stream's reads wait with backoff ({refused} refused); the "
                   "run goes on; equals a clean run",
        "seconds_to_recover": f"first step {waited_s:.0f} s after the outage began",
    })  # fmt: skip
    record_fault("grpo/5 coordinator killed", {
        **same, "fault": "the coordinator SIGKILLed while both learners wait in shard",
        "outcome": "the run ends naming the dead actor, no learner restart; a rerun "
                   "resumes; equals a clean run",
        "seconds_to_recover": f"run ended in {ended_s:.1f} s",
    })  # fmt: skip
