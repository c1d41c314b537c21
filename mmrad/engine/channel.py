"""The weight channel: learner rank 0 broadcasts weights to every engine worker.

One process group outside ``torch.distributed``'s global state (the learners keep their
own FSDP group; vLLM keeps its own): rank 0 is the sender, ranks ``1..n`` the engines'
workers (one per tensor-parallel rank). NCCL on GPUs, gloo on CPUs. A sync sends:

- by ``collective_rpc`` (small, msgpack-safe): the version and a :class:`SendPlan`, each
  tensor's name, dtype and shape, cut into buckets of at most ``bucket_bytes``;
- by broadcast: one flat byte buffer per bucket, which each side packs and unpacks with
  :func:`pack` and :func:`unpack` (each tensor aligned, so mixed dtypes view in place).
  The sender copies each tensor into the bucket as it is gathered from the FSDP shards
  (one bucket and one gathered tensor beyond its shard), and a receiver hands a bucket
  to vLLM's reload before the next arrives (the bucket in flight plus the tensors of
  the layer vLLM is assembling: 2-3 buckets at most, measured).

The channel forms in two steps, so that nobody waits on a member that is gone: the sender
opens its TCP store before any receiver is asked to join (:func:`open_sender_store`, when
it announces the weights), so a receiver that cannot reach the store within
:data:`CONNECT_TIMEOUT_S` knows the sender is gone; each receiver connects to the store and
counts itself in; the sender waits until all have, asking ``members_alive`` now and then
(the learner asks the coordinator whether a receive failed), and then sets a verdict:
``go`` (the process group forms) or ``abort`` (every receiver that came, or comes later,
leaves with :class:`ChannelFailed`).
A channel that breaks mid-broadcast raises :class:`ChannelFailed` on both sides too; the
receivers keep their engines, and the weights are sent again on a fresh channel.

Both sides import this module: the learner (:mod:`mmrad.rl.weight_sender`) and the vLLM
worker (:mod:`mmrad.engine.worker_extension`). It imports torch only.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SENDER_RANK = 0
DEFAULT_TIMEOUT_S = 600.0
# A receiver waits this long to reach the sender's store, which was listening before the
# receiver was asked to join (the kernel completes a connection to it at once); a refused
# connection is retried until then: the sender died. torch gives up after about twice this.
CONNECT_TIMEOUT_S = 5.0
JOIN_POLL_S = 0.05
LIVENESS_CHECK_S = 1.0
JOINED_KEY, VERDICT_KEY = "joined", "verdict"
GO, ABORT = b"go", b"abort"
_called_off: list[Any] = []  # the last aborted store, open so late receivers read "abort"
ALIGNMENT = 16  # bytes: each tensor of a bucket starts here, so any dtype views in place


@dataclass(frozen=True)
class ChannelSpec:
    """Where a channel's rendezvous is (the sender hosts its TCP store), its size and
    backend. ``name`` is fresh for every group: a rebuilt channel never meets the
    store keys of an old one."""

    host: str
    port: int
    world_size: int
    backend: str  # "nccl" or "gloo"
    name: str
    timeout_s: float = DEFAULT_TIMEOUT_S
    connect_timeout_s: float = CONNECT_TIMEOUT_S

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChannelSpec:
        return cls(**data)


class ChannelFailed(RuntimeError):
    """A weight channel that did not form or broke; its members live on without the
    weights (the caller sends them again on a fresh channel)."""


class ChannelTimedOut(ChannelFailed):
    """The members did not all join within the channel's timeout (nobody reported one
    dead: a slow engine start, or a lost message)."""


MembersCheck = Callable[[], "str | None"]  # why to stop waiting for the members, or None


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return element_size(self.dtype) * numel(self.shape)


@dataclass(frozen=True)
class SendPlan:
    """A version's tensors in send order, cut into buckets (index ranges into
    ``tensors``) of at most ``bucket_bytes`` each (a larger tensor is a bucket alone)."""

    version: int
    tensors: tuple[TensorMeta, ...]
    buckets: tuple[tuple[int, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def bucket(self, index: int) -> tuple[TensorMeta, ...]:
        start, stop = self.buckets[index]
        return self.tensors[start:stop]

    def to_dict(self) -> dict[str, Any]:
        """Lists, strings and ints only: what crosses vLLM's msgpack RPC intact."""
        return {
            "version": self.version,
            "tensors": [[t.name, t.dtype, list(t.shape)] for t in self.tensors],
            "buckets": [list(b) for b in self.buckets],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SendPlan:
        return cls(
            version=int(data["version"]),
            tensors=tuple(TensorMeta(n, d, tuple(s)) for n, d, s in data["tensors"]),
            buckets=tuple((int(a), int(b)) for a, b in data["buckets"]),
        )


def plan_sends(version: int, tensors: Sequence[TensorMeta], bucket_bytes: int) -> SendPlan:
    """Consecutive tensors grouped greedily into buckets of at most ``bucket_bytes``."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    buckets, start, size = [], 0, 0
    for index, meta in enumerate(tensors):
        if index > start and size + aligned(meta.nbytes) > bucket_bytes:
            buckets.append((start, index))
            start, size = index, 0
        size += aligned(meta.nbytes)
    if start < len(tensors):
        buckets.append((start, len(tensors)))
    return SendPlan(version, tuple(tensors), tuple(buckets))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def element_size(dtype: str) -> int:
    import torch

    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def bucket_nbytes(metas: Sequence[TensorMeta]) -> int:
    """The size of the buffer :func:`pack` lays ``metas``' tensors out in."""
    return sum(aligned(meta.nbytes) for meta in metas)


def pack(
    tensors: Iterable[torch.Tensor], metas: Sequence[TensorMeta], device: torch.device
) -> torch.Tensor:
    """One flat ``uint8`` buffer on ``device`` (the channel's: NCCL broadcasts GPU memory
    only) holding the bytes of ``tensors``, described by ``metas``, each from an
    :data:`ALIGNMENT` boundary. ``tensors`` is consumed one at a time: a generator that
    gathers each tensor keeps one alive, not the bucket's worth."""
    import torch

    buffer = torch.empty(bucket_nbytes(metas), dtype=torch.uint8, device=device)
    offset = 0
    for meta, tensor in zip(metas, tensors, strict=True):
        flat = tensor.detach().contiguous().view(-1).view(torch.uint8)
        if flat.numel() != meta.nbytes:
            raise ValueError(f"{meta.name}: {flat.numel()} bytes where the plan has {meta.nbytes}")
        buffer[offset : offset + meta.nbytes].copy_(flat)
        offset += aligned(meta.nbytes)
    return buffer


def unpack(buffer: torch.Tensor, metas: Sequence[TensorMeta]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` views of ``buffer`` as :func:`pack` laid them out."""
    import torch

    if buffer.numel() != bucket_nbytes(metas):
        raise ValueError(f"a bucket of {buffer.numel()} bytes for {bucket_nbytes(metas)}")
    offset = 0
    for meta in metas:
        flat = buffer[offset : offset + meta.nbytes]
        yield meta.name, flat.view(getattr(torch, meta.dtype)).view(meta.shape)
        offset += aligned(meta.nbytes)


def local_address(peer: str) -> str:
    """This machine's address on the route to ``peer`` (``127.0.0.1`` for a local peer):
    gloo binds there, not to whatever the hostname resolves to."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((peer, 9))  # UDP: picks the route, sends nothing
        return probe.getsockname()[0]


def open_sender_store(host: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """The sender's TCP store, listening on a free port of ``host`` (its ``port``), for a
    channel the sender is about to announce: open before any receiver connects."""
    import torch.distributed as dist

    return dist.TCPStore(
        host, 0, None, is_master=True, timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )  # fmt: skip


def free_port(host: str) -> int:
    """A TCP port free on ``host`` now, for whoever binds it right after (the sender's own
    store takes port 0 instead: :func:`open_sender_store`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class Channel:
    """This process's member of the channel ``spec`` as ``rank``; collective: every member
    constructs one. The sender waits for the receivers until ``spec.timeout_s``, or until
    ``members_alive()`` names a reason to stop (then :class:`ChannelFailed`, everywhere);
    a receiver waits ``spec.connect_timeout_s`` to reach the sender's store. The sender
    passes the ``store`` it opened at ``spec.port`` (:func:`open_sender_store`); without
    one it opens it now."""

    def __init__(
        self,
        spec: ChannelSpec,
        rank: int,
        device: torch.device,
        members_alive: MembersCheck | None = None,
        store: Any | None = None,
    ):
        if not 0 <= rank < spec.world_size:
            raise ValueError(f"rank {rank} is outside channel {spec.name} of {spec.world_size}")
        self.spec = spec
        self.rank = rank
        self.device = device
        self._store = _open_store(spec, rank, store)
        if rank == SENDER_RANK:
            _await_receivers(self._store, spec, members_alive)
        else:
            _await_verdict(self._store, spec)
        try:  # a member that died after "go" fails the group's own rendezvous
            self._group = _process_group(spec, self._store, rank, timedelta(seconds=spec.timeout_s))
        except RuntimeError as error:
            raise ChannelFailed(f"weight channel {spec.name} did not form: {error}") from error

    def broadcast(self, buffer: torch.Tensor) -> None:
        """Rank 0's ``buffer`` into every member's ``buffer`` (same size on all)."""
        import torch.distributed as dist

        if self._group is None:
            raise ChannelFailed(f"weight channel {self.spec.name} is closed")
        options = dist.BroadcastOptions()
        options.rootRank = SENDER_RANK
        try:
            self._group.broadcast([buffer], options).wait()
        except ChannelFailed:
            raise
        except RuntimeError as error:  # a member died: gloo's socket closed, NCCL timed out
            raise ChannelFailed(f"weight channel {self.spec.name} broke: {error}") from error

    def close(self) -> None:
        """Leave the channel (the sender keeps its store open while this object lives, so
        a receiver arriving late still reads the verdict)."""
        group, self._group = self._group, None
        if group is not None and hasattr(group, "shutdown"):
            group.shutdown()


def _open_store(spec: ChannelSpec, rank: int, opened: Any | None) -> Any:
    import torch.distributed as dist

    sender = rank == SENDER_RANK
    if opened is not None and (not sender or opened.port != spec.port):
        raise ValueError(
            f"weight channel {spec.name}: rank {rank} was given a store at port "
            f"{opened.port}; only the sender passes its own, at port {spec.port}"
        )
    connect = spec.timeout_s if sender else min(spec.connect_timeout_s, spec.timeout_s)
    try:
        store = opened if opened is not None else dist.TCPStore(
            spec.host, spec.port, spec.world_size, is_master=sender,
            timeout=timedelta(seconds=connect), wait_for_workers=False,
        )  # fmt: skip
    except dist.DistError as error:
        raise ChannelFailed(
            f"weight channel {spec.name}: no store at {spec.host}:{spec.port} "
            f"(rank {rank}): {error}"
        ) from error
    store.set_timeout(timedelta(seconds=spec.timeout_s))
    return dist.PrefixStore(f"mmrad-weights/{spec.name}", store)


def _await_receivers(store: Any, spec: ChannelSpec, members_alive: MembersCheck | None) -> None:
    """The sender: wait until every receiver counted itself in, then say ``go``; say
    ``abort`` and raise :class:`ChannelFailed` at the deadline or when ``members_alive``
    gives a reason."""
    receivers = spec.world_size - 1
    deadline = time.monotonic() + spec.timeout_s
    next_check = time.monotonic() + LIVENESS_CHECK_S
    while (joined := _joined(store, spec)) < receivers:
        now = time.monotonic()
        if now >= deadline:
            _call_off(store)
            raise ChannelTimedOut(
                f"weight channel {spec.name}: {joined} of {receivers} receivers joined "
                f"within {spec.timeout_s:.0f} s"
            )
        if members_alive is not None and now >= next_check:
            next_check = now + LIVENESS_CHECK_S
            if reason := members_alive():
                _call_off(store)
                raise ChannelFailed(f"weight channel {spec.name} called off: {reason}")
        time.sleep(JOIN_POLL_S)
    store.set(VERDICT_KEY, GO)


def _joined(store: Any, spec: ChannelSpec) -> int:
    import torch.distributed as dist

    try:
        return store.add(JOINED_KEY, 0)
    except dist.DistError as error:
        raise ChannelFailed(f"weight channel {spec.name}: its store failed: {error}") from error


def _call_off(store: Any) -> None:
    store.set(VERDICT_KEY, ABORT)
    _called_off[:] = [store]


def _await_verdict(store: Any, spec: ChannelSpec) -> None:
    """A receiver: count itself in, then wait for the sender's verdict."""
    import torch.distributed as dist

    try:
        store.add(JOINED_KEY, 1)
        verdict = store.get(VERDICT_KEY)
    except dist.DistError as error:  # the sender died, or never said
        raise ChannelFailed(
            f"weight channel {spec.name}: no word from the sender: {error}"
        ) from error
    if verdict != GO:
        raise ChannelFailed(f"weight channel {spec.name}: the sender called it off")


def _process_group(spec: ChannelSpec, store: Any, rank: int, timeout: timedelta):
    backend, world_size = spec.backend, spec.world_size
    if backend == "gloo":
        from torch.distributed import ProcessGroupGloo

        options = ProcessGroupGloo._Options()
        options._timeout = timeout
        options._devices = [ProcessGroupGloo.create_device(hostname=local_address(spec.host))]
        return ProcessGroupGloo(store, rank, world_size, options)
    if backend == "nccl":
        from torch.distributed import ProcessGroupNCCL

        options = ProcessGroupNCCL.Options()
        options._timeout = timeout
        return ProcessGroupNCCL(store, rank, world_size, options)
    raise ValueError(f"weight channel backend must be 'nccl' or 'gloo', got {backend!r}")


def channel_device(backend: str, local_device: torch.device | None = None) -> torch.device:
    """Where a channel's buffers live: this process's GPU for NCCL, the CPU for gloo."""
    import torch

    if backend == "nccl":
        return local_device or torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
