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

Weights travel through Ray's object store: one put, N reads, each a copy through host
memory (and the network, for engines on other nodes). Next step on multi-GPU clusters: a
NCCL broadcast from learner rank 0 to every engine's GPU (one ``ray.util.collective``
group of learner rank 0 and the engines, made once; per version, the tensors go layer by
layer straight into vLLM's weights through ``collective_rpc``). Expected gain for full
updates of a 7B model (~15 GB in bf16): the GPU → host copy, the object-store put and
each engine's read and host → GPU copy (seconds on one node, tens of seconds across
nodes at 10-25 Gb/s) become one broadcast at NVLink / InfiniBand speed (well under a
second on NVLink, ~1-2 s at 100-200 Gb/s). LoRA updates (~80 MB at rank 64) gain little.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mmrad.config import EngineConfig, PixelBudget
from mmrad.engine.sampling import Sampling
from mmrad.rl.rollout import Rollout, RolloutPrompt, RolloutWorker, WeightUpdate
from mmrad.task.prompt import PromptVariant


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
    failures: int = 0
    errors: list[str] = field(default_factory=list)


# Engines get their own resources even when the pool is made inside a placement group
# that captures child actors (a Ray Tune trial's): "DEFAULT" opts out of the capture.
OUTSIDE_PARENT_PLACEMENT_GROUP = "DEFAULT"


class RolloutPool:
    """``num_workers`` :class:`~mmrad.rl.rollout.RolloutWorker` actors with
    ``num_cpus``/``num_gpus`` each; returns once every worker's engine is up."""

    def __init__(
        self,
        model_path: str,
        engine: EngineConfig,
        pixels: PixelBudget,
        variant: PromptVariant,
        num_workers: int,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        max_retries: int = 3,
    ):
        import ray

        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self._worker_args = (str(model_path), engine, pixels, variant)
        self._resources = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        self.max_retries = max_retries
        self._actor_class = ray.remote(RolloutWorker)
        self._pool_id = uuid.uuid4().hex[:8]
        self._latest: dict[str, tuple[int, Any]] = {}  # kind → (version, ObjectRef)
        self._version = 0
        self._replaced = 0
        self._last_batch: dict[str, float] = {}
        self._workers = [self._start(slot, 0) for slot in range(num_workers)]
        try:
            ray.get([w.actor.pid.remote() for w in self._workers])
        except Exception as error:
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

    @property
    def version(self) -> int:
        """The version of the latest update synced (0 before any)."""
        return self._version

    # -- workers ----------------------------------------------------------------------

    def worker_pids(self) -> list[int]:
        """Process ids of the workers (dead ones are replaced first)."""
        return self._on_each_worker(lambda w, fresh: w.actor.pid.remote())

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
        """Close every engine (deleting adapter directories) and end the actors."""
        import ray

        workers, self._workers = getattr(self, "_workers", []), []
        closing = [w.actor.close.remote() for w in workers]
        try:
            ray.wait(closing, num_returns=len(closing), timeout=60)
        finally:
            for worker in workers:
                ray.kill(worker.actor)

    def __enter__(self) -> RolloutPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- internals --------------------------------------------------------------------

    def _start(self, slot: int, generation: int) -> _Worker:
        """A new actor for ``slot`` that applies the latest updates (oldest version first)
        before any other call reaches it."""
        name = worker_name(slot, generation)
        actor = self._actor_class.options(
            name=f"mmrad-{self._pool_id}-{name}",
            max_restarts=0,
            scheduling_strategy=OUTSIDE_PARENT_PLACEMENT_GROUP,
            **self._resources,
        ).remote(name, *self._worker_args)
        for _, ref in sorted(self._latest.values(), key=lambda item: item[0]):
            actor.apply.remote(ref)
        return _Worker(slot, generation, name, actor)

    def _replace(self, slot: int, generation: int) -> _Worker:
        """Replace ``slot``'s actor unless that was done already (several calls can fail
        on the same dead actor)."""
        import ray

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
        worker = self._workers[slot]
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
        again.failures, again.errors, again.version = chunk.failures + 1, errors, chunk.version
        return again

    def _name_of(self, chunk: _Chunk) -> str:
        return worker_name(chunk.slot, chunk.generation)

    def _on_each_worker(self, call: Callable[[_Worker, bool], Any]) -> list[Any]:
        """``ray.get(call(worker, fresh))`` for every slot; a dead worker is replaced and
        the call made on the replacement (``fresh=True``), up to ``max_retries`` times."""
        import ray
        from ray.exceptions import RayActorError

        pending = [(w, call(w, False)) for w in self._workers]
        results = []
        for worker, ref in pending:
            for attempt in range(self.max_retries + 1):
                try:
                    results.append(ray.get(ref))
                    break
                except RayActorError as error:
                    if attempt == self.max_retries:
                        raise RolloutError(
                            f"rollout worker slot {worker.slot} died {attempt + 1} times in a row"
                        ) from error
                    worker = self._replace(worker.slot, worker.generation)
                    ref = call(worker, True)
        return results

    def _on_one_worker(self, call: Callable[[Any], Any]) -> Any:
        """``ray.get(call(actor))`` on the first live worker, replacing dead ones."""
        import ray
        from ray.exceptions import RayActorError

        for attempt in range(self.max_retries + 1):
            worker = self._workers[attempt % len(self._workers)]
            try:
                return ray.get(call(worker.actor))
            except RayActorError as error:
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
        from ray.exceptions import RayActorError

        results: list[Any] = [None] * self._count
        per_worker: dict[str, tuple[float, float]] = {}
        pending = {chunk.rollouts: chunk for chunk in self._chunks}
        while pending:
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            chunk = pending.pop(ready)
            try:
                groups = ray.get(chunk.rollouts)
            except RayActorError as error:
                again = self._pool._resend(chunk, self._sampling, error)
                pending[again.rollouts] = again
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
            except RayActorError:
                pass  # died after its chunk was done: the rollouts stand, its timing is lost
        self._pool._record(per_worker)
        self._result = results
        return results

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
