"""Ray Data's scheduling loop with mmrad's rest while idle (:mod:`mmrad.data.idle_wait`)
still hands a slow consumer every row, in order. What the rest saves is measured by
``benchmarks/idle_data_loop.py`` (SFT steps per second with and without it)."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.integration

ROWS = 200  # one per block, as a decode batch of a trainer's shard
CONSUMER_PAUSE_S = 0.01  # a trainer's step between two rows


def test_a_slow_consumer_gets_every_row_in_order(ray_cluster):
    import ray.data
    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    from mmrad.data.loading import ordered_data_context

    ordered_data_context()  # as for every mmrad dataset
    assert getattr(StreamingExecutor, "_mmrad_idle_wait", False)
    dataset = ray.data.from_items([{"i": i} for i in range(ROWS)], override_num_blocks=ROWS)
    seen = []
    for row in dataset.map_batches(lambda batch: batch, batch_size=None).iter_rows():
        time.sleep(CONSUMER_PAUSE_S)
        seen.append(row["i"])
    assert seen == list(range(ROWS))


LACKING_RAY = """
import logging
from ray.data._internal.execution.streaming_executor import StreamingExecutor
from mmrad.data import idle_wait

logging.basicConfig(level=logging.WARNING)
del StreamingExecutor._consumer_idling  # as a Ray whose internals moved
stock = StreamingExecutor._scheduling_loop_step
idle_wait.install()
idle_wait.install()
assert StreamingExecutor._scheduling_loop_step is stock
"""


def test_a_ray_without_the_internals_it_reads_keeps_its_own_loop_and_says_so():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", LACKING_RAY], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "loop left as it is" in line]
    assert len(warnings) == 1 and "StreamingExecutor._consumer_idling" in warnings[0]
