"""The GRPO prompt stream on the session's Ray: prompts in the resumable epoch order,
decoded by at most ``decode_tasks`` Ray Data tasks at once."""

from __future__ import annotations

import threading

import pytest

from mmrad.config import PixelBudget
from mmrad.data.loading import DecodeSpec, ordered_rows
from mmrad.data.manifest import read_manifest
from mmrad.rl.prompts import PromptStream
from mmrad.storage import Storage
from tests.helpers.grpo import data_order

pytestmark = pytest.mark.integration


def test_prompts_come_in_epoch_order_from_at_most_decode_tasks_tasks(ray_cluster, synthetic_local):
    records = [r for r in read_manifest(Storage(), synthetic_local) if r["split"] == "train"]
    spec = DecodeSpec(Storage(), PixelBudget())
    stream = PromptStream(records, spec, seed=0, decode_cpus=0.1, decode_tasks=1, batch_size=4)

    prompts = stream.take(len(records) + 3)  # into the next epoch

    order = data_order(synthetic_local)
    assert [p.prompt_id for p in prompts[: len(records)]] == order
    assert [p.prompt_id.endswith("@1") for p in prompts[len(records) :]] == [True] * 3
    assert all(p.image.size for p in prompts)
    # Ray Data's task pool for the decode step is capped: without the cap it starts as
    # many tasks as the CPUs allow at decode_cpus each (20 here), each in a new worker.
    plan = operators(stream._dataset(ordered_rows(records[:4], seed=0)))
    (decode,) = [op for op in plan if "decode_batch" in op.name]
    assert decode.compute.size == 1


def executors() -> list[threading.Thread]:
    """Ray Data's executor threads alive in this process."""
    return [t for t in threading.enumerate()
            if t.name.startswith("StreamingExecutor-") and t.is_alive()]  # fmt: skip


def test_closing_the_stream_ends_its_pipeline_at_once(ray_cluster, synthetic_local):
    """A coordinator closes its stream when it stops: an epoch's pipeline left open ends
    only when the garbage collector finds it, which in an exiting actor is after Ray
    has disconnected (:func:`mmrad.ray_env.ray_environment`)."""
    records = [r for r in read_manifest(Storage(), synthetic_local) if r["split"] == "train"]
    spec = DecodeSpec(Storage(), PixelBudget())
    stream = PromptStream(records, spec, seed=0, decode_cpus=0.1, decode_tasks=1, batch_size=1)
    before = set(executors())
    stream.take(1)  # the epoch's pipeline is open, most of its rows unread
    assert set(executors()) - before

    stream.close()  # Ray Data's shutdown joins the executor's thread
    assert not set(executors()) - before, "the closed stream's pipeline still runs"
    assert stream.take(1)[0].prompt_id == data_order(synthetic_local)[1]  # and goes on


def operators(dataset) -> list:
    """The logical operators of a lazy dataset's plan, last first."""
    found, pending = [], [dataset._logical_plan.dag]
    while pending:
        op = pending.pop()
        found.append(op)
        pending.extend(op.input_dependencies)
    return found
