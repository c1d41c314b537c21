"""Deploying a Serve config file from Python through Ray Serve's public API.

The file's cluster-wide options (``proxy_location``, ``http_options``, ``grpc_options``,
``logging_config``, ``tracing_config``, ``controller_options``) go to ``serve.start``;
each mmrad application becomes ``MMRADServer.options(<its deployments entry>)`` bound to
its ``args`` and is deployed with ``serve.run`` under its ``name`` and ``route_prefix``.
The application's ``runtime_env`` joins the deployment's as Serve merges them for a
config file (the deployment's keys win, ``env_vars`` combine). ``mmrad serve``,
``python -m ray_jobs.serve``, ``serve run FILE`` and ``serve deploy FILE`` therefore deploy
a file alike; applications on the cluster that the file does not name are left alone
(``serve deploy`` would remove them), and :func:`serve_until_stopped` deletes the file's
applications when it stops.

A key only Serve's controller understands (``target_capacity``, an application's
``autoscaling_policy``, a deployment's ``rolling_update_percentage``) and an application
other than mmrad's fail before Ray starts, naming the key: deploy such a file with
``serve deploy``.

Rejected: ``ray.serve._private.api.serve_start`` and the controller's ``deploy_apps``
(what ``serve run FILE`` calls; private, and may change in any Ray release); Serve's REST
API (what ``serve deploy`` uses: public, but it needs the dashboard, which
``ray.dashboard=false`` turns off); building other applications from their
``import_path`` here (the public API cannot set the options of deployments inside an
application built elsewhere, so their ``deployments`` entries could not apply).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from mmrad.config import ConfigError, RayConfig, path_fields
from mmrad.config import with_absolute_paths as absolute_paths
from mmrad.serve.config import IMPORT_PATH, ServeArgs, ServeFile

log = logging.getLogger(__name__)

DEPLOY_TIMEOUT_S = 1800.0
"""Replicas download the model (s3://) and start vLLM; a 7B model on a cold node can
take many minutes."""

APPLICATION_KEYS = ("name", "route_prefix", "import_path", "args", "runtime_env",
                    "deployments")  # fmt: skip
"""The keys of an application entry :func:`app_target` reads itself; the others must be
``serve.run`` arguments."""


class DeployError(RuntimeError):
    """An application did not reach RUNNING; the message holds Serve's reason."""


@dataclass(frozen=True)
class AppTarget:
    """One application of a Serve file, ready for ``serve.run(app, **run_options)``."""

    name: str
    app: Any  # ray.serve.Application
    run_options: dict[str, Any]


def with_absolute_paths(config: dict[str, Any]) -> dict[str, Any]:
    """The config with mmrad applications' local paths (``model_dir``)
    made absolute against this process's directory (replicas may run elsewhere); the
    other args stay as the file gives them."""
    config = copy.deepcopy(config)
    for app in config.get("applications") or []:
        args = app.get("args") or {}
        if app.get("import_path") == IMPORT_PATH:
            resolved = absolute_paths(ServeArgs.model_validate(args))
            for key in path_fields(ServeArgs):
                if key in args:
                    args[key] = getattr(resolved, key)
    return config


def dump_serve_file(file: ServeFile) -> str:
    """The file as it is deployed, in Ray Serve's schema (``--print-config``): mmrad
    applications' args validated, defaults filled in, local paths absolute, secrets
    masked. A file :func:`run_serve` would refuse is refused here too."""
    app_targets(file)
    config = copy.deepcopy(file.config)
    for app in config.get("applications") or []:
        if app["name"] in file.apps:
            app["args"] = absolute_paths(file.apps[app["name"]]).model_dump(mode="json")
    return yaml.safe_dump(config, sort_keys=False)


# -- the file as public API calls ---------------------------------------------------------


def public_keys(function: Callable[..., Any], *exclude: str) -> frozenset[str]:
    """The keyword arguments ``function`` takes, less private ones and ``exclude``."""
    names = inspect.signature(function).parameters
    return frozenset(n for n in names if not n.startswith("_") and n not in exclude)


def refuse_unsupported(
    node: Mapping[str, Any], allowed: frozenset[str], origin: str, where: str
) -> None:
    """A :class:`ConfigError` naming the first key of ``node`` that is set but not
    ``allowed`` (a setting the public API cannot make)."""
    for key, value in node.items():
        if value is not None and key not in allowed:
            raise ConfigError(
                f"{origin}: key {where + key!r}: Serve's public API (serve.start, "
                "serve.run, Deployment.options) has no such setting; deploy this file "
                "with `serve deploy` instead"
            )


def merged_runtime_env(app_env: Mapping[str, Any], own_env: Mapping[str, Any]) -> dict:
    """Serve's rule for a config file: the deployment's keys win, ``env_vars`` combine."""
    merged = {**app_env, **own_env}
    env_vars = {**(app_env.get("env_vars") or {}), **(own_env.get("env_vars") or {})}
    if env_vars:
        merged["env_vars"] = env_vars
    return merged


def deployment_options(entry: Mapping[str, Any], origin: str) -> dict[str, Any]:
    """``MMRADServer.options(...)`` for an application entry: its ``deployments`` entry
    and its ``runtime_env``."""
    from ray import serve

    from mmrad.serve.app import MMRADServer

    allowed = public_keys(serve.Deployment.options, "self", "func_or_class", "version")
    options: dict[str, Any] = {}
    for deployment in entry.get("deployments") or []:
        where = f"applications.{entry['name']}.deployments.{deployment['name']}."
        refuse_unsupported(deployment, allowed, origin, where)
        options.update({k: v for k, v in deployment.items() if k != "name"})
    actor = dict(options.get("ray_actor_options") or MMRADServer.ray_actor_options or {})
    runtime_env = merged_runtime_env(entry.get("runtime_env") or {},
                                     actor.get("runtime_env") or {})  # fmt: skip
    if runtime_env:
        options["ray_actor_options"] = {**actor, "runtime_env": runtime_env}
    return options


def app_target(entry: Mapping[str, Any], origin: str) -> AppTarget:
    """The mmrad application of one ``applications`` entry (a :class:`ConfigError` for
    another application, or a key the public API cannot set)."""
    from ray import serve

    from mmrad.serve.app import MMRADServer

    where = f"applications.{entry['name']}."
    if entry.get("import_path") != IMPORT_PATH:
        raise ConfigError(
            f"{origin}: key {where + 'import_path'!r}: mmrad deploys its own application "
            f"({IMPORT_PATH}); deploy a file with others with `serve deploy`"
        )
    run_keys = public_keys(serve.run, "target", "blocking", "name", "route_prefix")
    refuse_unsupported(entry, run_keys | set(APPLICATION_KEYS), origin, where)
    options = deployment_options(entry, origin)
    app = MMRADServer.options(**options).bind(dict(entry.get("args") or {}))
    run_options = {key: entry[key] for key in run_keys if entry.get(key) is not None}
    run_options["route_prefix"] = entry.get("route_prefix", "/")
    return AppTarget(name=entry["name"], app=app, run_options=run_options)


def app_targets(file: ServeFile) -> list[AppTarget]:
    """Every application of ``file`` as a :class:`AppTarget`, local paths made absolute.
    Needs no Ray: run it before Ray starts to refuse a file early."""
    from ray import serve

    config = with_absolute_paths(file.config)
    allowed = public_keys(serve.start, "kwargs") | {"applications"}
    refuse_unsupported(config, allowed, file.origin, "")
    return [app_target(entry, file.origin) for entry in config.get("applications") or []]


def start_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """``serve.start`` keyword arguments: the file's cluster-wide options."""
    from ray import serve

    keys = public_keys(serve.start, "kwargs")
    return {key: config[key] for key in keys if config.get(key) is not None}


# -- deploying and waiting ----------------------------------------------------------------


def deploy(
    file: ServeFile, *, timeout_s: float = DEPLOY_TIMEOUT_S, stop: threading.Event | None = None
) -> dict[str, str]:
    """Deploy every application of ``file`` on the connected Ray cluster and wait until
    all are RUNNING; returns ``{application: base URL}``. Raises :class:`DeployError`
    with Serve's message when one fails or the deadline passes, and
    :class:`StopRequested` as soon as ``stop`` is set."""
    from ray import serve

    targets = app_targets(file)
    serve.start(**start_options(file.config))
    failures: list[BaseException] = []
    # serve.run returns once its application is RUNNING (an application of the same name
    # already RUNNING does not count: its new version is) and has no deadline of its own
    deploying = threading.Thread(target=run_each, args=(targets, failures), daemon=True,
                                 name="mmrad-serve-run")  # fmt: skip
    deploying.start()
    deadline = time.monotonic() + timeout_s
    while deploying.is_alive() and time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            raise StopRequested
        deploying.join(min(0.5, max(0.0, deadline - time.monotonic())))
    names = [target.name for target in targets]
    if deploying.is_alive():
        raise DeployError(f"not RUNNING after {timeout_s:.0f} s: {status_summary(names)}")
    if failures:
        reasons = failed_reasons(names) or str(failures[0])
        raise DeployError(f"deploy failed: {reasons}") from failures[0]
    return file.app_urls()


def run_each(targets: list[AppTarget], failures: list[BaseException]) -> None:
    """``serve.run`` each target in turn; the first exception is appended to ``failures``."""
    from ray import serve

    try:
        for target in targets:
            serve.run(target.app, name=target.name, **target.run_options)
    except Exception as err:  # reported by deploy, with Serve's reasons
        failures.append(err)


def status_summary(names: list[str]) -> dict[str, str]:
    from ray import serve

    apps = serve.status().applications
    return {name: (apps[name].status if name in apps else "absent") for name in names}


def failed_reasons(names: list[str]) -> str:
    """Serve's messages for the named applications that failed to deploy."""
    from ray import serve

    apps = serve.status().applications
    failed = [n for n in names if n in apps and apps[n].status == "DEPLOY_FAILED"]
    return "; ".join(failure_reason(name, apps[name]) for name in failed)


def failure_reason(name: str, app: Any) -> str:
    """The application's message and its failed deployments' (where a replica's
    constructor error, e.g. a missing model directory, is kept)."""
    parts = [f"{name}: {app.message}"]
    for deployment, status in (app.deployments or {}).items():
        if status.message and str(status.status) != "HEALTHY":
            parts.append(f"{deployment}: {status.message}")
    return " ".join(parts)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
DELETE_TIMEOUT_S = 10.0
"""How long a stop of a process joined to a cluster waits for ``serve.delete``: replicas
finish their in-flight requests and shut their engines down (Serve checks every 2 s)."""
SHUTDOWN_TIMEOUT_S = 4.0
"""How long a stop waits for ``ray.shutdown`` of a local Ray it started."""
KILL_GRACE_S = 1.5
"""Between SIGTERM and SIGKILL for a started process still alive after ``ray.shutdown``."""


class StopRequested(Exception):
    """A stop signal arrived before the applications were RUNNING."""


def bounded(call: Callable[[], object], timeout_s: float, what: str) -> bool:
    """Run ``call`` in a daemon thread and wait at most ``timeout_s``; False (logged)
    when it raised or had not returned by then (it is left behind: a Ray call to a dead
    GCS retries for a minute)."""
    outcome: list[bool] = []

    def target() -> None:
        try:
            call()
            outcome.append(True)
        except Exception as err:  # a stop goes on regardless
            log.warning("%s failed: %s", what, err)
            outcome.append(False)

    worker = threading.Thread(target=target, daemon=True, name="mmrad-serve-stop")
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        log.warning("%s did not return within %.0f s; going on", what, timeout_s)
        return False
    return outcome == [True]


def descendants() -> list[Any]:
    """This process's descendants (psutil processes): the local Ray it started, Ray's
    workers (replicas) and theirs (vLLM's ``EngineCore``)."""
    import psutil

    return psutil.Process().children(recursive=True)


def end_processes(processes: list[Any], grace_s: float = KILL_GRACE_S) -> int:
    """SIGTERM the processes still alive (by pid, as psutil checks it is the same
    process), SIGKILL those alive ``grace_s`` later; returns how many needed ending."""
    import psutil

    alive = [p for p in {p.pid: p for p in processes}.values() if p.is_running()]
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, stubborn = psutil.wait_procs(alive, timeout=grace_s)
    for process in stubborn:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(stubborn, timeout=grace_s)
    return len(alive)


def stop_local_ray() -> bool:
    """Shut down the local Ray this process started (bounded) and end, by pid, every
    process it started that is still alive then: Ray's own processes when ``ray.shutdown``
    hung on a GCS that a group-wide signal had stopped, a replica's vLLM ``EngineCore``.
    Deleting the applications first would gain nothing here and can block: with the GCS
    gone the call retries for a minute, and a call still running after ``ray.shutdown``
    starts a new Ray. False when ``ray.shutdown`` did not return in time."""
    import ray

    started = descendants()
    clean = bounded(ray.shutdown, SHUTDOWN_TIMEOUT_S, "ray.shutdown")
    ended = end_processes([*started, *descendants()])
    if ended:
        log.info("ended %d process(es) still alive after ray.shutdown", ended)
    return clean


def serve_until_stopped(
    file: ServeFile,
    *,
    announce: Callable[[str], None] = print,
    poll_s: float = 5.0,
    owns_ray: bool = False,
) -> bool:
    """Deploy ``file``, print where each application listens, and block until SIGINT
    (Ctrl-C) or SIGTERM (``ray job stop``, ``kill``, a signal to the whole process
    group); then delete the applications this file deployed. A signal during the deploy
    stops it too.

    Every step of the stop is bounded, so it ends within about 10 s however Ray fares:
    a signal sent to the process group reaches Ray's own processes as well, and calls to
    a Ray whose GCS is gone would block for a minute. With ``owns_ray`` (the local Ray
    this process started) Ray is shut down and any process this one started that is
    still alive after it is ended by pid (:func:`stop_local_ray`); otherwise the file's
    applications are deleted and the cluster stays. Returns False when a step did not
    return in time (the caller should then exit at once: an exit handler would call into
    Ray again)."""
    from ray import serve

    stop = threading.Event()

    def request_stop(*_: object) -> None:
        stop.set()

    names = [target.name for target in app_targets(file)]
    previous = {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}
    clean, stopping = True, False  # a failed deploy leaves a joined cluster's apps as they are
    try:
        urls = deploy(file, stop=stop)
        stopping = True
        for name, url in urls.items():
            announce(f"{name}: {url}  (POST /v1/detect, /v1/chat/completions; GET /healthz)")
        while not stop.wait(poll_s):
            pass
    except StopRequested:
        stopping = True
    finally:
        if owns_ray:  # Ray goes, and the applications with it
            clean = stop_local_ray()
        elif stopping:
            clean = bounded(lambda: [serve.delete(name) for name in names], DELETE_TIMEOUT_S,
                            f"deleting {', '.join(names)}")  # fmt: skip
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if stopping:
            announce("stopped: " + ", ".join(names))
    return clean


def run_serve(file: ServeFile, ray: RayConfig, announce: Callable[[str], None] = print) -> None:
    """``mmrad serve`` and ``python -m ray_jobs.serve``: refuse a file the public API
    cannot deploy, then start or join Ray and :func:`serve_until_stopped`. A local Ray
    started here is shut down when it stops; when a step of the stop hung (Ray's
    processes were signalled too), the process exits at once rather than block in Ray's
    exit handler."""
    from mmrad.ray_env import init_ray, joining_existing_cluster

    app_targets(file)  # fails before Ray starts
    init_ray(ray)
    owns_ray = not joining_existing_cluster(ray)
    if not serve_until_stopped(file, announce=announce, owns_ray=owns_ray):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
