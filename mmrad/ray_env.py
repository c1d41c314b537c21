"""Starting or joining Ray, in one place: where its state lives and how it authenticates.

Ray 2.59+ turns token authentication on for local clusters and keeps the token in
``~/.ray/auth_token``. mmrad keeps both the token and Ray's session files under a state
folder of its own (the run directory's ``ray/``), so runs do not share hidden state and
a cleanup removes everything. Processes that join later (``ray job submit``, workers)
find the token through ``RAY_AUTH_TOKEN_PATH``.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from pathlib import Path

from mmrad.config import RayConfig

log = logging.getLogger(__name__)

# Ray puts Unix sockets under its temp dir (the dashboard's the deepest); their paths
# must stay under 107 bytes.
MAX_TEMP_DIR_CHARS = 36  # Ray adds about 70 characters below it
# Every mmrad driver joins one namespace, so a rerun finds the named actors (coordinator,
# progress board) of a killed driver's run: Ray gives each driver a random one otherwise.
NAMESPACE = "mmrad"
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
AUTO_CONNECT = "RAY_ENABLE_AUTO_CONNECT"


def auth_token_path(state_dir: Path) -> Path:
    """The token file under ``state_dir``, created (mode 0600) when missing."""
    path = state_dir / "auth_token"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    return path


def temp_dir_for(state_dir: Path) -> Path:
    """Ray's session folder: under ``state_dir`` when the path is short enough for sockets."""
    candidate = (state_dir / "session").absolute()
    if len(str(candidate)) <= MAX_TEMP_DIR_CHARS:
        return candidate
    return Path(tempfile.mkdtemp(prefix="mmrad-ray-"))


def ray_environment(state_dir: Path) -> dict[str, str]:
    """Environment for every process of a local cluster started by mmrad.

    ``RAY_AUTH_MODE`` is left to ``ray.init``, which turns token mode on for a new local
    cluster and refreshes Ray's cached config; setting it here, after Ray's config was
    read at import, would leave this process believing auth is disabled. Clients that
    connect later (``ray job submit``) set ``RAY_AUTH_MODE=token`` themselves.

    Ray Train's preemption watcher is off unless the caller turned it on: one machine is
    never preempted, and the watcher is one more process per Train run.

    Ray's auto-init is off in the cluster's processes (this one imported Ray already and
    keeps it): a worker that calls into Ray after its connection ended, as a Ray Data
    pipeline's thread does when its actor exits, would start a whole Ray instance of its
    own, whose agents outlive the worker."""
    return {
        "RAY_AUTH_TOKEN_PATH": str(auth_token_path(state_dir).absolute()),
        "RAY_TMPDIR": str(temp_dir_for(state_dir)),
        PREEMPTION_WATCHER: os.environ.get(PREEMPTION_WATCHER, "0"),
        AUTO_CONNECT: "0",
    }


def joining_existing_cluster(config: RayConfig) -> bool:
    return bool(config.address or os.environ.get("RAY_ADDRESS"))


def local_system_config(config: RayConfig) -> dict[str, int] | None:
    """Ray system settings for a local cluster (``ray.init`` or ``ray start --system-config``)."""
    if config.warm_workers is None:
        return None
    return {"num_workers_soft_limit": config.warm_workers}


def init_ray(config: RayConfig) -> None:
    """Join the cluster a job was submitted to, or start a local one with its state under
    ``config.state_dir`` that is a worker node too (it grants ``ray.worker_resource``).
    Idempotent within a process."""
    import ray

    from mmrad.placement import local_resources

    if ray.is_initialized():
        return
    if joining_existing_cluster(config):
        ray.init(address=config.address, log_to_driver=True, namespace=NAMESPACE)
        return
    env = ray_environment(Path(config.state_dir))
    os.environ.update(env)
    Path(env["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    ray.init(
        num_cpus=config.num_cpus,
        resources=local_resources(config),
        _node_ip_address="127.0.0.1",
        include_dashboard=config.dashboard,
        dashboard_host="127.0.0.1",
        _temp_dir=env["RAY_TMPDIR"],
        _system_config=local_system_config(config),
        namespace=NAMESPACE,
    )
    log.info("started a local Ray with state in %s", env["RAY_TMPDIR"])
