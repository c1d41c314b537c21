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
