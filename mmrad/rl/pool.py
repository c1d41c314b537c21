"""N rollout workers as Ray actors: batches spread over them, weights synced to all of
them, dead workers replaced without losing a prompt.

- :meth:`RolloutPool.submit` cuts a batch into contiguous chunks balanced by count (one
  per worker) and returns at once; :meth:`PendingRollouts.result` gathers them in input
  order.
- A worker that dies mid-batch (``RayActorError``: killed, out of memory, node lost) is
  replaced by a new actor, which first applies the pool's latest weights, and its chunk
  is re-issued there, up to ``max_retries`` times per chunk; then a :class:`RolloutError`
  names the prompts.
- :meth:`RolloutPool.sync` puts a :class:`~mmrad.rl.rollout.WeightUpdate` in the object
  store once and waits until every worker has applied it. Ray runs an actor's calls one
  at a time in submission order, so a batch submitted before a sync is generated with
  the old weights and one submitted after with the new: rollout versions are exact.

Weights reach the workers one of two ways:

- :meth:`RolloutPool.sync`: a :class:`~mmrad.rl.rollout.WeightUpdate` through Ray's
  object store (one put, one read per worker: a copy through host memory, and the
  network for engines on other nodes). A replacement worker applies the latest updates
  before anything else reaches it.
- :meth:`RolloutPool.receive`: a :class:`~mmrad.rl.weight_sender.ChannelUpdate` over the
  weight channel, a process group of learner rank 0 and every engine worker (NCCL on
  GPUs, gloo on CPUs) built by the pool when its membership changes. The pool only
  issues the receives and returns the channel; the learner then broadcasts, and
  :meth:`RolloutPool.finish_receive` waits for the workers. Nobody keeps a copy, so a
  replacement worker is *behind* until the next send: its chunks wait for it, and the
  pool calls ``on_behind`` so the coordinator can ask the learners to send again.

A worker is dead when its actor is (``RayActorError``) or when its engine core process
is (:class:`~mmrad.engine.engine.EngineDied`, vLLM's child process on GPUs): it is
killed and replaced either way.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mmrad.config import EngineConfig, PixelBudget
from mmrad.engine.channel import DEFAULT_TIMEOUT_S, ChannelFailed, ChannelSpec
from mmrad.engine.engine import EngineDied
from mmrad.engine.sampling import Sampling
from mmrad.model.loading import ModelSource
from mmrad.rl.rollout import Rollout, RolloutPrompt, RolloutWorker, WeightUpdate
from mmrad.rl.weight_sender import ChannelUpdate
from mmrad.task.prompt import PromptVariant

log = logging.getLogger(__name__)

BEHIND_TIMEOUT_S = 900.0
"""How long a replacement worker's chunk waits for the learners' next send."""
BEHIND_POLL_S = 0.2
SLOW_RECEIVE_S = 30.0  # a channel receive that takes longer is named in the log
KEPT_CHANNEL_FAILURES = 8


def dead_worker_errors() -> tuple[type[BaseException], ...]:
    """What a call raises when its worker is gone: the actor, or its engine core."""
    from ray.exceptions import RayActorError

    return (RayActorError, EngineDied)


class RolloutError(RuntimeError):
    """Rollouts that could not be generated; the message names the prompts."""


def contiguous_chunks(count: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``(start, stop)`` ranges covering ``range(count)`` whose sizes
    differ by at most one (the first ``count % parts`` are one longer)."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    size, extra = divmod(count, parts)
    ranges, start = [], 0
    for part in range(parts):
        stop = start + size + (part < extra)
        ranges.append((start, stop))
        start = stop
    return ranges


def worker_name(slot: int, generation: int) -> str:
    """``rollout-<slot>``, then ``rollout-<slot>.<n>`` for its n-th replacement: rollouts
    and metrics show which actor generated them."""
    return f"rollout-{slot}" if generation == 0 else f"rollout-{slot}.{generation}"


@dataclass
class _Worker:
    """One slot of the pool: the actor now serving it; ``generation`` counts the slot's
    replacements."""

    slot: int
    generation: int
    name: str
    actor: Any
    borrowed: bool = False  # given to the pool (kept engines): reset at start, not ended


@dataclass(frozen=True)
class _Receive:
    """A worker's channel receive in flight: of ``version``, on channel ``channel``."""

    generation: int
    version: int
    ref: Any  # ObjectRef of RolloutWorker.receive
    channel: str

    def failure(self, slot: int, error: Exception) -> str:
        return f"{worker_name(slot, self.generation)} failed to receive v{self.version}: {error}"


@dataclass
class _Chunk:
    """A contiguous part of a batch in flight on one actor."""

    slot: int
    generation: int
    start: int
    prompts: list[RolloutPrompt]
    rollouts: Any  # ObjectRef of list[list[Rollout]]
    stats: Any  # ObjectRef of the worker's stats right after
    version: int  # the pool's version when the batch was submitted
    # rollouts/stats are None while the chunk waits for its (behind) worker's weights
    failures: int = 0
    errors: list[str] = field(default_factory=list)

    def continues(self, earlier: _Chunk, failures: int, errors: list[str]) -> None:
        """This chunk re-issues ``earlier``: keep its batch version and failure record."""
        self.version, self.failures, self.errors = earlier.version, failures, errors


# Engines get their own resources even when the pool is made inside a placement group
# that captures child actors (a Ray Tune trial's): "DEFAULT" opts out of the capture.
OUTSIDE_PARENT_PLACEMENT_GROUP = "DEFAULT"

RETURN_WAIT_S = 30.0
"""How long a borrowed worker's channel receive in flight may take to end when the pool
shuts down; one still receiving then is ended rather than handed back."""


@dataclass(frozen=True)
class WorkerSpec:
    """What a rollout worker actor is started with: its engine (model, settings, pixel
    budget, prompt variant) and its resources. Equal specs make interchangeable workers."""

    model: str | ModelSource
    engine: EngineConfig
    pixels: PixelBudget
    variant: PromptVariant
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: tuple[tuple[str, float], ...] = ()

    def start(self, name: str, actor_name: str) -> Any:
        """A new :class:`~mmrad.rl.rollout.RolloutWorker` actor (returns at once), owned
        by the calling process: it ends with it."""
        return (
            _worker_class()
            .options(
                name=actor_name,
                max_restarts=0,
                scheduling_strategy=OUTSIDE_PARENT_PLACEMENT_GROUP,
                num_cpus=self.num_cpus,
                num_gpus=self.num_gpus,
                resources=dict(self.resources),
            )
            .remote(name, self.model, self.engine, self.pixels, self.variant)
        )


@functools.cache
def _worker_class() -> Any:
    import ray

    return ray.remote(RolloutWorker)


class RolloutPool:
    """``num_workers`` :class:`~mmrad.rl.rollout.RolloutWorker` actors with
    ``num_cpus``/``num_gpus`` and custom ``resources`` each (:mod:`mmrad.placement`);
    returns once every worker's engine is up.

    ``workers``: live actors of the same spec to serve the slots instead of new ones
    (engines kept from an earlier run, :mod:`mmrad.rl.kept_engines`). Each is reset to
    version 0 first (:meth:`~mmrad.rl.rollout.RolloutWorker.reset`: the starting weights,
    no adapter; :attr:`reused` holds what each reported), a dead one is replaced, and
    :meth:`shutdown` leaves them running for their owner."""

    def __init__(
        self,
        model: str | ModelSource,
        engine: EngineConfig,
        pixels: PixelBudget,
        variant: PromptVariant,
        num_workers: int,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        resources: Mapping[str, float] | None = None,
        max_retries: int = 3,
        on_behind: Callable[[], None] | None = None,
        channel_timeout_s: float = DEFAULT_TIMEOUT_S,
        workers: Sequence[Any] | None = None,
    ):
        import ray

        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if workers is not None and len(workers) != num_workers:
            raise ValueError(f"{len(workers)} workers given for {num_workers} slots")
        self.spec = WorkerSpec(
            model, engine, pixels, variant, num_cpus, num_gpus,
            tuple(sorted((resources or {}).items())),
        )  # fmt: skip
        self.max_retries = max_retries
        self._pool_id = uuid.uuid4().hex[:8]
        self._latest: dict[str, tuple[int, Any]] = {}  # kind → (version, ObjectRef)
        self._version = 0
        self._replaced = 0
        self._last_batch: dict[str, float] = {}
        self._lock = threading.RLock()  # workers and channel: a push thread and the producer
        self._channel: dict[str, Any] | None = None  # the current channel's spec
        self._channel_members: list = []  # its sender's id, then (slot, generation) of each
        self._channel_version: int | None = None  # newest version sent over the channel
        self._receiving: dict[int, _Receive] = {}  # slot → its receive in flight
        self._failed_channels: dict[str, str] = {}  # channel name → why (the newest few)
        self._receive_started = 0.0
        self._channel_timeout_s = channel_timeout_s
        self._missed: Counter[int] = Counter()  # slot → channel receives failed in a row
        self._behind: set[int] = set()  # slots that lack the current weights
        self._interrupted = threading.Event()  # stop waiting for weights (interrupt_waits)
        self.on_behind = on_behind
        self.reused: list[dict[str, Any]] | None = None  # the given workers' resets
        if workers is None:
            self._workers = [self._start(slot, 0) for slot in range(num_workers)]
        else:
            self._workers = [
                _Worker(slot, 0, worker_name(slot, 0), actor, borrowed=True)
                for slot, actor in enumerate(workers)
            ]
        try:
            if workers is None:
                ray.get([w.actor.pid.remote() for w in self._workers])
            else:
                self.reused = self._on_each_worker(lambda w, fresh: w.actor.reset.remote())
        except Exception as error:
            for worker in self._workers:  # half reset: no run may sample from them
                worker.borrowed = False
            self.shutdown()
            raise RolloutError(f"rollout workers failed to start: {error}") from error

    # -- rollouts ---------------------------------------------------------------------

    def submit(self, prompts: Sequence[RolloutPrompt], sampling: Sampling) -> PendingRollouts:
        """Send a batch to the workers; returns at once. Prompt ids must be unique."""
        prompts = list(prompts)
        counts = Counter(p.prompt_id for p in prompts)
        duplicates = sorted(prompt_id for prompt_id, n in counts.items() if n > 1)
        if duplicates:
            raise ValueError(f"prompt ids must be unique within a batch; repeated: {duplicates}")
        with self._lock:  # a batch's chunks all come before or all after a channel receive
            chunks = [
                self._send(slot, start, prompts[start:stop], sampling)
                for slot, (start, stop) in enumerate(
                    contiguous_chunks(len(prompts), len(self._workers))
                )
                if stop > start
            ]
        return PendingRollouts(self, len(prompts), sampling, chunks)

    def generate(self, prompts: Sequence[RolloutPrompt], sampling: Sampling) -> list[list[Rollout]]:
        """``submit(prompts, sampling).result()``."""
        return self.submit(prompts, sampling).result()

    def prompt_logprobs(
        self, prompts: Sequence[RolloutPrompt], token_ids: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        """The engines' log-probs of given completions (on one live worker)."""
        return self._on_one_worker(lambda actor: actor.prompt_logprobs.remote(prompts, token_ids))

    # -- weights ----------------------------------------------------------------------

    def sync(self, update: WeightUpdate) -> float:
        """Every worker applies ``update``; returns the seconds it took. The pool keeps
        the latest update of each kind, so a replacement worker starts with them."""
        import ray

        if update.version < self._version:
            raise ValueError(
                f"weight update v{update.version} is older than the pool's v{self._version}"
            )
        start = time.perf_counter()
        ref = ray.put(update)
        previous = (dict(self._latest), self._version)
        self._latest[update.kind] = (update.version, ref)
        self._version = update.version
        try:
            # A replacement applied the latest weights when it started; wait for it instead.
            self._on_each_worker(
                lambda w, fresh: w.actor.version.remote() if fresh else w.actor.apply.remote(ref)
            )
        except Exception as error:
            self._latest, self._version = previous
            raise RolloutError(
                f"weight update v{update.version} ({update.kind}) failed; the pool stays at "
                f"v{self._version}, some workers may hold v{update.version}: {error}"
            ) from error
        return time.perf_counter() - start

    def receive(self, update: ChannelUpdate) -> dict[str, Any]:
        """Have every worker receive ``update`` over the weight channel; returns the
        channel's spec, for the learner to join (as rank 0) and broadcast on. Returns at
        once: the receives run as the learner sends (:meth:`finish_receive` waits). The
        channel is rebuilt, at ``update``'s host and port, when the workers or the sender
        (a restarted learner) changed."""
        with self._lock:
            if update.version < self._version:
                raise ValueError(
                    f"channel update v{update.version} is older than the pool's v{self._version}"
                )
            members = [update.sender, *((w.slot, w.generation) for w in self._workers)]
            fresh = self._channel is None or members != self._channel_members
            ranks = self.spec.engine.tensor_parallel_size  # channel members per engine
            if fresh:
                self._channel = ChannelSpec(
                    update.host, update.port, 1 + ranks * len(self._workers), update.backend,
                    name=f"{self._pool_id}-v{update.version}-{uuid.uuid4().hex[:6]}",
                    timeout_s=self._channel_timeout_s,
                ).to_dict()  # fmt: skip
                self._channel_members = members
            self._receive_started = time.perf_counter()
            for index, worker in enumerate(self._workers):
                ref = worker.actor.receive.remote(
                    self._channel if fresh else None, 1 + index * ranks, update.plan
                )
                self._receiving[worker.slot] = _Receive(
                    worker.generation, update.version, ref, self._channel["name"]
                )
            self._version = self._channel_version = update.version
            return dict(self._channel)

    def finish_receive(self) -> float:
        """Wait for the workers' receives in flight; returns the seconds since they were
        issued (0 with none). A worker that died receiving is replaced, one whose channel
        failed kept; both are behind until the weights are sent again."""
        import ray

        with self._lock:  # in flight until settled: channel_failure and status see them
            receiving = dict(self._receiving)
        if not receiving:
            return 0.0
        refs = [receive.ref for receive in receiving.values()]
        slow_at = time.perf_counter() + SLOW_RECEIVE_S
        while len(ray.wait(refs, num_returns=len(refs), timeout=BEHIND_POLL_S)[0]) < len(refs):
            if self._interrupted.is_set():
                raise RolloutError("stopped while the engines waited for weights")
            if time.perf_counter() > slow_at:
                slow_at = float("inf")
                log.warning("the engines still receive after %.0f s: %s", SLOW_RECEIVE_S,
                            self._receives_in_flight(receiving))  # fmt: skip
        for slot, receive in receiving.items():
            with self._lock:
                if self._receiving.get(slot) is receive:
                    del self._receiving[slot]
            try:
                self._settle(slot, receive)
            except dead_worker_errors():
                self._replace(slot, receive.generation)
        return time.perf_counter() - self._receive_started

    def _receives_in_flight(self, receiving: dict[int, _Receive]) -> str:
        """Which worker waits for which version on which channel (for the log)."""
        import ray

        return "; ".join(
            f"{worker_name(slot, receive.generation)} v{receive.version} on {receive.channel}"
            for slot, receive in receiving.items()
            if not ray.wait([receive.ref], timeout=0)[0]
        )

    def channel_failure(self, name: str) -> str | None:
        """Why the sender should stop waiting for channel ``name``'s members: a receive of
        it that failed (settled already, or finished with an error now), or a newer
        channel (``None``: keep waiting)."""
        import ray

        with self._lock:
            if name in self._failed_channels:
                return self._failed_channels[name]
            if self._channel is None or self._channel["name"] != name:
                return f"the rollout pool gave up on channel {name}"
            receiving = dict(self._receiving)
        for slot, receive in receiving.items():
            ready, _ = ray.wait([receive.ref], timeout=0)
            if not ready:
                continue
            try:
                ray.get(receive.ref)
            except Exception as error:
                return receive.failure(slot, error)
        return None

    def status(self) -> dict[str, Any]:
        """``workers`` (their names, by slot), ``receiving`` (worker name → the version its
        channel receive in flight takes), ``behind`` (workers lacking the current weights)
        and the pool's ``version``."""
        import ray

        with self._lock:
            workers = {w.slot: w.name for w in self._workers}
            receiving = {
                workers[slot]: receive.version
                for slot, receive in self._receiving.items()
                if self._workers[slot].generation == receive.generation
                and not ray.wait([receive.ref], timeout=0)[0]
            }
            behind = [workers[slot] for slot in sorted(self._behind)]
            return {"workers": list(workers.values()), "receiving": receiving,
                    "behind": behind, "version": self._version}  # fmt: skip

    def _settle(self, slot: int, receive: _Receive) -> bool:
        """The outcome of a finished receive: whether ``slot`` now holds its weights. A
        failure marks its channel failed (the sender stops waiting for it); a worker
        that lives on is behind, a dead one raises (the caller replaces it)."""
        import ray

        try:
            ray.get(receive.ref)
        except Exception as error:
            self._channel_failed(receive, receive.failure(slot, error))
            if not isinstance(error, ChannelFailed):
                raise
            self._missed_weights(slot, receive.generation, error)
            return False
        with self._lock:
            if self._workers[slot].generation != receive.generation:
                return False
            self._behind.discard(slot)
            self._missed.pop(slot, None)
            return True

    def _channel_failed(self, receive: _Receive, reason: str) -> None:
        with self._lock:
            self._failed_channels[receive.channel] = reason
            while len(self._failed_channels) > KEPT_CHANNEL_FAILURES:
                del self._failed_channels[next(iter(self._failed_channels))]
            if self._channel is not None and self._channel["name"] == receive.channel:
                self._channel = None

    def _missed_weights(self, slot: int, generation: int, error: Exception) -> None:
        """``slot``'s worker lives but lacks the current weights: behind until they are
        sent again on a fresh channel; after ``max_retries`` misses in a row, give up."""
        with self._lock:
            if self._workers[slot].generation != generation:
                return
            self._missed[slot] += 1
            if self._missed[slot] > self.max_retries:
                raise RolloutError(
                    f"{worker_name(slot, generation)} failed to receive weights "
                    f"{self._missed[slot]} times in a row (max_retries={self.max_retries}): {error}"
                ) from error
            log.warning("%s; it waits for the weights to be sent again", error)
            self._behind.add(slot)
        if self.on_behind is not None:
            self.on_behind()

    def _mark_behind(self, slot: int, generation: int) -> None:
        with self._lock:
            if self._workers[slot].generation == generation:
                self._behind.add(slot)

    def holds_current_weights(self) -> bool:
        """Whether some worker holds the current weights (not all are behind)."""
        with self._lock:
            return any(w.slot not in self._behind for w in self._workers)

    def _caught_up(self, slot: int) -> bool:
        """Whether ``slot``'s worker holds the current weights (a behind one once its
        receive is done; raises if it died receiving)."""
        import ray

        with self._lock:
            if slot not in self._behind:
                return True
            receive = self._receiving.get(slot)
            if receive is None or receive.generation != self._workers[slot].generation:
                return False
            ready, _ = ray.wait([receive.ref], timeout=0)
            if not ready:
                return False
            del self._receiving[slot]
        return self._settle(slot, receive)

    @contextlib.contextmanager
    def interrupting_waits(self) -> Iterator[None]:
        """While inside: a batch whose chunks wait for weights raises :class:`RolloutError`
        instead of waiting (the learners that would send them are gone)."""
        self._interrupted.set()
        try:
            yield
        finally:
            self._interrupted.clear()

    def _check_not_interrupted(self, parked: list[_Chunk]) -> None:
        if self._interrupted.is_set():
            ids = [p.prompt_id for chunk in parked for p in chunk.prompts]
            raise RolloutError(f"stopped while prompts {ids} waited for weights")

    @property
    def version(self) -> int:
        """The version of the latest update synced or sent (0 before any)."""
        return self._version

    # -- workers ----------------------------------------------------------------------

    def worker_pids(self) -> list[int]:
        """Process ids of the workers (dead ones are replaced first)."""
        return self._on_each_worker(lambda w, fresh: w.actor.pid.remote())

    def engine_pids(self) -> list[int]:
        """The process running each worker's engine core: vLLM's child process, or the
        worker's own in-process."""
        return self._on_each_worker(lambda w, fresh: w.actor.engine_pid.remote())

    def worker_logprobs(
        self, prompts: Sequence[RolloutPrompt], token_ids: Sequence[Sequence[int]]
    ) -> list[list[list[float]]]:
        """Every worker's log-probs of given completions, in slot order (do all engines
        hold the same weights?)."""
        return self._on_each_worker(
            lambda w, fresh: w.actor.prompt_logprobs.remote(prompts, token_ids)
        )

    def adapter_dirs(self) -> list[str | None]:
        """Each worker's current adapter directory (``None``: no adapter loaded)."""
        return self._on_each_worker(lambda w, fresh: w.actor.adapter_dir.remote())

    def worker_versions(self) -> list[int]:
        """Weight version of each worker (all equal to :attr:`version` after a sync)."""
        return self._on_each_worker(lambda w, fresh: w.actor.version.remote())

    @property
    def worker_names(self) -> list[str]:
        return [w.name for w in self._workers]

    def stats(self) -> dict[str, float]:
        """Throughput of the last finished batch: ``rollout/tokens`` generated,
        ``rollout/seconds`` (the longest worker's generation time: the workers run in
        parallel), ``rollout/tokens_per_s`` (their ratio), ``rollout/<worker>/tokens_per_s``
        per worker; ``rollout/workers_replaced`` since the pool started."""
        return {**self._last_batch, "rollout/workers_replaced": float(self._replaced)}

    def shutdown(self) -> None:
        """Close every engine (deleting adapter directories) and end the actors; borrowed
        ones are left running (those still receiving weights are ended too)."""
        import ray

        workers, self._workers = getattr(self, "_workers", []), []
        ended = [w for w in workers if not w.borrowed or not self._received_all(w)]
        closing = [w.actor.close.remote() for w in ended]
        try:
            ray.wait(closing, num_returns=len(closing), timeout=60)
        finally:
            for worker in ended:
                ray.kill(worker.actor)

    def _received_all(self, worker: _Worker) -> bool:
        """Whether ``worker`` has no channel receive in flight (waits ``RETURN_WAIT_S``)."""
        import ray

        receive = getattr(self, "_receiving", {}).get(worker.slot)
        if receive is None or receive.generation != worker.generation:
            return True
        return bool(ray.wait([receive.ref], timeout=RETURN_WAIT_S)[0])

    def __enter__(self) -> RolloutPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- internals --------------------------------------------------------------------

    def _start(self, slot: int, generation: int) -> _Worker:
        """A new actor for ``slot`` that applies the latest updates (oldest version first)
        before any other call reaches it."""
        name = worker_name(slot, generation)
        actor = self.spec.start(name, f"mmrad-{self._pool_id}-{name}")
        for _, ref in sorted(self._latest.values(), key=lambda item: item[0]):
            actor.apply.remote(ref)
        stored = max((version for version, _ in self._latest.values()), default=0)
        if (self._channel_version or 0) > stored:  # the weights went by channel only
            self._behind.add(slot)
            if self.on_behind is not None:
                self.on_behind()
        return _Worker(slot, generation, name, actor)

    def _replace(self, slot: int, generation: int) -> _Worker:
        """Replace ``slot``'s actor unless that was done already (several calls can fail
        on the same dead actor)."""
        import ray

        with self._lock:
            worker = self._workers[slot]
            if worker.generation == generation:
                ray.kill(worker.actor)  # dead already, or unreachable: make sure it is gone
                worker = self._start(slot, generation + 1)
                self._workers[slot] = worker
                self._replaced += 1
            return worker

    def _send(
        self, slot: int, start: int, prompts: list[RolloutPrompt], sampling: Sampling
    ) -> _Chunk:
        """Send a chunk to ``slot``'s worker, or park it (``rollouts=None``) while that
        worker is behind (:meth:`PendingRollouts.result` sends it once caught up)."""
        with self._lock:
            worker = self._workers[slot]
            if slot in self._behind:
                return _Chunk(slot, worker.generation, start, prompts, None, None, self._version)
            rollouts = worker.actor.generate.remote(prompts, sampling)
            stats = worker.actor.stats.remote()  # runs right after that generate
            return _Chunk(slot, worker.generation, start, prompts, rollouts, stats, self._version)

    def _resend(self, chunk: _Chunk, sampling: Sampling, error: Exception) -> _Chunk:
        """Replace the dead worker of ``chunk`` and re-issue the chunk on the new one."""
        self._replace(chunk.slot, chunk.generation)
        errors = [*chunk.errors, f"{self._name_of(chunk)}: {error}"]
        if chunk.failures + 1 > self.max_retries:
            ids = [p.prompt_id for p in chunk.prompts]
            raise RolloutError(
                f"prompts {ids} failed on {len(errors)} rollout workers in a row "
                f"(max_retries={self.max_retries}); errors: {errors}"
            ) from error
        again = self._send(chunk.slot, chunk.start, chunk.prompts, sampling)
        again.continues(chunk, chunk.failures + 1, errors)
        return again

    def _repark(self, chunk: _Chunk, sampling: Sampling) -> _Chunk:
        """``chunk`` again, for its slot's worker once that holds the current weights."""
        again = self._send(chunk.slot, chunk.start, chunk.prompts, sampling)
        again.continues(chunk, chunk.failures, chunk.errors)
        return again

    def _name_of(self, chunk: _Chunk) -> str:
        return worker_name(chunk.slot, chunk.generation)

    def _on_each_worker(self, call: Callable[[_Worker, bool], Any]) -> list[Any]:
        """``ray.get(call(worker, fresh))`` for every slot; a dead worker is replaced and
        the call made on the replacement (``fresh=True``), up to ``max_retries`` times."""
        import ray

        pending = [(w, call(w, False)) for w in self._workers]
        results = []
        for worker, ref in pending:
            for attempt in range(self.max_retries + 1):
                try:
                    results.append(ray.get(ref))
                    break
                except dead_worker_errors() as error:
                    if attempt == self.max_retries:
                        raise RolloutError(
                            f"rollout worker slot {worker.slot} died {attempt + 1} times in a row"
                        ) from error
                    worker = self._replace(worker.slot, worker.generation)
                    ref = call(worker, True)
        return results

    def _on_one_worker(self, call: Callable[[Any], Any]) -> Any:
        """``ray.get(call(actor))`` on the first live worker holding the current weights,
        replacing dead ones."""
        import ray

        for attempt in range(self.max_retries + 1):
            current = [w for w in self._workers if w.slot not in self._behind]
            worker = (current or self._workers)[attempt % len(current or self._workers)]
            try:
                return ray.get(call(worker.actor))
            except dead_worker_errors() as error:
                if attempt == self.max_retries:
                    raise RolloutError(
                        f"no rollout worker answered in {attempt + 1} tries"
                    ) from error
                self._replace(worker.slot, worker.generation)
        raise AssertionError("unreachable")

    def _record(self, per_worker: dict[str, tuple[float, float]]) -> None:
        tokens = sum(t for t, _ in per_worker.values())
        seconds = max((s for _, s in per_worker.values()), default=0.0)
        batch = {
            "rollout/tokens": tokens,
            "rollout/seconds": seconds,
            "rollout/tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        }
        for name, (t, s) in per_worker.items():
            batch[f"rollout/{name}/tokens_per_s"] = t / s if s > 0 else 0.0
        self._last_batch = batch


class PendingRollouts:
    """A submitted batch; :meth:`result` waits for it."""

    def __init__(self, pool: RolloutPool, count: int, sampling: Sampling, chunks: list[_Chunk]):
        self._pool = pool
        self._count = count
        self._sampling = sampling
        self._chunks = chunks
        self._result: list[list[Rollout]] | None = None

    def result(self) -> list[list[Rollout]]:
        """``sampling.n`` rollouts per prompt, in input order. Chunks of workers that
        died are re-issued on their replacements; other errors raise a
        :class:`RolloutError` naming the chunk's prompts."""
        if self._result is not None:
            return self._result
        import ray

        results: list[Any] = [None] * self._count
        per_worker: dict[str, tuple[float, float]] = {}
        pending = {chunk.rollouts: chunk for chunk in self._chunks if chunk.rollouts is not None}
        parked = [chunk for chunk in self._chunks if chunk.rollouts is None]
        parked_since = time.monotonic()
        while pending or parked:
            if parked:
                parked = self._send_caught_up(parked, pending)
                self._check_waited(parked, parked_since)
                self._pool._check_not_interrupted(parked)
            if not pending:
                time.sleep(BEHIND_POLL_S)
                continue
            ready, _ = ray.wait(
                list(pending), num_returns=1, timeout=BEHIND_POLL_S if parked else None
            )
            if not ready:
                continue
            chunk = pending.pop(ready[0])
            try:
                groups = ray.get(chunk.rollouts)
            except dead_worker_errors() as error:
                again = self._pool._resend(chunk, self._sampling, error)
                if again.rollouts is None:
                    parked.append(again)
                    parked_since = time.monotonic()
                else:
                    pending[again.rollouts] = again
                continue
            except ChannelFailed:  # its weights broke in a receive (settled and counted
                self._pool._mark_behind(chunk.slot, chunk.generation)  # with it): wait
                parked.append(self._pool._repark(chunk, self._sampling))
                parked_since = time.monotonic()
                continue
            except Exception as error:
                ids = [p.prompt_id for p in chunk.prompts]
                raise RolloutError(f"rollouts of prompts {ids} failed: {error}") from error
            self._check_versions(chunk, groups)
            results[chunk.start : chunk.start + len(groups)] = groups
            try:
                stats = ray.get(chunk.stats)
                per_worker[self._pool._name_of(chunk)] = (
                    stats["last_tokens"],
                    stats["last_seconds"],
                )
            except dead_worker_errors():
                pass  # died after its chunk was done: the rollouts stand, its timing is lost
        self._pool._record(per_worker)
        self._result = results
        return results

    def _send_caught_up(self, parked: list[_Chunk], pending: dict[Any, _Chunk]) -> list[_Chunk]:
        """Send the parked chunks whose workers now hold the current weights (into
        ``pending``); returns those still waiting."""
        waiting = []
        for chunk in parked:
            try:
                ready = self._pool._caught_up(chunk.slot)
            except dead_worker_errors() as error:  # died while catching up
                waiting.append(self._pool._resend(chunk, self._sampling, error))
                continue
            if not ready:
                waiting.append(chunk)
                continue
            again = self._pool._repark(chunk, self._sampling)
            if again.rollouts is None:
                waiting.append(again)
            else:
                pending[again.rollouts] = again
        return waiting

    @staticmethod
    def _check_waited(parked: list[_Chunk], since: float) -> None:
        if parked and time.monotonic() - since > BEHIND_TIMEOUT_S:
            ids = [p.prompt_id for chunk in parked for p in chunk.prompts]
            raise RolloutError(
                f"prompts {ids} waited {BEHIND_TIMEOUT_S:.0f} s for replacement rollout workers "
                "to receive the learners' weights; no weights were sent"
            )

    def _check_versions(self, chunk: _Chunk, groups: list[list[Rollout]]) -> None:
        """A worker applies every sync before later batches, so rollouts are never older
        than the pool's version at submission (a re-issued chunk may be newer). Older
        means an update failed on that worker, one the pool could not see (a
        replacement applies the latest updates without anyone waiting on them)."""
        versions = {r.version for group in groups for r in group}
        if versions and min(versions) < chunk.version:
            ids = [p.prompt_id for p in chunk.prompts]
            raise RolloutError(
                f"rollout worker {self._pool._name_of(chunk)} generated prompts {ids} with "
                f"weights v{min(versions)}, but the pool had synced v{chunk.version}: a weight "
                "update failed on that worker"
            )
