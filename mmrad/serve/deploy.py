"""Deploying a Serve config file from Python, as ``serve run FILE`` does.

``serve run FILE`` starts Serve with the file's HTTP/proxy options and hands the whole
file to the controller (``deploy_apps``), which builds each application from its
``import_path`` and ``args`` and applies the ``deployments`` overrides. :func:`deploy`
makes the same two calls, so ``mmrad serve``, ``python -m ray_jobs.serve``,
``serve run`` and ``serve deploy`` deploy a file identically. Like ``serve deploy``, the
file is the cluster's whole desired state: applications not in it are removed.
"""

from __future__ import annotations

import argparse
import copy
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from mmrad.config import ConfigError, path_fields
from mmrad.config import with_absolute_paths as absolute_paths
from mmrad.serve.config import IMPORT_PATH, ServeArgs, ServeFile, load_serve_file

log = logging.getLogger(__name__)

DEPLOY_TIMEOUT_S = 1800.0
"""Replicas download the model (s3://) and start vLLM; a 7B model on a cold node can
take many minutes."""


class DeployError(RuntimeError):
    """An application did not reach RUNNING; the message holds Serve's reason."""


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


def deploy(file: ServeFile, *, timeout_s: float = DEPLOY_TIMEOUT_S) -> dict[str, str]:
    """Deploy every application of ``file`` on the connected Ray cluster and wait until
    all are RUNNING; returns ``{application: base URL}``. Raises :class:`DeployError`
    with Serve's message when one fails."""
    from ray.serve._private.api import serve_start  # what `serve run FILE` calls
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(with_absolute_paths(file.config))
    client = serve_start(
        http_options=schema.http_options.model_dump(),
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
        proxy_location=schema.proxy_location,
        controller_options=schema.controller_options,
    )
    client.deploy_apps(schema, _blocking=False)
    names = [app.name for app in schema.applications]
    wait_running(names, timeout_s)
    return file.app_urls()


def wait_running(names: list[str], timeout_s: float, poll_s: float = 1.0) -> None:
    """Poll ``serve.status()`` until every named application is RUNNING."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        states = {name: apps.get(name) for name in names}
        failed = {n: a for n, a in states.items() if a is not None and a.status == "DEPLOY_FAILED"}
        if failed:
            reasons = "; ".join(failure_reason(name, app) for name, app in failed.items())
            raise DeployError(f"deploy failed: {reasons}")
        if all(a is not None and a.status == "RUNNING" for a in states.values()):
            return
        if time.monotonic() > deadline:
            summary = {n: (a.status if a else "absent") for n, a in states.items()}
            raise DeployError(f"not RUNNING after {timeout_s:.0f} s: {summary}")
        time.sleep(poll_s)


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


def parse_serve_args(argv: Sequence[str] | None = None) -> ServeFile:
    """``--config FILE`` plus ``key.sub=value`` overrides, validated before Ray starts
    (exit status 2 with the file and key on a bad config)."""
    parser = argparse.ArgumentParser(description="Deploy a Serve config file and block.")
    parser.add_argument("--config", "-c", required=True, help="Serve config (Ray's schema)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value (lists by index or name)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return load_serve_file(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
