"""The weight channel when a member is gone: nobody waits for a process that died or
never came, and every side ends with :class:`ChannelFailed` (real gloo groups between
real processes on loopback)."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest
import torch

from mmrad.engine.channel import Channel, ChannelFailed, ChannelSpec, ChannelTimedOut, free_port
from mmrad.rl.weight_sender import WeightSender

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"
CPU = torch.device("cpu")


def spec_of(world_size: int, name: str, **timeouts: float) -> ChannelSpec:
    return ChannelSpec(HOST, free_port(HOST), world_size, "gloo", name, **timeouts)


def _member(spec: ChannelSpec, rank: int, buckets: int, die_after: int | None, queue) -> None:
    """Join as ``rank`` and receive ``buckets`` buckets of 16 bytes, dying (no goodbye)
    after ``die_after`` of them; report each bucket or the failure."""
    try:
        channel = Channel(spec, rank, CPU)
        for index in range(buckets):
            if index == die_after:
                queue.close()
                queue.join_thread()  # what was put gets out before the process dies
                os._exit(1)
            buffer = torch.empty(16, dtype=torch.uint8)
            channel.broadcast(buffer)
            queue.put(("bucket", buffer.tolist()))
    except ChannelFailed as error:
        queue.put(("failed", str(error)))


def _connecting_member(spec: ChannelSpec, queue) -> None:
    queue.put("connecting")
    _member(spec, 1, 1, None, queue)


def _sender(spec: ChannelSpec, buckets: int, die_after: int, queue) -> None:
    channel = Channel(spec, 0, CPU)
    for index in range(buckets):
        if index == die_after:
            os._exit(1)
        channel.broadcast(torch.full((16,), index, dtype=torch.uint8))
    queue.put("sent")


def start(target, *args):
    context = multiprocessing.get_context("spawn")
    process = context.Process(target=target, args=args)
    process.start()
    return process


@pytest.fixture
def queue():
    return multiprocessing.get_context("spawn").Queue()


def test_the_sender_calls_off_a_channel_whose_member_died_and_releases_the_others(queue):
    spec = spec_of(3, "one-dead")  # timeouts of 600 s: nothing here may wait for them
    alive = start(_member, spec, 1, 1, None, queue)
    with pytest.raises(ChannelFailed, match="called off: engine 2 died"):
        Channel(spec, 0, CPU, members_alive=lambda: "engine 2 died")
    assert queue.get(timeout=60) == (
        "failed",
        f"weight channel {spec.name}: the sender called it off",
    )
    late = start(_member, spec, 2, 1, None, queue)  # arrives after the verdict: reads it too
    assert queue.get(timeout=60)[0] == "failed"
    for process in (alive, late):
        process.join(timeout=60)
        assert process.exitcode == 0


def test_the_sender_waits_while_its_members_are_alive_and_gives_up_at_its_deadline():
    checks = []

    def members_alive() -> None:
        checks.append(1)

    with pytest.raises(ChannelTimedOut, match="0 of 1 receivers joined within 3 s"):
        Channel(spec_of(2, "nobody", timeout_s=3), 0, CPU, members_alive=members_alive)
    assert len(checks) >= 1  # it asked while waiting


def test_a_member_whose_sender_never_came_gives_up_after_the_connect_timeout():
    with pytest.raises(ChannelFailed, match="no store at"):
        Channel(spec_of(2, "no-sender", connect_timeout_s=1), 1, CPU)


def test_a_senders_store_is_open_from_its_announcement_so_members_never_wait_on_a_closed_port(
    queue,
):
    """Engines are asked to join right after the announcement: if the sender died before
    it joined, a member finds no store within the connect timeout (it once waited 120 s
    there, twice, with a restarted learner group's channel queued behind)."""
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.arange(4, dtype=torch.float32))  # one 16-byte bucket
    sender = WeightSender(0, "gloo", HOST, bucket_bytes=1024)
    update = sender.announce(model, torch.float32, 1)
    spec = ChannelSpec(HOST, update.port, 2, "gloo", "announced", timeout_s=30, connect_timeout_s=1)
    member = start(_connecting_member, spec, queue)
    assert queue.get(timeout=60) == "connecting"
    time.sleep(3)  # past the member's connect timeout: it waits connected, not refused
    sender.send(model, torch.float32, update, spec.to_dict())
    assert queue.get(timeout=60) == ("bucket", list(model.w.detach().view(torch.uint8)))
    member.join(timeout=60)
    sender.close()


def test_a_member_dying_mid_broadcast_breaks_the_channel_for_the_sender(queue):
    spec = spec_of(2, "member-dies", timeout_s=60)
    member = start(_member, spec, 1, 3, 1, queue)
    channel = Channel(spec, 0, CPU)
    channel.broadcast(torch.full((16,), 7, dtype=torch.uint8))
    assert queue.get(timeout=60) == ("bucket", [7] * 16)
    member.join(timeout=60)
    with pytest.raises(ChannelFailed, match="member-dies broke"):
        for _ in range(3):  # a send may still fit the socket's buffer
            channel.broadcast(torch.zeros(16, dtype=torch.uint8))


def test_a_sender_dying_mid_broadcast_breaks_the_channel_for_its_members(queue):
    spec = spec_of(2, "sender-dies", timeout_s=60)
    sender = start(_sender, spec, 3, 1, queue)
    channel = Channel(spec, 1, CPU)
    first = torch.empty(16, dtype=torch.uint8)
    channel.broadcast(first)
    assert first.tolist() == [0] * 16
    with pytest.raises(ChannelFailed, match="sender-dies broke"):
        channel.broadcast(torch.empty(16, dtype=torch.uint8))
    sender.join(timeout=60)
    assert sender.exitcode == 1
