"""The learner's side of the weight channel, played by the test process (rank 0)."""

from __future__ import annotations

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
        """Seconds from the announcement until every worker holds ``version``."""
        start = time.perf_counter()
        update = self.sender.announce(model, torch.float32, version)
        spec = self.pool.receive(update)
        self.sender.send(model, torch.float32, update, spec)
        self.pool.finish_receive()
        return time.perf_counter() - start

    def close(self) -> None:
        self.sender.close()
