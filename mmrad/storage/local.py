"""Local paths (and ``file://`` URIs): atomic writes, listings with the same spelling
:func:`~mmrad.storage.uris.absolute` gives."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pyarrow.fs as pafs

from mmrad.storage.errors import StorageError
from mmrad.storage.uris import local_path


@contextlib.contextmanager
def atomic_local_file(path: Path) -> Iterator[BinaryIO]:
    """A handle on a temp file beside ``path``: flushed to disk and renamed over ``path``
    when the block ends, removed when it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_local(path: Path, data: bytes) -> None:
    """Write to a temp file beside ``path``, flush to disk, then rename over it."""
    with atomic_local_file(path) as handle:
        handle.write(data)


class LocalBackend:
    """The local filesystem, through the same calls as the object stores."""

    def read(self, uri: str) -> bytes:
        try:
            return local_path(uri).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{uri}: no such file") from None
        except PermissionError:
            raise StorageError(f"{uri}: access denied") from None

    def write(self, uri: str, data: bytes) -> None:
        atomic_write_local(local_path(uri), data)

    def exists(self, uri: str) -> bool:
        return local_path(uri).exists()

    def list(self, prefix: str) -> list[str]:
        root = local_path(prefix)
        return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.exists() else []

    def versions(self, prefix: str) -> dict[str, list]:
        found = {}
        for uri in self.list(prefix):
            stat = Path(uri).stat()
            found[uri] = [stat.st_size, stat.st_mtime_ns]
        return found

    def delete(self, uri: str) -> None:
        local_path(uri).unlink(missing_ok=True)

    def ensure_bucket(self, uri: str) -> None:
        """Nothing to create: folders are made by the writes below them."""

    def download_file(self, uri: str, destination: Path) -> None:
        try:
            shutil.copyfile(local_path(uri), destination)
        except FileNotFoundError:
            raise StorageError(f"{uri}: no such file") from None

    def upload_file(self, path: Path, uri: str) -> None:
        with atomic_local_file(local_path(uri)) as handle, open(path, "rb") as source:
            shutil.copyfileobj(source, handle)

    def arrow(self, uri: str) -> tuple[pafs.FileSystem, str]:
        return pafs.LocalFileSystem(), str(local_path(uri).absolute())
