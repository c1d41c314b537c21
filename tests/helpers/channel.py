"""The learner's side of the weight channel, played by the test process (rank 0)."""

from __future__ import annotations

import functools
import time

import torch

from mmrad.rl.weight_sender import WeightSender

LOOPBACK = "127.0.0.1"


class PoolSender:
    """Sends a model's weights (adapters merged) to a rollout pool over a gloo channel,
    as learner rank 0 does: announce, let the workers receive, broadcast, wait."""

    def __init__(self, pool, bucket_bytes: int = 256 * 1024):
        self.pool = pool
        self.sender = WeightSender(0, "gloo", LOOPBACK, bucket_bytes)

    def send(self, model, version: int) -> float:
        """Seconds from the announcement until every worker holds ``version``; raises
        :class:`~mmrad.engine.channel.ChannelFailed` when the channel failed (the pool
        has settled its receives: the workers that missed it are behind)."""
        start = time.perf_counter()
        update = self.sender.announce(model, torch.float32, version)
        spec = self.pool.receive(update)
        try:
            members_alive = functools.partial(self.pool.channel_failure, spec["name"])
            self.sender.send(model, torch.float32, update, spec, members_alive)
        finally:
            self.pool.finish_receive()
        return time.perf_counter() - start

    def close(self) -> None:
        self.sender.close()
