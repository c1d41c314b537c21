"""One way to read and write local paths and ``s3://`` URIs.

Credentials come from the standard AWS chain (environment, shared files, instance
profile) and are never read, printed or logged here. The endpoint comes from
``storage.endpoint_url`` or ``AWS_ENDPOINT_URL``; Arrow's own environment support is
patchy, so Arrow filesystems are always built here and passed explicitly.
Transient S3 errors (connection resets, timeouts, a body cut off mid-read, 5xx and
SlowDown answers) are retried with backoff: each call by botocore's standard strategy,
and reads, writes and existence checks again around it, body included, for up to
``outage_timeout_s``; then :class:`StorageUnavailable`. Permanent errors raise at once:
:class:`ObjectMissing` (no such bucket or key), :class:`AccessDenied`; each names the URI.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

S3_SCHEME = "s3://"
FILE_SCHEME = "file://"
TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
                   "Throttling", "500", "502", "503", "504"}  # fmt: skip
FIRST_DELAY_S, MAX_DELAY_S = 0.5, 10.0

log = logging.getLogger(__name__)


class StorageError(OSError):
    """An object could not be read or written; the message names the URI."""


class ObjectMissing(StorageError):
    """No such bucket or object (permanent)."""


class AccessDenied(StorageError):
    """The credentials may not do this (permanent)."""


class StorageUnavailable(StorageError):
    """Object storage stayed unreachable for the whole outage budget."""


def is_transient(err: Exception) -> bool:
    """A fault that retrying can outlast: a connection reset or timeout, a body cut off,
    a 5xx or SlowDown answer."""
    from botocore.exceptions import (
        ClientError,
        FlexibleChecksumError,
        HTTPClientError,
        IncompleteReadError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError

    cut_off = (IncompleteReadError, FlexibleChecksumError)  # a body shorter or garbled
    if isinstance(err, (HTTPClientError, BotoConnectionError, *cut_off)):
        return True
    if isinstance(err, ClientError):
        error = err.response.get("Error", {})
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return str(error.get("Code", "")) in TRANSIENT_CODES or int(status) >= 500
    return False


def backoff_delays() -> Iterator[float]:
    """Exponential backoff with jitter: ``0.5 s, 1 s, 2 s ...`` at most 10 s. The jitter
    has its own generator: a retry must not move the global ``random`` state, which
    checkpoints keep and resumed runs compare."""
    jitter = random.Random()
    ceiling = FIRST_DELAY_S
    while True:
        yield jitter.uniform(ceiling / 2, ceiling)
        ceiling = min(2 * ceiling, MAX_DELAY_S)


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → ``("bucket", "a/b")``."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"{uri}: not an s3://bucket/key URI")
    return parsed.netloc, parsed.path.lstrip("/")


def local_path(uri: str) -> Path:
    return Path(uri[len(FILE_SCHEME) :] if uri.startswith(FILE_SCHEME) else uri)


def join(base: str, *parts: str) -> str:
    """Join URI parts with ``/`` (works for S3 keys and local paths alike)."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri.rstrip("/") else "."


def absolute(uri: str) -> str:
    """A local path made absolute (Ray workers do not share the driver's working
    directory) and normalized (``a/./b//c/`` -> ``<cwd>/a/b/c``, ``..`` resolved by name):
    :meth:`Storage.list` spells the files below it the same way, so prefixes and
    membership compare as they should. ``s3://`` URIs are returned as they are (``//``
    and ``.`` are part of an S3 key)."""
    if is_s3(uri):
        return uri
    return os.path.normpath(local_path(uri).absolute())


def resolve(base_dir: str, uri: str) -> str:
    """A manifest URI: scheme-less ones are relative to ``base_dir`` (the manifest's folder)."""
    if is_s3(uri) or uri.startswith(FILE_SCHEME) or os.path.isabs(uri):
        return uri
    return join(base_dir, uri)


def _error_for(uri: str, err: Exception) -> StorageError:
    """Translate a botocore/Arrow error into one that says what is wrong with which URI."""
    code = ""
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
    text = f"{code} {err}"
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return ObjectMissing(f"{uri}: bucket does not exist")
    if code in {"NoSuchKey", "404"} or "NoSuchKey" in text or "Path does not exist" in text:
        return ObjectMissing(f"{uri}: no such object")
    if any(c in text for c in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")):
        return AccessDenied(f"{uri}: access denied (check the AWS credentials and permissions)")
    if code in {"403"}:
        return AccessDenied(f"{uri}: access denied (check the AWS credentials and permissions)")
    return StorageError(f"{uri}: {type(err).__name__}: {err}")


def _credential_fingerprint() -> str:
    """Changes when the credentials in the environment change, so a cached client is not
    reused with stale ones. A one-way hash: the secret itself is never kept or shown."""
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    joined = "\0".join(os.environ.get(name, "") for name in names)
    return hashlib.sha256(joined.encode()).hexdigest()


@functools.lru_cache(maxsize=8)
def _s3_client(endpoint_url: str | None, region: str | None, max_attempts: int, _fingerprint: str):
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": max_attempts, "mode": "standard"})
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, region_name=region, config=config
    )


@dataclass(frozen=True)
class Storage:
    """Read/write bytes at local paths and ``s3://`` URIs. Cheap to copy into Ray tasks."""

    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int = 5
    outage_timeout_s: float = 300.0

    @classmethod
    def from_config(cls, config) -> Storage:
        return cls(config.endpoint_url, config.region, config.max_attempts,
                   config.outage_timeout_s)  # fmt: skip

    @property
    def endpoint(self) -> str | None:
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None

    @property
    def s3(self):
        return _s3_client(self.endpoint, self.region, self.max_attempts, _credential_fingerprint())

    # -- bytes ---------------------------------------------------------------------------

    def _s3_call(self, uri: str, call: Callable[[], object]) -> object:
        """``call()`` until it succeeds, retrying transient faults with backoff for up to
        ``outage_timeout_s``; a permanent error raises at once (named for ``uri``)."""
        deadline = time.monotonic() + self.outage_timeout_s
        delays = backoff_delays()
        for attempt in itertools.count(1):
            try:
                return call()
            except Exception as err:
                if not is_transient(err):
                    raise _error_for(uri, err) from None
                delay = next(delays)
                if time.monotonic() + delay > deadline:
                    raise StorageUnavailable(
                        f"{uri}: object storage unreachable for {self.outage_timeout_s:.0f} s "
                        f"({attempt} tries; storage.outage_timeout_s); last error: "
                        f"{type(err).__name__}: {err}"
                    ) from None
                log.warning("%s: %s; retrying in %.1f s", uri, type(err).__name__, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def read_bytes(self, uri: str) -> bytes:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            return self._s3_call(
                uri, lambda: self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            )
        try:
            return local_path(uri).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{uri}: no such file") from None
        except PermissionError:
            raise StorageError(f"{uri}: access denied") from None

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Atomic: readers see the old object or the whole new one, never a part."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            self._s3_call(uri, lambda: self.s3.put_object(Bucket=bucket, Key=key, Body=data))
            return
        atomic_write_local(local_path(uri), data)

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def exists(self, uri: str) -> bool:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                self._s3_call(uri, lambda: self.s3.head_object(Bucket=bucket, Key=key))
                return True
            except ObjectMissing as error:
                if "no such object" in str(error):
                    return False
                raise
        return local_path(uri).exists()

    def list(self, prefix: str) -> list[str]:
        """Every object (file) below ``prefix``, as full URIs, sorted."""
        if is_s3(prefix):
            bucket, key = split_s3(prefix)
            key = key.rstrip("/") + "/" if key else ""
            found = []
            try:
                pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
                for page in pages:  # keys ending in "/" are folder markers (pyarrow's), no files
                    found.extend(
                        f"s3://{bucket}/{obj['Key']}"
                        for obj in page.get("Contents", [])
                        if not obj["Key"].endswith("/")
                    )
            except Exception as err:
                raise _error_for(prefix, err) from None
            return sorted(found)
        root = local_path(prefix)
        return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.exists() else []

    def delete(self, uri: str) -> None:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                self.s3.delete_object(Bucket=bucket, Key=key)
            except Exception as err:
                raise _error_for(uri, err) from None
            return
        local_path(uri).unlink(missing_ok=True)

    def ensure_bucket(self, uri: str) -> None:
        """Create the bucket of an ``s3://`` URI if it is missing (local S3 servers, tests)."""
        bucket, _ = split_s3(uri)
        try:
            self.s3.head_bucket(Bucket=bucket)
        except Exception:
            try:
                self.s3.create_bucket(Bucket=bucket)
            except Exception as err:
                raise _error_for(uri, err) from None

    # -- folders -------------------------------------------------------------------------

    def upload_dir(self, local_dir: str | Path, uri: str) -> None:
        local_dir = Path(local_dir)
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            self.write_bytes(join(uri, path.relative_to(local_dir).as_posix()), path.read_bytes())

    def download_dir(self, uri: str, local_dir: str | Path) -> Path:
        local_dir = Path(local_dir)
        base = uri.rstrip("/")
        for item in self.list(base):
            relative = item[len(base) :].lstrip("/")
            atomic_write_local(local_dir / relative, self.read_bytes(item))
        return local_dir

    # -- Arrow ---------------------------------------------------------------------------

    def arrow_filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """``(filesystem, path)`` for pyarrow, Ray Data and Ray Train (``storage_filesystem``)."""
        if not is_s3(uri):
            return pafs.LocalFileSystem(), str(local_path(uri).absolute())
        bucket, key = split_s3(uri)
        return self.arrow_s3(), f"{bucket}/{key}".rstrip("/")

    def arrow_s3(self) -> pafs.S3FileSystem:
        kwargs: dict = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(self.max_attempts)}
        if self.region:
            kwargs["region"] = self.region
        if self.endpoint:
            parsed = urlparse(self.endpoint)
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
            kwargs.setdefault("region", "us-east-1")
        return pafs.S3FileSystem(**kwargs)


def atomic_write_local(path: Path, data: bytes) -> None:
    """Write to a temp file beside ``path``, flush to disk, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
