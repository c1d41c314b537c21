"""Rollout engines kept alive from one GRPO run to the next in the same process.

A Ray Tune trial's actor that Tune reuses for the next trial (``reuse_actors``) runs that
trial's GRPO run in the same process (after a trial that the scheduler stopped, once its
run has ended: :class:`mmrad.tune.job.TrialStop`). Its engines are started here, not by
the run's coordinator: an actor ends with the process that started it, and the
coordinator ends with its run, while this process lives on. The next run whose engines
are alike (the same :class:`~mmrad.rl.pool.WorkerSpec` and count) gets the same actors,
and its pool resets them to version 0, the starting weights, before any use
(:meth:`~mmrad.rl.rollout.RolloutWorker.reset`). A run of other engines ends the kept
ones first, so a process holds one set: one pool per concurrent trial. A kept engine
found dead is replaced by a new one; one that dies during a run is replaced by the pool
as always (that replacement ends with the run, and the next run starts another here).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from mmrad.rl.pool import WorkerSpec, dead_worker_errors, worker_name

log = logging.getLogger(__name__)

ALIVE_TIMEOUT_S = 60.0
"""How long a kept engine may take to answer before it counts as dead."""


class KeptEngines:
    """The engine actors of this process's last GRPO run, for the next one."""

    def __init__(self) -> None:
        self._spec: WorkerSpec | None = None
        self._actors: list[Any] = []
        self._id = uuid.uuid4().hex[:8]

    def take(self, spec: WorkerSpec, count: int) -> list[Any]:
        """``count`` engine actors of ``spec``: the kept ones that live (reset them before
        use), new ones for the rest (returns at once; they start meanwhile)."""
        if spec != self._spec or count != len(self._actors):
            self.end()
            self._spec, self._actors = spec, [None] * count
        self._actors = [
            actor if actor is not None and _alive(actor) else self._start(spec, slot)
            for slot, actor in enumerate(self._actors)
        ]
        return list(self._actors)

    def end(self) -> None:
        """End the kept engines (they hold their resources until then)."""
        import ray

        actors, self._actors, self._spec = self._actors, [], None
        actors = [actor for actor in actors if actor is not None]
        # closed first, as the pool ends its own: vLLM frees its memory (a new engine's
        # start-up on the same GPU checks what is free) and adapter folders are removed
        ray.wait([a.close.remote() for a in actors], num_returns=len(actors), timeout=60)
        for actor in actors:
            ray.kill(actor)

    def _start(self, spec: WorkerSpec, slot: int) -> Any:
        name = worker_name(slot, 0)
        return spec.start(name, f"mmrad-kept-{self._id}-{uuid.uuid4().hex[:6]}-{name}")


def _alive(actor: Any) -> bool:
    import ray
    from ray.exceptions import GetTimeoutError

    try:
        ray.get(actor.pid.remote(), timeout=ALIVE_TIMEOUT_S)
    except (*dead_worker_errors(), GetTimeoutError) as error:
        log.warning("a kept rollout engine is gone (%s); starting a new one", error)
        ray.kill(actor)
        return False
    return True


KEPT = KeptEngines()
"""This process's kept engines."""
