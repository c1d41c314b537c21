"""Every object store besides S3, through one implementation on pyarrow's filesystems
(:mod:`mmrad.storage.arrow_fs` finds a URI's filesystem): ``gs://``, ``abfs[s]://``,
``hdfs://`` and ``viewfs://``.

Each call runs in the same transient-retry loop as S3's
(:func:`~mmrad.storage.errors.call_with_retries`) around the client's own retries, and
its errors become the same classes. The node cache's fingerprint of an object is its
size, modification time and the service's own tag (``ETag`` on Azure, ``etag`` on GCS,
which change with every write), read from the object's metadata, its body unread.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pyarrow.fs as pafs

from mmrad.storage.arrow_fs import (
    AZURE_KEY_VARIABLE,
    AZURE_SAS_VARIABLE,
    SERVICES,
    ArrowLocation,
    locate,
)
from mmrad.storage.errors import (
    AccessDenied,
    ObjectMissing,
    StorageError,
    call_with_retries,
    first_line,
)
from mmrad.storage.uris import scheme_of

if TYPE_CHECKING:
    from mmrad.storage.core import Storage

CONTENT_TAG_KEYS = ("ETag", "etag", "generation")
CREDENTIAL_HINTS = {
    "Google Cloud Storage": "Google credentials: GOOGLE_APPLICATION_CREDENTIALS or the "
    "metadata server, or storage.gcs.anonymous",
    "Azure Blob Storage": f"Azure credentials: {AZURE_KEY_VARIABLE}, {AZURE_SAS_VARIABLE} or "
    "Azure's default credential",
    "HDFS": "HDFS user and Kerberos ticket",
}
MISSING = re.compile(r"ContainerNotFound|BlobNotFound|PathNotFound|\bNOT_FOUND\b")
MISSING_BUCKET = re.compile(r"ContainerNotFound|bucket does not exist", re.IGNORECASE)
DENIED = re.compile(
    r"PERMISSION_DENIED|UNAUTHENTICATED|AuthorizationFailure|AuthenticationFailed"
    r"|AuthorizationPermissionMismatch|InvalidAuthenticationInfo|\] 403\b"
)
CHUNK_BYTES = 8 << 20

T = TypeVar("T")
log = logging.getLogger(__name__)


def arrow_error_for(uri: str, err: Exception) -> StorageError:
    """Translate a pyarrow error into one that says what is wrong with which URI."""
    text = str(err)
    if isinstance(err, FileNotFoundError) or MISSING.search(text):
        what = "bucket does not exist" if MISSING_BUCKET.search(text) else "no such object"
        return ObjectMissing(f"{uri}: {what}")
    if isinstance(err, PermissionError) or DENIED.search(text):
        hint = CREDENTIAL_HINTS.get(SERVICES.get(scheme_of(uri), ""), "credentials")
        return AccessDenied(f"{uri}: access denied (check the {hint} and permissions)")
    if "missing project id" in text:
        return StorageError(f"{uri}: creating a bucket needs a project: set storage.gcs.project_id")
    return StorageError(f"{uri}: {type(err).__name__}: {first_line(err)}")


@dataclass(frozen=True)
class ArrowBackend:
    """Objects at ``gs://``, ``abfs[s]://``, ``hdfs://`` and ``viewfs://`` URIs."""

    storage: Storage

    def _call(self, uri: str, call: Callable[[ArrowLocation], T]) -> T:
        where = locate(uri, self.storage)
        return call_with_retries(uri, lambda: call(where), self.storage.outage_timeout_s,
                                 arrow_error_for)  # fmt: skip

    def read(self, uri: str) -> bytes:
        def read(where: ArrowLocation) -> bytes:
            with where.filesystem.open_input_stream(where.path, compression=None) as stream:
                return stream.read()

        return self._call(uri, read)

    def write(self, uri: str, data: bytes) -> None:
        """Atomic: the object appears whole when the stream closes (a GCS upload is
        finalized, an Azure block list committed), never in part."""

        def write(where: ArrowLocation) -> None:
            with where.filesystem.open_output_stream(where.path, compression=None) as stream:
                stream.write(data)

        self._call(uri, write)

    def exists(self, uri: str) -> bool:
        def exists(where: ArrowLocation) -> bool:
            return where.filesystem.get_file_info(where.path).type == pafs.FileType.File

        return self._call(uri, exists)

    def _files(self, prefix: str) -> dict[str, pafs.FileInfo]:
        """``{uri: info}`` of every file below ``prefix`` (a folder), spelled from
        ``prefix`` as written."""
        locate(prefix, self.storage)  # a malformed URI fails before its spelling is cut
        base = prefix.rstrip("/")

        def listing(where: ArrowLocation) -> dict[str, pafs.FileInfo]:
            selector = pafs.FileSelector(where.path, recursive=True, allow_not_found=True)
            found = {}
            for info in where.filesystem.get_file_info(selector):
                relative = info.path[len(where.path) :].lstrip("/")
                if info.type == pafs.FileType.File and relative:
                    found[f"{base}/{relative}"] = info
            return found

        return self._call(base, listing)

    def list(self, prefix: str) -> list[str]:
        return sorted(self._files(prefix))

    def versions(self, prefix: str) -> dict[str, list]:
        """``{uri: [size, mtime ns, service tag]}``: the tag read from the object's
        metadata (one request per object, its body unread)."""
        return {uri: [info.size, info.mtime_ns, self._content_tag(uri)]
                for uri, info in self._files(prefix).items()}  # fmt: skip

    def _content_tag(self, uri: str) -> str:
        def tag(where: ArrowLocation) -> str:
            with where.filesystem.open_input_file(where.path) as handle:
                metadata = handle.metadata()
            return next((metadata[key].decode() for key in CONTENT_TAG_KEYS if key in metadata), "")

        return self._call(uri, tag)

    def delete(self, uri: str) -> None:
        def delete(where: ArrowLocation) -> None:
            # As on S3, what is not there is no error. Looked up first: pyarrow's Azure
            # client retries the delete of a missing blob for seconds before it says so.
            if where.filesystem.get_file_info(where.path).type == pafs.FileType.NotFound:
                return
            with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                where.filesystem.delete_file(where.path)

        self._call(uri, delete)

    def ensure_bucket(self, uri: str) -> None:
        """Create the bucket (container) if it is missing; HDFS has none. Credentials
        that may write objects but not look up buckets go on: the writes will tell."""

        def ensure(where: ArrowLocation) -> None:
            if where.bucket is None:
                return
            if where.filesystem.get_file_info(where.bucket).type == pafs.FileType.NotFound:
                where.filesystem.create_dir(where.bucket)

        try:
            self._call(uri, ensure)
        except AccessDenied as err:
            log.warning("%s; not creating the bucket", err)

    def download_file(self, uri: str, destination: Path) -> None:
        """Streamed in chunks; a try cut off starts the file again."""

        def download(where: ArrowLocation) -> None:
            with (
                where.filesystem.open_input_stream(where.path, compression=None) as stream,
                open(destination, "wb") as out,
            ):
                shutil.copyfileobj(stream, out, CHUNK_BYTES)

        self._call(uri, download)

    def upload_file(self, path: Path, uri: str) -> None:
        """Streamed in chunks; the object appears whole when the stream closes."""

        def upload(where: ArrowLocation) -> None:
            with (
                open(path, "rb") as source,
                where.filesystem.open_output_stream(where.path, compression=None) as stream,
            ):
                shutil.copyfileobj(source, stream, CHUNK_BYTES)

        self._call(uri, upload)

    def arrow(self, uri: str) -> tuple[pafs.FileSystem, str]:
        where = locate(uri, self.storage, retried_outside=False)
        return where.filesystem, where.path
