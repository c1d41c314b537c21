"""Metric rows reach the driver's trackers while the run is still going: a Ray task posts
them to the run's board, and the driver's progress loop hands them over (real Ray)."""

from __future__ import annotations

import time

import pytest
import ray

from mmrad.train.progress import post_rows, run_with_progress

pytestmark = pytest.mark.integration


@ray.remote(num_cpus=0)
def a_worker_logs(run_name: str, rows: list[dict]) -> None:
    post_rows(run_name, rows)


def test_rows_a_worker_posts_reach_the_driver_before_the_work_ends(ray_cluster):
    received: list[dict] = []
    rows = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]

    def work() -> str:
        ray.get(a_worker_logs.remote("live-rows", rows))
        deadline = time.monotonic() + 30
        while len(received) < len(rows) and time.monotonic() < deadline:
            time.sleep(0.1)
        return f"handed over while running: {len(received)}"

    outcome = run_with_progress("live", "live-rows", work, received.extend)
    assert outcome == "handed over while running: 2"
    assert received == rows
