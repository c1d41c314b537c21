"""Where a ``gs://``, ``abfs[s]://``, ``hdfs://`` or ``viewfs://`` URI lives: its
pyarrow filesystem (made once per process and settings) and its path there.

- ``gs://bucket/key``: :class:`pyarrow.fs.GcsFileSystem`; Google's default credentials
  (``GOOGLE_APPLICATION_CREDENTIALS``, the metadata server) unless
  ``storage.gcs.anonymous``; the endpoint from ``storage.gcs.endpoint_url``, else
  ``$STORAGE_EMULATOR_HOST`` (an emulator: no credentials), else Google's.
- ``abfs[s]://container/key`` (the account from ``storage.azure.account_name`` or
  ``$AZURE_STORAGE_ACCOUNT_NAME``) or ``abfs[s]://container@account.dfs.core.windows.net/key``:
  :class:`pyarrow.fs.AzureFileSystem`; the account key in ``$AZURE_STORAGE_ACCOUNT_KEY``
  or a SAS token in ``$AZURE_STORAGE_SAS_TOKEN`` when set, else Azure's default
  credential; the endpoint from ``storage.azure.endpoint_url`` (Azurite), else Azure's.
- ``hdfs://host:port/path``, ``viewfs://``: pyarrow's HadoopFileSystem, from the URI.

Secrets are read from the environment when a filesystem is made and never logged; a
change of them makes a new filesystem. A filesystem this pyarrow lacks (built without
GCS or Azure; HDFS without Java and libhdfs) is a :class:`StorageError` naming the URI,
the scheme and what to install.
"""

from __future__ import annotations

import datetime
import functools
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from mmrad.storage.credentials import credential_fingerprint
from mmrad.storage.errors import StorageError, first_line
from mmrad.storage.uris import AZURE_SCHEMES, GCS_SCHEMES, HADOOP_SCHEMES, scheme_of

if TYPE_CHECKING:
    from mmrad.storage.core import Storage

GCS_EMULATOR_VARIABLE = "STORAGE_EMULATOR_HOST"
AZURE_ACCOUNT_VARIABLE = "AZURE_STORAGE_ACCOUNT_NAME"
AZURE_KEY_VARIABLE = "AZURE_STORAGE_ACCOUNT_KEY"
AZURE_SAS_VARIABLE = "AZURE_STORAGE_SAS_TOKEN"
AZURE_HOST_SUFFIXES = (".dfs.core.windows.net", ".blob.core.windows.net")
CLIENT_RETRY_LIMIT_S = 2.0
"""At most this long inside the GCS client's own retries per call (its backoff starts at
1 s); the outer loop goes on for ``storage.outage_timeout_s``, as around botocore's."""
SERVICES = {**dict.fromkeys(GCS_SCHEMES, "Google Cloud Storage"),
            **dict.fromkeys(AZURE_SCHEMES, "Azure Blob Storage"),
            **dict.fromkeys(HADOOP_SCHEMES, "HDFS")}  # fmt: skip
INSTALL_HINTS = {
    "Google Cloud Storage": "install a pyarrow built with GCS support (PyPI's wheels are)",
    "Azure Blob Storage": "install a pyarrow built with Azure support (PyPI's wheels are)",
    "HDFS": "pyarrow's HadoopFileSystem needs a Java runtime and Hadoop's libhdfs on this "
    "node: install both and set JAVA_HOME, HADOOP_HOME and CLASSPATH=$(hadoop classpath --glob)",
}
NOT_INSTALLED = re.compile(
    r"libjvm|libhdfs|JAVA_HOME|CLASSPATH|compiled without|built without|support.*not enabled",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class GcsSettings:
    """``storage.gcs``: where Google Cloud Storage is and how to sign in."""

    endpoint_url: str | None = None
    anonymous: bool = False
    project_id: str | None = None


@dataclass(frozen=True)
class AzureSettings:
    """``storage.azure``: the account of ``abfs://container/key`` URIs and the endpoint."""

    account_name: str | None = None
    endpoint_url: str | None = None


@dataclass(frozen=True)
class ArrowLocation:
    """Where a URI lives: its filesystem, its path there, and its bucket (container;
    ``None`` on HDFS)."""

    filesystem: pafs.FileSystem
    path: str
    bucket: str | None


def _endpoint(url: str) -> tuple[str, str]:
    """``http://127.0.0.1:4443`` → ``("http", "127.0.0.1:4443")``; a bare ``host:port``
    is taken as http (an emulator)."""
    parsed = urlparse(url if "://" in url else f"http://{url}")
    return parsed.scheme, parsed.netloc


@functools.lru_cache(maxsize=16)
def _gcs_filesystem(settings: GcsSettings, emulator: str | None, retry_limit_s: float):
    endpoint = settings.endpoint_url or emulator
    kwargs: dict = {"retry_time_limit": datetime.timedelta(seconds=retry_limit_s)}
    if endpoint:
        kwargs["scheme"], kwargs["endpoint_override"] = _endpoint(endpoint)
    if settings.anonymous or (emulator and not settings.endpoint_url):
        kwargs["anonymous"] = True
    if settings.project_id:
        kwargs["project_id"] = settings.project_id
    return pafs.GcsFileSystem(**kwargs)


@functools.lru_cache(maxsize=16)
def _azure_filesystem(account: str, endpoint_url: str | None, _fingerprint: str):
    kwargs: dict = {"account_name": account}
    if endpoint_url:
        scheme, authority = _endpoint(endpoint_url)
        kwargs.update(blob_storage_authority=authority, dfs_storage_authority=authority,
                      blob_storage_scheme=scheme, dfs_storage_scheme=scheme)  # fmt: skip
    if os.environ.get(AZURE_KEY_VARIABLE):
        kwargs["account_key"] = os.environ[AZURE_KEY_VARIABLE]
    elif os.environ.get(AZURE_SAS_VARIABLE):
        kwargs["sas_token"] = os.environ[AZURE_SAS_VARIABLE]
    return pafs.AzureFileSystem(**kwargs)


@functools.lru_cache(maxsize=16)
def _hadoop_filesystem(root_uri: str):
    filesystem, _ = pafs.FileSystem.from_uri(root_uri)
    return filesystem


def locate(uri: str, storage: Storage, *, retried_outside: bool = True) -> ArrowLocation:
    """The filesystem and path of ``uri``, the filesystem built once per process and
    settings (:class:`StorageError` for a malformed URI or a filesystem not installed).
    ``retried_outside``: the caller wraps each call in mmrad's retry loop; a filesystem
    handed to Ray (checkpoints, Ray Data) is not, so its client retries for the whole
    ``storage.outage_timeout_s`` itself."""
    scheme = scheme_of(uri)
    parsed = urlparse(uri)
    try:
        if scheme in GCS_SCHEMES:
            bucket = _required_bucket(uri, parsed.netloc, "gs://bucket/key")
            retry_limit_s = storage.outage_timeout_s
            if retried_outside:
                retry_limit_s = min(retry_limit_s, CLIENT_RETRY_LIMIT_S)
            filesystem = _gcs_filesystem(storage.gcs, os.environ.get(GCS_EMULATOR_VARIABLE),
                                         retry_limit_s)  # fmt: skip
            return ArrowLocation(filesystem, _inside(bucket, parsed.path), bucket)
        if scheme in AZURE_SCHEMES:
            container, account = _azure_container_and_account(uri, parsed.netloc, storage.azure)
            fingerprint = credential_fingerprint((AZURE_KEY_VARIABLE, AZURE_SAS_VARIABLE))
            filesystem = _azure_filesystem(account, storage.azure.endpoint_url, fingerprint)
            return ArrowLocation(filesystem, _inside(container, parsed.path), container)
        if scheme in HADOOP_SCHEMES:
            filesystem = _hadoop_filesystem(f"{scheme}://{parsed.netloc}/")
            return ArrowLocation(filesystem, parsed.path.rstrip("/") or "/", None)
    except StorageError:
        raise
    except (ImportError, AttributeError, NotImplementedError, pa.ArrowException, OSError) as err:
        raise _unavailable(uri, scheme, err) from None
    raise AssertionError(f"{scheme} is no pyarrow scheme")


def _unavailable(uri: str, scheme: str, err: Exception) -> StorageError:
    """The filesystem of ``scheme`` could not be made: not installed (pyarrow built
    without it, no Java or libhdfs: what to install), or it could not connect."""
    service = SERVICES[scheme]
    cause = f"{type(err).__name__}: {first_line(err)}"
    missing = isinstance(err, ImportError | AttributeError | NotImplementedError)
    if missing or NOT_INSTALLED.search(str(err)):
        return StorageError(f"{uri}: the {scheme}:// filesystem ({service}) is not installed "
                            f"here: {INSTALL_HINTS[service]} ({cause})")  # fmt: skip
    return StorageError(f"{uri}: cannot open the {scheme}:// filesystem ({service}): {cause}")


def _required_bucket(uri: str, bucket: str, form: str) -> str:
    if not bucket:
        raise StorageError(f"{uri}: not a {form} URI")
    return bucket


def _inside(bucket: str, key: str) -> str:
    return f"{bucket}/{key.lstrip('/')}".rstrip("/")


def _azure_container_and_account(uri: str, netloc: str, settings: AzureSettings):
    """``container@account.dfs.core.windows.net`` names both; a bare ``container`` takes
    the account from ``storage.azure.account_name`` or ``$AZURE_STORAGE_ACCOUNT_NAME``."""
    container, _, host = netloc.partition("@")
    _required_bucket(uri, container, "abfs://container/key or abfs://container@account.dfs."
                     "core.windows.net/key")  # fmt: skip
    account = host.split(".", 1)[0] if host else None
    if host and not host.endswith(AZURE_HOST_SUFFIXES) and "." in host:
        raise StorageError(f"{uri}: {host} is no Azure storage host (want <account>"
                           f"{AZURE_HOST_SUFFIXES[0]})")  # fmt: skip
    account = account or settings.account_name or os.environ.get(AZURE_ACCOUNT_VARIABLE)
    if not account:
        raise StorageError(
            f"{uri}: which storage account? Write abfs://{container}@<account>"
            f"{AZURE_HOST_SUFFIXES[0]}/..., or set storage.azure.account_name or "
            f"${AZURE_ACCOUNT_VARIABLE}"
        )
    return container, account
