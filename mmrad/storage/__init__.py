"""One way to read and write local paths and object-store URIs.

- :mod:`~mmrad.storage.uris`: which store a URI names (``s3://``, ``gs://``,
  ``abfs[s]://``, ``hdfs://``, ``viewfs://``, ``file://`` or a plain path) and path
  arithmetic for all of them;
- :mod:`~mmrad.storage.core`: :class:`Storage`, the calls every job uses;
- :mod:`~mmrad.storage.s3`: ``s3://`` through boto3;
- :mod:`~mmrad.storage.arrow`: every other store through pyarrow's filesystems, which
  :mod:`~mmrad.storage.arrow_fs` makes from a URI and the settings;
- :mod:`~mmrad.storage.local`: local files, written atomically;
- :mod:`~mmrad.storage.errors`: the error classes and the one transient-retry loop;
- :mod:`~mmrad.storage.credentials`: noticing changed credentials without keeping them.

Credentials come from each service's standard chain and are never logged. Transient
faults (connection resets, timeouts, a body cut off, 5xx, SlowDown and throttling
answers) are retried with backoff for up to ``storage.outage_timeout_s``, then
:class:`StorageUnavailable`. Permanent errors raise at once: :class:`ObjectMissing` (no
such bucket or object), :class:`AccessDenied`, :class:`UnsafeKey` (a listed key that
cannot be a local path below the download folder: :func:`local_target`), or
:class:`StorageError` (an unknown scheme, a filesystem not installed, a malformed URI);
each names the URI.
"""

from mmrad.storage.arrow_fs import AzureSettings, GcsSettings
from mmrad.storage.core import Storage
from mmrad.storage.errors import (
    AccessDenied,
    ObjectMissing,
    StorageError,
    StorageUnavailable,
    UnsafeKey,
    backoff_delays,
    is_transient,
)
from mmrad.storage.local import atomic_write_local
from mmrad.storage.uris import (
    FILE_SCHEME,
    S3_SCHEME,
    absolute,
    is_remote,
    is_s3,
    join,
    local_path,
    local_target,
    parent,
    resolve,
    scheme_of,
    split_s3,
)

__all__ = [
    "FILE_SCHEME", "S3_SCHEME", "AccessDenied", "AzureSettings", "GcsSettings",
    "ObjectMissing", "Storage", "StorageError", "StorageUnavailable", "UnsafeKey", "absolute",
    "atomic_write_local", "backoff_delays", "is_remote", "is_s3", "is_transient", "join",
    "local_path", "local_target", "parent", "resolve", "scheme_of", "split_s3",
]  # fmt: skip
