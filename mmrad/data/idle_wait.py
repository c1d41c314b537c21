"""A pause in Ray Data's scheduling loop while it has nothing to do.

Ray Data 2.60's streaming executor waits (in ``ray.wait``) only for tasks in flight. Once
a dataset's tasks are done and its blocks wait for a slow consumer (a trainer between
steps, a driver waiting for rollouts), the loop reruns its bookkeeping without pause
until the consumer takes the last block: a core and the GIL taken from the training
thread of the same process (half a core per SFT worker on the learning recipe,
``benchmarks/idle_data_loop.py``). :func:`install` makes that loop sleep briefly in that
state instead; a step that has tasks in flight, or a consumer waiting for data, is
unchanged. ``MMRAD_DATA_IDLE_WAIT=0`` in a process's environment leaves Ray's loop as it
is (for a Ray that no longer spins, and for the benchmark's baseline).
"""

from __future__ import annotations

import logging
import os
import time

IDLE_WAIT_S = 0.02  # at most this late to dispatch after the consumer frees a slot
_PATCHED = "_mmrad_idle_wait"
SWITCH = "MMRAD_DATA_IDLE_WAIT"
# Ray internals the rest reads: a Ray without them keeps its own loop (with a warning)
# rather than a loop that fails inside every dataset.
NEEDED = {"StreamingExecutor": ("_scheduling_loop_step", "_consumer_idling"),
          "PhysicalOperator": ("num_active_tasks",)}  # fmt: skip
log = logging.getLogger(__name__)


def install() -> None:
    """Patch this process's streaming executor (idempotent; Ray Data is imported here)."""
    from ray.data._internal.execution.interfaces import PhysicalOperator
    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    if hasattr(StreamingExecutor, _PATCHED) or os.environ.get(SWITCH) == "0":
        return
    classes = {"StreamingExecutor": StreamingExecutor, "PhysicalOperator": PhysicalOperator}
    missing = [f"{c}.{name}" for c, names in NEEDED.items() for name in names
               if not hasattr(classes[c], name)]  # fmt: skip
    if missing:
        log.warning("Ray Data's loop left as it is: this Ray lacks %s", ", ".join(missing))
        setattr(StreamingExecutor, _PATCHED, None)  # looked at, not patched: warn once
        return
    step = StreamingExecutor._scheduling_loop_step

    def scheduling_loop_step(self, topology):
        running = step(self, topology)
        if running and not self._consumer_idling() and not has_tasks_in_flight(topology):
            time.sleep(IDLE_WAIT_S)
        return running

    StreamingExecutor._scheduling_loop_step = scheduling_loop_step
    setattr(StreamingExecutor, _PATCHED, True)


def has_tasks_in_flight(topology) -> bool:
    return any(op.num_active_tasks() for op in topology)
