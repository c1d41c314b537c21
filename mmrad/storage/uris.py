"""Which store a URI names, and path arithmetic that works for every one of them.

A URI without a scheme (or with ``file://``) is a local path; ``s3://`` goes to S3
through boto3 (:mod:`mmrad.storage.s3`); ``gs://``, ``abfs://``, ``abfss://``,
``hdfs://`` and ``viewfs://`` go through pyarrow's filesystems
(:mod:`mmrad.storage.arrow`). Any other scheme is refused by name
(:func:`unknown_scheme`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlparse

from mmrad.storage.errors import StorageError, UnsafeKey

FILE_SCHEME = "file://"
S3_SCHEME = "s3://"
GCS_SCHEMES = ("gs", "gcs")
AZURE_SCHEMES = ("abfs", "abfss")
HADOOP_SCHEMES = ("hdfs", "viewfs")
ARROW_SCHEMES = (*GCS_SCHEMES, *AZURE_SCHEMES, *HADOOP_SCHEMES)
KNOWN_SCHEMES = ("file", "s3", *ARROW_SCHEMES)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme_of(uri: str) -> str:
    """``"s3"``, ``"gs"``, ``"abfs"``, ``"file"`` ... (lower case), ``""`` for a plain path."""
    found = _SCHEME.match(uri)
    return found.group(1).lower() if found else ""


def is_remote(uri: str) -> bool:
    """An object-store URI (any scheme but ``file://``), as opposed to a local path: the
    node cache downloads from it, exports and run folders upload to it."""
    return scheme_of(uri) not in ("", "file")


def is_s3(uri: str) -> bool:
    return scheme_of(uri) == "s3"


def unknown_scheme(uri: str) -> StorageError:
    known = ", ".join(f"{scheme}://" for scheme in KNOWN_SCHEMES)
    return StorageError(
        f"{uri}: unknown storage scheme {scheme_of(uri)!r} (mmrad reads local paths and {known})"
    )


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → ``("bucket", "a/b")``."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"{uri}: not an s3://bucket/key URI")
    return parsed.netloc, parsed.path.lstrip("/")


def local_path(uri: str) -> Path:
    return Path(uri[len(FILE_SCHEME) :] if uri.startswith(FILE_SCHEME) else uri)


def local_target(prefix: str, uri: str, local_dir: str | Path) -> Path:
    """Where the object ``uri``, listed below ``prefix``, goes in ``local_dir``: its key
    below the prefix, split on ``/``, becomes the path below ``local_dir``. Every place
    that turns listed keys into local files goes through here. A key whose part below the
    prefix is absolute (starts with ``/``), has an empty (``a//b``), ``.`` or ``..``
    segment, or a NUL byte could land outside ``local_dir`` (or two keys on one file):
    :class:`~mmrad.storage.errors.UnsafeKey` naming the key and the prefix."""
    base = prefix.rstrip("/")
    if not uri.startswith(base + "/"):
        raise UnsafeKey(f"object {uri!r} is not below the prefix {prefix!r}")
    relative = uri[len(base) + 1 :]
    why = _unsafe_reason(relative)
    if why:
        raise UnsafeKey(
            f"object key {uri!r} below the prefix {prefix!r}: {why}; refusing to map it "
            f"to a local path under {str(local_dir)!r}"
        )
    root = os.path.normpath(os.path.abspath(local_dir))
    target = os.path.normpath(os.path.join(root, *relative.split("/")))
    if not target.startswith(root + os.sep):  # unreachable after the checks; kept as a guard
        raise UnsafeKey(f"object key {uri!r} below the prefix {prefix!r}: lands outside {root!r}")
    return Path(local_dir) / relative


def _unsafe_reason(relative: str) -> str | None:
    if not relative:
        return "no name below the prefix"
    if relative.startswith("/"):
        return "an absolute path (a leading '/')"
    if "\0" in relative:
        return "a NUL byte"
    parts = relative.split("/")
    if "" in parts:
        return "an empty path segment ('//' or a trailing '/')"
    if ".." in parts:
        return "a '..' segment"
    if "." in parts:
        return "a '.' segment"
    return None


def join(base: str, *parts: str) -> str:
    """Join URI parts with ``/`` (works for object keys and local paths alike)."""
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
    membership compare as they should. Object-store URIs are returned as they are (``//``
    and ``.`` are part of an object key)."""
    if is_remote(uri):
        return uri
    return os.path.normpath(local_path(uri).absolute())


def resolve(base_dir: str, uri: str) -> str:
    """A manifest URI: scheme-less ones are relative to ``base_dir`` (the manifest's folder)."""
    if scheme_of(uri) or os.path.isabs(uri):
        return uri
    return join(base_dir, uri)
