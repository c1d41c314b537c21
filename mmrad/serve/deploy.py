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

import copy
import inspect
import logging
import signal
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


def deploy(file: ServeFile, *, timeout_s: float = DEPLOY_TIMEOUT_S) -> dict[str, str]:
    """Deploy every application of ``file`` on the connected Ray cluster and wait until
    all are RUNNING; returns ``{application: base URL}``. Raises :class:`DeployError`
    with Serve's message when one fails or the deadline passes."""
    from ray import serve

    targets = app_targets(file)
    serve.start(**start_options(file.config))
    failures: list[BaseException] = []
    # serve.run returns once its application is RUNNING (an application of the same name
    # already RUNNING does not count: its new version is) and has no deadline of its own
    deploying = threading.Thread(target=run_each, args=(targets, failures), daemon=True,
                                 name="mmrad-serve-run")  # fmt: skip
    deploying.start()
    deploying.join(timeout_s)
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


def serve_until_stopped(
    file: ServeFile, *, announce: Callable[[str], None] = print, poll_s: float = 5.0
) -> None:
    """Deploy ``file``, print where each application listens, and block until Ctrl-C or
    SIGTERM (``ray job stop``); then delete the applications this file deployed."""
    from ray import serve

    urls = deploy(file)
    for name, url in urls.items():
        announce(f"{name}: {url}  (POST /v1/detect, /v1/chat/completions; GET /healthz)")
    stop = {"now": False}

    def request_stop(*_: object) -> None:
        stop["now"] = True

    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        while not stop["now"]:
            time.sleep(poll_s)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        for name in urls:
            serve.delete(name)
        announce("stopped: " + ", ".join(urls))


def run_serve(file: ServeFile, ray: RayConfig, announce: Callable[[str], None] = print) -> None:
    """``mmrad serve`` and ``python -m ray_jobs.serve``: refuse a file the public API
    cannot deploy, then start or join Ray and :func:`serve_until_stopped`."""
    from mmrad.ray_env import init_ray

    app_targets(file)  # fails before Ray starts
    init_ray(ray)
    serve_until_stopped(file, announce=announce)
