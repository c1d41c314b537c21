"""The GRPO coordinator: the Ray actor that hands the learners their training batches.

It is the plumbing: it owns the prompt stream (:mod:`mmrad.rl.prompts`, Ray Data), the
vLLM rollout pool (:class:`~mmrad.rl.pool.RolloutPool`) and its lock, the weight
versions, the learner groups' generations and the hand-out of learner shards. A producer
thread makes batch ``t`` (0-based) as soon as the weights allow it, with
:func:`mmrad.rl.making.make_batch` (drawing, sampling, scoring, contrastive and dynamic
sampling: plain code, no Ray), and records the data position after it.

Versions: the engines start at version 0 (the SFT model); learner step ``t`` trains on
batch ``t`` with weights of version ``t`` and pushes version ``t + 1``. Batch ``t`` may be
generated once version ``t - max_staleness`` has arrived; with ``max_staleness: 1`` the
pool samples batch ``t + 1`` while the learners train on batch ``t`` (one step off),
with ``0`` it waits for the newest weights. The newest weights that have arrived are
always applied before a batch is generated, and all of a batch's rollouts come from
one version (the pool is not synced mid-batch).

Learners call :meth:`Coordinator.start` when they (re)start (with the restored step,
data position and weights), then per step :meth:`shard` (blocks until the batch is
ready) and :meth:`push_weights`. The pool is used from one thread at a time, except that
a channel push issues its receives at once (:meth:`~mmrad.rl.pool.RolloutPool.receive`):
learner rank 0 broadcasts right after, and a replacement engine waiting for weights must
not wait for a batch that waits for it.

With the collective transport nobody keeps a copy of the weights, so an engine that
replaced a dead one needs the learners to send again. The pool says so
(``on_behind``), and :meth:`shard` answers every learner rank with
:class:`ResendWeights` instead of a shard: the learners, which hold exactly the
version the engines need while they wait for a batch, send it and ask again. If they
are training instead, their next push brings the replacement up.
"""

from __future__ import annotations

import logging
import os
import threading
import traceback
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mmrad.data.loading import DecodeSpec
from mmrad.engine.sampling import Sampling
from mmrad.model.loading import ModelSource
from mmrad.placement import ray_options, worker_resources
from mmrad.rl.batch import LearnerShard, Probe, TrainBatch, verdict_of
from mmrad.rl.config import GRPOJobConfig
from mmrad.rl.making import BatchRecipe, make_batch, reward_spec
from mmrad.rl.metrics import validation_metrics
from mmrad.rl.pool import WorkerSpec
from mmrad.rl.prompts import DataPosition, PromptItem, PromptStream
from mmrad.rl.resources import engine_shape
from mmrad.rl.rollout import RolloutPrompt, WeightUpdate
from mmrad.rl.weight_sender import ChannelUpdate, ResendWeights
from mmrad.storage import Storage
from mmrad.task.knowledge import Knowledge
from mmrad.task.prompt import PromptVariant
from mmrad.train.fail_fast import NOT_RETRIED

log = logging.getLogger(__name__)


class StaleLearners(RuntimeError):
    """A call of a learner group that a restarted one replaced."""


class CoordinatorTimeout(TimeoutError):
    """A coordinator call waited longer than ``coordinator.wait_timeout_s``."""


MAX_CONCURRENCY = 16  # learners' shard calls, weight pushes, probes, state queries


def coordinator_name(run_name: str) -> str:
    return f"mmrad-grpo-coordinator-{run_name}"


class Coordinator:
    """Run as a Ray actor with ``max_concurrency=MAX_CONCURRENCY`` on a worker node
    (:func:`mmrad.rl.resources.coordinator_shape`). It and its engines resolve the
    model on their own nodes."""

    def __init__(
        self,
        job: dict[str, Any],
        records: Sequence[Mapping[str, Any]],
        variant: dict[str, bool | str],
        knowledge: Knowledge,
        val_records: Sequence[Mapping[str, Any]] = (),
        workers: Sequence[Any] | None = None,
    ):
        self.job = GRPOJobConfig.model_validate(job)
        self._kept_workers = workers  # engines kept by the caller (reset, never ended)
        model = self.job.model
        self.model = ModelSource(model.path, self.job.storage, model.cache_dir)
        self.variant = PromptVariant(**variant)
        self.rewards = reward_spec(self.job, self.variant)
        storage = Storage.from_config(self.job.storage)
        self.stream = self._stream(records, knowledge, storage)
        self.val_stream = self._stream(val_records, knowledge, storage) if val_records else None
        self._val_items: list[PromptItem] | None = None
        validation = self.job.validation
        self.val_sampling = Sampling(
            n=1, temperature=0.0, max_tokens=validation.max_tokens or self.job.rollout.max_tokens
        )
        self._recipe: BatchRecipe | None = None  # built on first use: it loads the tokenizer
        self.pool = self._new_pool()
        self._pool_lock = threading.RLock()
        self._cond = threading.Condition()
        self._batches: dict[int, TrainBatch] = {}
        self._fetched: dict[int, set[int]] = {}
        self._positions: dict[int, DataPosition] = {}  # data position after batch t
        self._received = 0  # newest weight version the learners pushed
        self._pending: WeightUpdate | None = None
        self._sync_seconds = 0.0  # applying the update before the next batch
        self._generation_seconds = 0.0  # the engines' own sampling time for this batch
        self._resend_wanted = 0  # requests for the learners' weights (replacement engines)
        self._resend_answered = 0  # the newest request a shard call answered
        self._answers: dict[tuple[int, int], ResendWeights | None] = {}  # (step, attempt)
        self._error: str | None = None
        self._producing = "idle"  # what the producer does now (status)
        self._fatal: str | None = None  # why the run must end (fail)
        self._generation = 0  # of the learner group; each start makes a new one
        self._in_shard: Counter[int] = Counter()  # learner rank → its calls waiting in shard
        self._stop = threading.Event()
        self._producer: threading.Thread | None = None

    # -- the learners' calls ------------------------------------------------------------

    def start(
        self,
        step: int,
        position: dict[str, int] | None,
        update: WeightUpdate | None,
        channel: bool = False,
    ) -> int:
        """(Re)start producing at batch ``step``: the learners hold weights of version
        ``step`` (``update``, or the engines' starting weights at step 0) and the data
        continues at ``position``. With ``channel`` the learners send those weights over
        the weight channel right after (:meth:`push_weights`); no batch is made before.
        Batches made ahead for a previous learner group are dropped, and its calls
        still waiting in :meth:`shard` leave with :class:`StaleLearners`. Returns the new
        group's generation, which its calls to :meth:`shard` carry. A run that
        :meth:`fail` ended refuses to start again (a learner restart cannot fix it)."""
        if self._fatal is not None:
            raise RuntimeError(self._fatal)
        self._stop_producing()
        try:
            if self.pool.version > step:  # learners restarted from an older checkpoint
                log.warning("engines hold v%d, learners restart at v%d", self.pool.version, step)
                self.pool.shutdown()
                self.pool = self._new_pool()
            if update is not None:
                if update.version != step:
                    raise ValueError(f"start at step {step} with weights of v{update.version}")
                self._sync_seconds = self.pool.sync(update)
            elif step > 0 and self.pool.version != step and not channel:
                raise ValueError(f"restarting at step {step} needs the learners' weights")
            held = self.pool.version if channel else step
        finally:
            self._pool_lock.release()
        self.stream.seek(DataPosition.from_dict(position) if position else DataPosition())
        with self._cond:
            self._batches, self._fetched = {}, {}
            self._received, self._pending, self._error = held, None, None
            self._answers, self._resend_answered = {}, self._resend_wanted
            self._generation += 1
            self._cond.notify_all()  # the calls of the replaced group leave (StaleLearners)
        self._stop.clear()
        self._producer = threading.Thread(
            target=self._produce, args=(step,), name="grpo-producer", daemon=True
        )
        self._producer.start()
        return self._generation

    def generation(self) -> int:
        """The current learner group's generation (what :meth:`start` returned)."""
        return self._generation

    def shard(
        self, step: int, rank: int, world: int, generation: int, attempt: int = 0
    ) -> LearnerShard | ResendWeights:
        """Learner ``rank``'s part of batch ``step`` (waits until it is made), or
        :class:`ResendWeights` when replacement engines need the learners' weights
        first; then the learners ask again with ``attempt + 1``. Every rank gets the
        same answer for the same ``(step, attempt)``, whenever it asks. A call of an
        older learner group ``generation`` raises :class:`StaleLearners` and takes
        nothing."""
        with self._cond:
            key = (step, attempt)
            self._in_shard[rank] += 1
            try:
                self._wait(
                    lambda: (
                        generation != self._generation
                        or self._fatal is not None
                        or key in self._answers
                        or step in self._batches
                        or self._error is not None
                        or self._resend_wanted > self._resend_answered
                    ),
                    f"batch {step} (learner rank {rank})",
                )
            finally:
                self._in_shard[rank] -= 1
            if self._fatal is not None:
                raise RuntimeError(self._fatal)
            if generation != self._generation:
                raise StaleLearners(
                    f"learner rank {rank} of group {generation} asked for batch {step}; "
                    f"group {self._generation} replaced it"
                )
            if key not in self._answers:  # the first rank to ask decides for all
                if self._resend_wanted > self._resend_answered:
                    self._resend_answered = self._resend_wanted
                    self._answers[key] = ResendWeights(self._resend_wanted)
                else:
                    self._answers[key] = None
                self._answers = {k: v for k, v in self._answers.items() if k[0] >= step}
                self._cond.notify_all()
            answer = self._answers[key]
            if answer is not None:
                return answer
            if step not in self._batches:
                raise RuntimeError(f"the GRPO coordinator failed:\n{self._error}")
            batch = self._batches[step]
            fetched = self._fetched.setdefault(step, set())
            fetched.add(rank)
            if len(fetched) == world:
                del self._batches[step]
        return batch.shard(rank, world)

    def push_weights(self, update: WeightUpdate | ChannelUpdate) -> dict[str, Any] | None:
        """New weights from the learners. A :class:`WeightUpdate` is applied before the
        next batch is generated. A :class:`ChannelUpdate` is received by every engine
        now (after the batch it is generating): returns the channel's spec, on which
        learner rank 0 then broadcasts; the same version again is a re-send."""
        channel = isinstance(update, ChannelUpdate)
        with self._cond:
            if update.version < self._received or (
                update.version == self._received and not channel
            ):
                raise ValueError(
                    f"weights v{update.version} arrived after v{self._received} already had"
                )
        if not channel:
            with self._cond:
                self._pending, self._received = update, update.version
                self._cond.notify_all()
            return None
        spec = self.pool.receive(update)
        with self._cond:
            self._received = update.version
            self._resend_answered = self._resend_wanted  # replacements receive this one too
            self._cond.notify_all()
        return spec

    def channel_failure(self, name: str) -> str | None:
        """Why learner rank 0 should stop waiting for weight channel ``name``'s members
        (a receive failed: an engine died, or the pool moved on); ``None``: keep waiting.
        Takes no coordinator lock: it answers while a batch is being made."""
        return self.pool.channel_failure(name)

    def fail(self, reason: str, requested: bool = False) -> None:
        """End the run: the learners found a fault that restarting them cannot fix (the
        engines do not hold their weights), or someone asked (``requested``: a sweep's
        scheduler stopped the trial; no error then); a restarted learner group's
        :meth:`start` raises ``reason``."""
        log.log(logging.INFO if requested else logging.ERROR, "%s", reason)
        with self._cond:
            self._fatal = reason
            self._cond.notify_all()  # the other learners' calls leave too

    def fatal(self) -> str | None:
        """Why the run must end (what :meth:`fail` recorded), or ``None``; asked by
        :class:`~mmrad.rl.guard.StopUnrecoverable` after a learner failure."""
        return self._fatal

    def _want_resend(self) -> None:
        """The pool's ``on_behind``: ask the learners waiting in :meth:`shard` to send."""
        with self._cond:
            self._resend_wanted += 1
            self._cond.notify_all()

    def engine_logprobs(self, version: int, probe: Probe) -> list[float] | None:
        """The engines' log-probs of ``probe`` once weights ``version`` are applied (the
        production sync path: what rollouts of that version sample with); ``None`` when
        no engine holds them (replacements waiting for a resend)."""
        with self._pool_lock:
            self._hold_version(version)
            if not self.pool.holds_current_weights():
                return None
            prompt = RolloutPrompt("sync-probe", probe.item.inputs())
            return self.pool.prompt_logprobs([prompt], [list(probe.token_ids)])[0]

    def validate(self, version: int) -> dict[str, float]:
        """Greedy answers of the policy of ``version`` to the validation prompts, scored
        as the evaluation job scores them (:func:`~mmrad.rl.metrics.validation_metrics`)."""
        if self.val_stream is None:
            raise RuntimeError("validation asked for, but no validation records were given")
        if self._val_items is None:
            self._val_items = self.val_stream.take(len(self.val_stream.records))
        items = self._val_items
        with self._pool_lock:
            self._hold_version(version)
            prompts = [RolloutPrompt(item.prompt_id, item.inputs()) for item in items]
            rollouts = self.pool.generate(prompts, self.val_sampling)
        rewards = self.rewards
        verdicts = [
            verdict_of(group[0].text, item, rewards.require_think, rewards.answer_unit)
            for item, group in zip(items, rollouts, strict=True)
        ]
        records = [item.record for item in items]
        return validation_metrics(verdicts, records, self.job.validation.objective)

    def state(self, step: int) -> dict[str, Any]:
        """What a checkpoint after ``step`` committed steps keeps: the data position
        right after batch ``step - 1`` (not the producer's, which may be ahead)."""
        if step - 1 not in self._positions:
            raise RuntimeError(f"no batch {step - 1} was made: its data position is unknown")
        return {"position": self._positions[step - 1].to_dict(), "version": step}

    def status(self) -> dict[str, Any]:
        """What the coordinator does now (for operators and fault tests; takes no pool
        lock): ``producing``, the newest weights ``received``, ``batches_ready``,
        ``learners_in_shard`` (ranks with calls waiting), its ``pid``, and the pool's
        :meth:`~mmrad.rl.pool.RolloutPool.status`."""
        with self._cond:
            state = {
                "producing": self._producing,
                "received": self._received,
                "batches_ready": sorted(self._batches),
                "learners_in_shard": sorted(r for r, n in self._in_shard.items() if n > 0),
                "pid": os.getpid(),
            }
        return {**state, "pool": self.pool.status()}

    def engines(self) -> list[dict[str, Any]] | None:
        """What the kept engines it was given reported when its pool reset them
        (:attr:`~mmrad.rl.pool.RolloutPool.reused`); ``None`` when it started its own."""
        return self.pool.reused

    def worker_pids(self) -> list[int]:
        with self._pool_lock:
            return self.pool.worker_pids()

    def stop(self) -> None:
        """Stop producing, end the prompt pipeline and shut the engines down."""
        self._stop_producing()
        try:
            self.pool.shutdown()
        finally:
            self._pool_lock.release()
            self.stream.close()

    # -- producing batches ----------------------------------------------------------------

    def _produce(self, first: int) -> None:
        staleness = self.job.algorithm.max_staleness
        try:
            for step in range(first, self.job.schedule.max_steps):
                with self._cond:
                    self._producing = f"waiting for weights v{step - staleness}"
                    self._wait(
                        lambda s=step: self._stop.is_set() or self._received >= s - staleness,
                        f"the learners' weights v{step - staleness} (to make batch {step})",
                    )
                if self._stop.is_set():
                    self._producing = "stopped"
                    return
                self._producing = f"making batch {step}"
                with self._pool_lock:
                    self._apply_pending()
                    batch = self._make_batch(step)
                with self._cond:
                    self._batches[step] = batch
                    self._cond.notify_all()
            self._producing = "done"
        except BaseException as err:
            if self._stop.is_set():  # interrupted on purpose (_stop_producer)
                self._producing = "stopped"
                return
            self._producing = "failed"
            if isinstance(err, NOT_RETRIED):  # bad data or config: a restart fails alike
                self.fail(f"{type(err).__name__}: {err}")
            with self._cond:
                self._error = traceback.format_exc()
                self._cond.notify_all()
            log.exception("the GRPO producer failed")

    def _stop_producer(self) -> None:
        """Stop the producer (callers interrupt the pool's waits: its batch may wait for
        weights that the stopping learners will never send)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._producer is not None:
            self._producer.join()
            self._producer = None

    def _stop_producing(self) -> None:
        """Stop the producer and take the pool lock (release it after), interrupting
        whatever waits for weights meanwhile: the producer's batch, or an old learner
        group's validation holding the lock."""
        with self.pool.interrupting_waits():
            self._stop_producer()
            self._pool_lock.acquire()

    def _wait(self, done: Callable[[], bool], what: str) -> None:
        """``self._cond.wait_for(done)`` (caller holds the condition), at most
        ``coordinator.wait_timeout_s``; then a :class:`CoordinatorTimeout` naming ``what``."""
        limit = self.job.coordinator.wait_timeout_s
        if not self._cond.wait_for(done, timeout=limit):
            raise CoordinatorTimeout(
                f"the GRPO coordinator waited {limit:.0f} s for {what} "
                f"(coordinator.wait_timeout_s); its producer is {self._producing}"
            )

    def _hold_version(self, version: int) -> None:
        """Wait for weights ``version`` and apply them (caller holds the pool lock; the
        learners push nothing newer while they wait on this call)."""
        with self._cond:
            self._wait(
                lambda: self._received >= version or self._error is not None,
                f"the learners' weights v{version}",
            )
        self._apply_pending()
        if self.pool.version != version:
            raise RuntimeError(f"engines hold v{self.pool.version}, asked about v{version}")

    def _apply_pending(self) -> None:
        """Sync the newest pushed weights to the engines, or wait for the channel
        receives in flight (caller holds the pool lock)."""
        with self._cond:
            update, self._pending = self._pending, None
        if update is not None:
            self._sync_seconds += self.pool.sync(update)
        self._sync_seconds += self.pool.finish_receive()

    def _make_batch(self, step: int) -> TrainBatch:
        """Batch ``step`` (caller holds the pool lock); records the data position after
        it and starts timing the next weight sync."""
        self._generation_seconds = 0.0
        batch = make_batch(
            step, self._batch_recipe(), self.stream, self._generate, self._own_metrics
        )
        self._positions[step] = self.stream.position
        self._sync_seconds = 0.0
        return batch

    def _generate(self, prompts, sampling):
        """The pool's rollouts; adds the engines' own sampling time (the slowest engine's,
        as they run in parallel) to the batch's ``time/generation``."""
        rollouts = self.pool.generate(prompts, sampling)
        self._generation_seconds += self.pool.stats().get("rollout/seconds", 0.0)
        return rollouts

    def _own_metrics(self) -> dict[str, float]:
        """The batch's metrics that only the coordinator knows."""
        return {
            "rollout/workers_replaced": self.pool.stats().get("rollout/workers_replaced", 0.0),
            "time/sync_apply": self._sync_seconds,
            "time/generation": self._generation_seconds,
        }

    def _batch_recipe(self) -> BatchRecipe:
        if self._recipe is None:
            self._recipe = BatchRecipe.build(self.job, self.variant, self.model)
        return self._recipe

    # -- engines and data -----------------------------------------------------------------

    def _stream(self, records, knowledge: Knowledge, storage: Storage) -> PromptStream:
        return PromptStream(
            records,
            DecodeSpec.from_config(storage, self.job.data),
            seed=self.job.data.seed,
            knowledge=knowledge,
            decode_cpus=self.job.data.decode_cpus,
            decode_tasks=self.job.data.decode_tasks,
            batch_size=self.job.data.batch_size,
            resources=worker_resources(self.job.ray),
        )

    def _new_pool(self):
        from mmrad.rl.pool import RolloutPool

        spec = worker_spec(self.job, self.variant)
        return RolloutPool(
            spec.model,
            spec.engine,
            spec.pixels,
            spec.variant,
            num_workers=self.job.rollout.num_workers,
            num_cpus=spec.num_cpus,
            num_gpus=spec.num_gpus,
            resources=dict(spec.resources),
            max_retries=self.job.rollout.max_retries,
            on_behind=self._want_resend,
            channel_timeout_s=self.job.sync.channel_timeout_s,
            workers=self._kept_workers,
        )


def worker_spec(job: GRPOJobConfig, variant: PromptVariant) -> WorkerSpec:
    """The rollout engines a GRPO run's pool starts (or is given, alike)."""
    shape = ray_options(engine_shape(job))
    model = ModelSource(job.model.path, job.storage, job.model.cache_dir)
    return WorkerSpec(
        model, job.engine, job.model.pixels, variant, shape["num_cpus"], shape["num_gpus"],
        tuple(sorted(shape["resources"].items())),
    )  # fmt: skip
