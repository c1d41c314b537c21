"""Storage errors, which faults are transient, and the one retry loop every remote
store's calls go through (boto3's for ``s3://``, pyarrow's for the others)."""

from __future__ import annotations

import itertools
import logging
import random
import re
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
                   "Throttling", "500", "502", "503", "504"}  # fmt: skip
FIRST_DELAY_S, MAX_DELAY_S = 0.5, 10.0
ARROW_TRANSIENT = re.compile(
    # google-cloud-cpp (GCS) statuses of faults its own retries did not outlast
    r"\b(?:UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED)\b|Status\(INTERNAL\b"
    # the Azure SDK: 408, 429 and 5xx answers (ServerBusy, InternalError, OperationTimedOut)
    r"|Azure Error: \[[^\]]*\] (?:408|429|5\d\d)\b"
    # transport faults (curl, the Azure SDK's HTTP client)
    r"|Could not connect|Couldn't connect|Fail to get a new connection|Connection reset"
    r"|Connection refused|Timeout was reached|Failure when receiving data|Recv failure"
    r"|Send failure|transfer closed",
    re.IGNORECASE,
)
MESSAGE_LIMIT = 300

log = logging.getLogger(__name__)
T = TypeVar("T")


class StorageError(OSError):
    """An object could not be read or written; the message names the URI."""


class ObjectMissing(StorageError):
    """No such bucket or object (permanent)."""


class AccessDenied(StorageError):
    """The credentials may not do this (permanent)."""


class UnsafeKey(StorageError):
    """An object's key cannot be a local path below the download folder (a ``..``, ``.``
    or empty segment, or an absolute path): refused, nothing written (permanent)."""


class StorageUnavailable(StorageError):
    """Object storage stayed unreachable for the whole outage budget."""


def is_transient(err: Exception) -> bool:
    """A fault that retrying can outlast: a connection reset or timeout, a body cut off,
    a 5xx, SlowDown or throttling answer (botocore's errors and pyarrow's alike)."""
    if isinstance(err, FileNotFoundError | PermissionError | StorageError):
        return False
    if isinstance(err, TimeoutError | ConnectionError):
        return True
    return _is_transient_boto(err) or (isinstance(err, OSError) and _is_transient_arrow(err))


def _is_transient_boto(err: Exception) -> bool:
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


def _is_transient_arrow(err: OSError) -> bool:
    return bool(ARROW_TRANSIENT.search(str(err)))


def backoff_delays() -> Iterator[float]:
    """Exponential backoff with jitter: ``0.5 s, 1 s, 2 s ...`` at most 10 s. The jitter
    has its own generator: a retry must not move the global ``random`` state, which
    checkpoints keep and resumed runs compare."""
    jitter = random.Random()
    ceiling = FIRST_DELAY_S
    while True:
        yield jitter.uniform(ceiling / 2, ceiling)
        ceiling = min(2 * ceiling, MAX_DELAY_S)


def call_with_retries(
    uri: str,
    call: Callable[[], T],
    outage_timeout_s: float,
    error_for: Callable[[str, Exception], StorageError],
) -> T:
    """``call()`` until it succeeds, retrying transient faults with backoff for up to
    ``outage_timeout_s`` (then :class:`StorageUnavailable`); a permanent error raises at
    once as ``error_for(uri, err)``, which names ``uri``."""
    deadline = time.monotonic() + outage_timeout_s
    delays = backoff_delays()
    for attempt in itertools.count(1):
        try:
            return call()
        except Exception as err:
            if not is_transient(err):
                raise error_for(uri, err) from None
            delay = next(delays)
            if time.monotonic() + delay > deadline:
                raise StorageUnavailable(
                    f"{uri}: object storage unreachable for {outage_timeout_s:.0f} s "
                    f"({attempt} tries; storage.outage_timeout_s); last error: "
                    f"{type(err).__name__}: {first_line(err)}"
                ) from None
            log.warning("%s: %s; retrying in %.1f s", uri, type(err).__name__, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def first_line(err: BaseException) -> str:
    """The first line of an error's text, cut to :data:`MESSAGE_LIMIT` characters (some
    clients' messages run to many lines: a JVM search path, an HTTP dump)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return text if len(text) <= MESSAGE_LIMIT else text[:MESSAGE_LIMIT] + " ..."
