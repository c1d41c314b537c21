"""What a GRPO run's actors ask of the cluster (rules in :mod:`mmrad.placement`)."""

from __future__ import annotations

from mmrad.placement import Request, Shape, actor_shape, learners_request
from mmrad.rl.config import GRPOJobConfig


def coordinator_shape(job: GRPOJobConfig) -> Shape:
    """No CPU of its own (it waits on others), but a worker node's: batches and weight
    versions pass through it, so not through the head."""
    return actor_shape(job.ray, cpus=0.0)


def engine_shape(job: GRPOJobConfig) -> Shape:
    rollout = job.rollout
    return actor_shape(job.ray, cpus=rollout.cpus_per_worker, gpus=rollout.gpus_per_worker)


def grpo_requests(job: GRPOJobConfig) -> list[Request]:
    return [
        Request("the GRPO coordinator", coordinator_shape(job)),
        Request("rollout engines", engine_shape(job), job.rollout.num_workers),
        learners_request(job.ray, job.learners),
    ]
