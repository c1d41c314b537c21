"""``mmrad serve`` stops cleanly: within 15 s of SIGTERM or SIGINT, sent to the process
or to its whole process group, and nothing it started (the local Ray, its workers and
Serve replicas, vLLM's ``EngineCore``) is left running; Ray's own ``serve run`` on the
same file ends its replica and engine core within 15 s. Real processes, each in a
session of its own, serving the tiny model."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

pytestmark = pytest.mark.integration

TITLES_WITHIN_S = 30.0
STOP_WITHIN_S = 15.0
ENGINE_CORE = "the replica's engine core"
START_WITHIN_S = 300.0
CASES = {"SIGTERM to the process group": (signal.SIGTERM, True),
         "SIGINT to the process": (signal.SIGINT, False)}  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_file(tiny_model: str, folder: Path, port: int) -> Path:
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": "mmrad", "route_prefix": "/", "import_path": "mmrad.serve.app:app_builder",
            "args": {"model_dir": tiny_model, "model_name": "mmrad-tiny", "max_tokens": 32,
                     "engine": {"max_model_len": 4096, "kv_cache_bytes": 64 * 2**20,
                                "max_num_seqs": 4}},
            "deployments": [{"name": "MMRADServer", "num_replicas": 1,
                             "ray_actor_options": {"num_cpus": 0.5}}],
        }],
    }  # fmt: skip
    path = folder / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


AS_A_SHELL_STARTS_IT = (
    "import os, signal, sys\n"
    "for sig in (signal.SIGINT, signal.SIGQUIT):\n"
    "    signal.signal(sig, signal.SIG_DFL)\n"
    "signal.pthread_sigmask(signal.SIG_SETMASK, [])\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)
"""Run the rest of the command line as a terminal's shell starts a command: SIGINT and
SIGQUIT at their defaults, nothing blocked. A test run started in the background by a
shell without job control (``make test &``, CI scripts) ignores both, and every process
it starts inherits that: ``serve run`` then never sees Ctrl-C."""


def wait_until_serving(process: subprocess.Popen, log: Path, port: int, announced: str) -> None:
    """``/healthz`` answers and the command has logged ``announced`` (deploy returned)."""
    import httpx

    deadline = time.monotonic() + START_WITHIN_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server exited:\n{log.read_text()[-4000:]}"
        try:
            reply = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
            healthy = reply.status_code == 200 and reply.json().get("status") == "ok"
        except (httpx.HTTPError, ValueError):
            healthy = False
        if healthy and announced in log.read_text():
            return
        time.sleep(0.5)
    pytest.fail(f"not serving after {START_WITHIN_S:.0f} s:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def serving(command: list[str], tiny_model: str, folder: Path, announced: str):
    """``command`` + the Serve file, started as a shell starts it
    (:data:`AS_A_SHELL_STARTS_IT`) in a session of its own with a Ray of its own, once
    serving: ``(process, log, port, its processes)``; leftovers of a failed run are
    killed by pid."""
    port = free_port()
    config = serve_file(tiny_model, folder, port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONUNBUFFERED"] = "1"  # its log up to the signal, for a failure's message
    log = folder / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", AS_A_SHELL_STARTS_IT, *command, str(config)], cwd=folder,
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    started: list[psutil.Process] = []
    try:
        wait_until_serving(process, log, port, announced.format(port=port))
        started = started_processes(process.pid)
        yield process, log, started
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for leftover in started:
            with contextlib.suppress(psutil.Error):
                leftover.kill()


def started_processes(pid: int) -> list[psutil.Process]:
    """Every process under ``pid`` once Ray's and the replica's engine core are among them
    (a process shows its title only once it has set it, so poll a while). The engine core
    is found as the replica's child: a full run once saw it, serving, still titled
    ``python`` 30 s after it had logged as ``EngineCore``."""
    wanted = {"raylet", "gcs_server", ENGINE_CORE}
    deadline = time.monotonic() + TITLES_WITHIN_S
    while True:
        started = psutil.Process(pid).children(recursive=True)
        names = set()
        for child in started:
            with contextlib.suppress(psutil.Error):
                names.add(child.name())
        if any(map(is_engine_core, replica_and_engine_cores(started)[1:])):
            names.add(ENGINE_CORE)
        if wanted <= names:
            return started
        if time.monotonic() > deadline:
            pytest.fail(f"missing {wanted - names} under {pid}: {process_tree(started)}")
        time.sleep(0.5)


def replica_and_engine_cores(processes: list[psutil.Process]) -> list[psutil.Process]:
    """The Serve replica among ``processes`` and every process it started (its vLLM
    engine core), the replica first; empty without a replica."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            if "ServeReplica:" in " ".join(process.cmdline()):
                return [process, *process.children(recursive=True)]
    return []


def is_engine_core(process: psutil.Process) -> bool:
    """vLLM's engine core: titled, or not yet (a process multiprocessing spawned; the
    replica's other child is multiprocessing's resource tracker)."""
    with contextlib.suppress(psutil.Error):
        command = " ".join(process.cmdline())
        return command.startswith("VLLM::EngineCore") or "spawn_main" in command
    return False


def process_tree(processes: list[psutil.Process]) -> list[tuple[int, int, str]]:
    """``(pid, parent pid, name)`` of each process still there (for a failure message)."""
    tree = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            tree.append((process.pid, process.ppid(), process.name()))
    return tree


@pytest.mark.parametrize("case", list(CASES))
def test_mmrad_serve_stops_within_15_s_and_leaves_no_process(case, tiny_model, tmp_path):
    sig, whole_group = CASES[case]
    command = [sys.executable, "-m", "mmrad.cli", "serve", "--config"]
    with serving(command, tiny_model, tmp_path, "mmrad: http://127.0.0.1:{port}") as running:
        process, log, started = running
        signalled = time.monotonic()
        if whole_group:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)
        try:
            code = process.wait(timeout=STOP_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{case}: still running after {STOP_WITHIN_S:.0f} s:\n"
                        f"{log.read_text()[-4000:]}")  # fmt: skip
        exited = time.monotonic() - signalled
        _, alive = psutil.wait_procs(started, timeout=max(0.0, STOP_WITHIN_S - exited))
        gone = time.monotonic() - signalled
        print(f"\n{case}: mmrad serve exited {code} after {exited:.1f} s, "
              f"its {len(started)} processes gone after {gone:.1f} s")  # fmt: skip
        left = [(p.pid, p.name()) for p in alive if p.is_running()]
        assert not left, f"{case}: left running: {left}\n{log.read_text()[-4000:]}"
        assert code == 0, log.read_text()[-4000:]
        assert "stopped: mmrad" in log.read_text()


SERVE_RUN_CASES = {"Ctrl-C (SIGINT to the process group)": (signal.SIGINT, True),
                   "SIGTERM to the process": (signal.SIGTERM, False)}  # fmt: skip
"""Ray starts its processes with SIGINT blocked: on Ctrl-C, ``serve run`` shuts Serve
down, each replica gracefully (its engine closed), then the Ray it started."""


@pytest.mark.parametrize("case", list(SERVE_RUN_CASES))
def test_serve_run_ends_its_replica_and_engine_core_within_15_s(case, tiny_model, tmp_path):
    """Ray's own ``serve run`` on the same file: its replica and the replica's vLLM engine
    core are gone within 15 s (Ray's own processes are Ray's to stop)."""
    sig, whole_group = SERVE_RUN_CASES[case]
    command = [str(Path(sys.executable).with_name("serve")), "run"]
    with serving(command, tiny_model, tmp_path, "Submitted deploy config") as running:
        process, log, started = running
        ours = replica_and_engine_cores(started)
        assert len(ours) >= 2, process_tree(started)
        signalled = time.monotonic()
        if whole_group:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)
        _, alive = psutil.wait_procs(ours, timeout=STOP_WITHIN_S)
        print(f"\nserve run, {case}: replica and engine core gone after "
              f"{time.monotonic() - signalled:.1f} s")  # fmt: skip
        left = process_tree([p for p in alive if p.is_running()])
        assert not left, (f"{case}: left running: {left}\n{log.read_text()[-4000:]}\n"
                          f"{stacks([process.pid, *(pid for pid, _, _ in left)])}")  # fmt: skip


def stacks(pids: list[int]) -> str:
    """The Python stacks of ``pids`` (py-spy), for a failure's message."""
    spy = Path(sys.executable).with_name("py-spy")
    dumps = []
    for pid in pids:
        done = subprocess.run([str(spy), "dump", "--pid", str(pid)], capture_output=True,
                              text=True, timeout=30, check=False)  # fmt: skip
        dumps.append(f"--- {pid}\n{done.stdout[-3000:]}{done.stderr[-500:]}")
    return "\n".join(dumps)
