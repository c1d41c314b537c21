""":class:`Storage`: one set of calls for local paths and every object store, each URI
handed to the backend of its scheme (:func:`~mmrad.storage.uris.scheme_of`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pyarrow.fs as pafs

from mmrad.storage.arrow import ArrowBackend
from mmrad.storage.arrow_fs import AzureSettings, GcsSettings
from mmrad.storage.local import LocalBackend, atomic_write_local
from mmrad.storage.s3 import S3Backend
from mmrad.storage.uris import ARROW_SCHEMES, join, local_target, scheme_of, unknown_scheme


class Backend(Protocol):
    """What each store does; :class:`Storage` documents the calls."""

    def read(self, uri: str) -> bytes: ...
    def write(self, uri: str, data: bytes) -> None: ...
    def exists(self, uri: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def versions(self, prefix: str) -> dict[str, list]: ...
    def delete(self, uri: str) -> None: ...
    def ensure_bucket(self, uri: str) -> None: ...
    def download_file(self, uri: str, destination: Path) -> None: ...
    def upload_file(self, path: Path, uri: str) -> None: ...
    def arrow(self, uri: str) -> tuple[pafs.FileSystem, str]: ...


@dataclass(frozen=True)
class Storage:
    """Read/write bytes at local paths and object-store URIs. Settings only (clients and
    filesystems are made once per process), so it is cheap to copy into Ray tasks and
    hashable (a cache key)."""

    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int = 5
    outage_timeout_s: float = 300.0
    gcs: GcsSettings = field(default_factory=GcsSettings)
    azure: AzureSettings = field(default_factory=AzureSettings)

    @classmethod
    def from_config(cls, config) -> Storage:
        return cls(config.endpoint_url, config.region, config.max_attempts,
                   config.outage_timeout_s, GcsSettings(**config.gcs.model_dump()),
                   AzureSettings(**config.azure.model_dump()))  # fmt: skip

    def backend(self, uri: str) -> Backend:
        scheme = scheme_of(uri)
        if scheme in ("", "file"):
            return LocalBackend()
        if scheme == "s3":
            return S3Backend(self)
        if scheme in ARROW_SCHEMES:
            return ArrowBackend(self)
        raise unknown_scheme(uri)

    # -- S3 (its client, for S3-only tools) ----------------------------------------------

    @property
    def endpoint(self) -> str | None:
        """The S3 endpoint: ``endpoint_url``, else ``$AWS_ENDPOINT_URL``, else AWS's own."""
        return S3Backend(self).endpoint

    @property
    def s3(self):
        return S3Backend(self).client

    def arrow_s3(self) -> pafs.S3FileSystem:
        return S3Backend(self).arrow_s3()

    # -- bytes ---------------------------------------------------------------------------

    def read_bytes(self, uri: str) -> bytes:
        return self.backend(uri).read(uri)

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Atomic: readers see the old object or the whole new one, never a part."""
        self.backend(uri).write(uri, data)

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def exists(self, uri: str) -> bool:
        """Whether the object (a file) is there; a missing bucket is an error."""
        return self.backend(uri).exists(uri)

    def list(self, prefix: str) -> list[str]:
        """Every object (file) below ``prefix``, as full URIs, sorted. Folder markers
        (empty ``dir/`` objects that pyarrow and Ray Train make) are no files."""
        return self.backend(prefix).list(prefix)

    def versions(self, prefix: str) -> dict[str, list]:
        """``{uri: fingerprint}`` of every object below ``prefix``: what changes when an
        object is rewritten (S3: size and ETag; GCS, Azure: size, modification time and
        the service's tag; HDFS and local files: size and modification time)."""
        return self.backend(prefix).versions(prefix)

    def delete(self, uri: str) -> None:
        """Remove the object; one that is not there is no error."""
        self.backend(uri).delete(uri)

    def ensure_bucket(self, uri: str) -> None:
        """Create the bucket (Azure: container) of ``uri`` if it is missing (local object
        stores, tests); nothing for local paths and HDFS."""
        self.backend(uri).ensure_bucket(uri)

    # -- files and folders ---------------------------------------------------------------

    def download_file(self, uri: str, destination: str | Path) -> None:
        """One object into a local file, streamed (never whole in memory)."""
        self.backend(uri).download_file(uri, Path(destination))

    def upload_file(self, path: str | Path, uri: str) -> None:
        """A local file to ``uri``, streamed (multi-part on S3); the object appears whole."""
        self.backend(uri).upload_file(Path(path), uri)

    def upload_dir(self, local_dir: str | Path, uri: str) -> None:
        local_dir = Path(local_dir)
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            self.write_bytes(join(uri, path.relative_to(local_dir).as_posix()), path.read_bytes())

    def download_dir(self, uri: str, local_dir: str | Path) -> Path:
        """Every object below ``uri`` into ``local_dir`` (each file written atomically).
        Every key is checked first (:func:`~mmrad.storage.uris.local_target`): one that
        would land outside ``local_dir`` refuses the whole download before a file is
        written."""
        local_dir = Path(local_dir)
        base = uri.rstrip("/")
        targets = [(item, local_target(base, item, local_dir)) for item in self.list(base)]
        for item, target in targets:
            atomic_write_local(target, self.read_bytes(item))
        return local_dir

    # -- Arrow ---------------------------------------------------------------------------

    def arrow_filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """``(filesystem, path)`` for pyarrow, Ray Data and Ray Train (``storage_filesystem``)."""
        return self.backend(uri).arrow(uri)
