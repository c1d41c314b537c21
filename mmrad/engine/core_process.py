"""What mmrad adds to the processes vLLM starts when its engine core runs in a child
process (the GPU layout; ``engine.multiprocess``): the engine core and, where vLLM's
executor starts them, its workers. vLLM loads its general plugins (entry point group
``vllm.general_plugins``) in each of its processes; :func:`prepare_engine_core` acts in
those children alone:

- their heap is frozen at exit: the interpreter's last collections walked it for 1 to
  2 s of each process's stop, for memory that the process gives back anyway;
- the engine core ends when the process that started it is gone: vLLM tells it nothing
  when a replica or rollout worker is SIGKILLed (out of memory, ``ray.kill``) outside
  Ray's own cleanup, and on a GPU its memory would stay held. (Its workers already end
  with it: vLLM closes their death pipes.)
"""

from __future__ import annotations

import atexit
import gc
import logging
import multiprocessing
import os
import signal
import threading
import time

log = logging.getLogger(__name__)

ENGINE_CORE = "EngineCore"
"""How vLLM names its engine core process (``EngineCore_DP<n>`` with data parallelism)."""
WORKER = "VllmWorker"
"""How vLLM's multiprocess executor names its workers (``VllmWorker-<rank>``)."""
PARENT_POLL_S = 0.5
EXIT_GRACE_S = 10.0
"""How long an orphaned engine core may take over vLLM's own shutdown before it exits."""

_prepared = threading.Event()


def vllm_child() -> str | None:
    """:data:`ENGINE_CORE` or :data:`WORKER` in a process vLLM started, else ``None``."""
    if multiprocessing.parent_process() is None:
        return None
    name = multiprocessing.current_process().name
    return next((kind for kind in (ENGINE_CORE, WORKER) if name.startswith(kind)), None)


def prepare_engine_core() -> None:
    """The plugin (vLLM may call it more than once in a process)."""
    kind = vllm_child()
    if kind is None or _prepared.is_set():
        return
    _prepared.set()
    atexit.register(gc.freeze)
    if kind == ENGINE_CORE:
        end_with_parent(multiprocessing.parent_process().pid)


def end_with_parent(parent: int) -> threading.Thread:
    """Watch (in a daemon thread) for ``parent`` to be gone (this process handed to
    another parent), then stop as vLLM stops on SIGTERM, or exit after
    :data:`EXIT_GRACE_S`."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        log.warning("engine core %d: its parent %d is gone; stopping", os.getpid(), parent)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(EXIT_GRACE_S)
        os._exit(1)

    thread = threading.Thread(target=watch, name="mmrad-end-with-parent", daemon=True)
    thread.start()
    return thread
