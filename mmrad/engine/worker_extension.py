"""Methods mmrad adds to every vLLM worker (``worker_extension_cls``): new weights in
place, from wherever the engine core runs.

vLLM mixes :class:`WeightReceiver` into its worker class, so these run in the process
that holds the model: the caller's own (engine core in-process) or vLLM's child process.
:meth:`~mmrad.engine.Engine` calls them by name through ``collective_rpc``, whose
arguments cross a msgpack channel in the child-process layout: only strings, numbers,
lists and dicts go that way. Tensors go by file (shared memory) or by the weight
channel (:mod:`mmrad.engine.channel`), never as RPC arguments.

Every load streams: the tensors are handed to vLLM's in-place reload as one iterator,
so a fused layer (q/k/v, gate/up) gets all its parts in the same reload whatever bucket
or file position they come in.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from mmrad.engine.channel import (
    Channel,
    ChannelFailed,
    ChannelSpec,
    SendPlan,
    bucket_nbytes,
    channel_device,
    unpack,
)

if TYPE_CHECKING:
    import torch


class WeightReceiver:
    """Mixed into vLLM's worker (``self`` is the worker: ``model_runner``, ``rank``)."""

    _mmrad_channel: Channel | None = None

    def mmrad_load_tensors(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """In-process only (tensors as Python objects): load them; returns their count."""
        return self._mmrad_reload(iter(named_tensors))

    def mmrad_load_file(self, path: str) -> int:
        """Load every tensor of a safetensors file (memory-mapped, one at a time)."""
        return self._mmrad_reload(_safetensors_items(path))

    def mmrad_join_channel(self, spec: dict[str, Any], first_rank: int) -> str | None:
        """Join the weight channel ``spec`` as rank ``first_rank`` + this worker's rank in
        its engine (leaving any channel joined before); returns why the channel failed
        (``None``: joined). A failure is a value, not an exception: it crosses vLLM's RPC
        from a child process as itself."""
        self.mmrad_leave_channel()
        channel = ChannelSpec.from_dict(spec)
        device = channel_device(channel.backend, getattr(self, "device", None))
        rank = first_rank + int(getattr(self, "rank", 0))
        try:
            self._mmrad_channel = Channel(channel, rank, device)
        except ChannelFailed as error:
            return str(error)
        return None

    def mmrad_receive(self, plan: dict[str, Any]) -> str | None:
        """Receive the buckets of ``plan`` from the channel's sender and load them;
        returns why the channel failed (``None``: received). A channel that broke leaves
        this worker's weights partly loaded, and the channel closed."""
        if self._mmrad_channel is None:
            return "no weight channel joined"
        try:
            self._mmrad_reload(_received(self._mmrad_channel, SendPlan.from_dict(plan)))
        except ChannelFailed as error:
            self.mmrad_leave_channel()
            return str(error)
        return None

    def mmrad_leave_channel(self) -> None:
        channel, self._mmrad_channel = self._mmrad_channel, None
        if channel is not None:
            channel.close()

    def _mmrad_reload(self, named_tensors: Iterator[tuple[str, torch.Tensor]]) -> int:
        counted = _Counted(named_tensors)
        self.model_runner.reload_weights(weights_iterator=counted)
        counted.drain()  # a tensor the model did not ask for still had to arrive
        return counted.count


class _Counted:
    """An iterator that counts what it yields; :meth:`drain` consumes the rest."""

    def __init__(self, items: Iterator[Any]):
        self._items = items
        self.count = 0

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> Any:
        item = next(self._items)
        self.count += 1
        return item

    def drain(self) -> None:
        for _ in self:
            pass


def _received(channel: Channel, plan: SendPlan) -> Iterator[tuple[str, torch.Tensor]]:
    """Each bucket as it arrives (a fresh buffer per bucket: vLLM may keep views of the
    previous one until its layer is complete)."""
    import torch

    for index in range(len(plan.buckets)):
        metas = plan.bucket(index)
        buffer = torch.empty(bucket_nbytes(metas), dtype=torch.uint8, device=channel.device)
        channel.broadcast(buffer)
        yield from unpack(buffer, metas)


def _safetensors_items(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as tensors:
        for name in tensors.keys():  # noqa: SIM118 (safe_open has no __iter__)
            yield name, tensors.get_tensor(name)
