"""Object storage faults through a chaos proxy in front of the session's real S3 server
(SeaweedFS): transient ones are retried with backoff, bodies included, and outlasted;
permanent ones fail at once; an outage longer than ``outage_timeout_s`` fails with a
clear message. Each test checks that its faults were injected."""

from __future__ import annotations

import random
from urllib.parse import urlparse

import numpy as np
import pytest

from mmrad.config import PixelBudget
from mmrad.data.loading import DecodeSpec, _fetch_and_decode
from mmrad.storage import ObjectMissing, Storage, StorageUnavailable
from tests.conftest import TEST_BUCKET
from tests.helpers.chaos import ChaosProxy

pytestmark = pytest.mark.integration
PAYLOAD = bytes(range(256)) * 4096  # 1 MiB: a body long enough to be cut in the middle


@pytest.fixture(scope="module")
def proxy(s3_server):
    address = urlparse(s3_server.endpoint_url)
    chaos = ChaosProxy(address.hostname, address.port)
    yield chaos
    chaos.close()


def through(proxy: ChaosProxy, outage_timeout_s: float = 60.0) -> Storage:
    return Storage(endpoint_url=proxy.url, max_attempts=1, outage_timeout_s=outage_timeout_s)


def test_bodies_cut_off_and_slow_downs_are_retried_until_they_pass(proxy):
    uri = f"s3://{TEST_BUCKET}/faults/payload.bin"
    storage = through(proxy)
    before = proxy.injected.copy()
    state = random.getstate()
    storage.write_bytes(uri, PAYLOAD)
    assert storage.read_bytes(uri) == PAYLOAD
    assert random.getstate() == state  # calls never move the RNG that checkpoints keep
    proxy.reset_next(2)
    proxy.unavailable_next(2)
    assert storage.read_bytes(uri) == PAYLOAD
    injected = proxy.injected - before
    assert injected["reset"] == 2 and injected["unavailable"] == 2
    proxy.unavailable_next(1)
    storage.write_bytes(uri, PAYLOAD[::-1])  # a write retried after a SlowDown
    assert storage.read_bytes(uri) == PAYLOAD[::-1]


def test_a_missing_object_fails_at_once_without_retries(proxy):
    before = proxy.injected.copy()
    with pytest.raises(ObjectMissing, match="no such object"):
        through(proxy).read_bytes(f"s3://{TEST_BUCKET}/faults/never-written.bin")
    assert proxy.injected == before
    assert not through(proxy).exists(f"s3://{TEST_BUCKET}/faults/never-written.bin")


def test_a_short_outage_is_waited_out_and_a_long_one_fails_clearly(proxy):
    uri = f"s3://{TEST_BUCKET}/faults/outage.bin"
    storage = through(proxy, outage_timeout_s=30)
    storage.write_bytes(uri, b"still here")
    proxy.pause(2)
    assert storage.read_bytes(uri) == b"still here"
    assert proxy.injected["paused"] >= 1
    proxy.pause(3600)
    try:
        with pytest.raises(StorageUnavailable, match=r"unreachable for 3 s \(\d+ tries; "
                           r"storage.outage_timeout_s\)"):  # fmt: skip
            through(proxy, outage_timeout_s=3).read_bytes(uri)
    finally:
        proxy.pause(0)


def test_the_loader_skips_missing_images_but_fails_on_an_outage(proxy):
    spec = DecodeSpec(through(proxy, outage_timeout_s=2), PixelBudget())
    image, error = _fetch_and_decode(spec, f"s3://{TEST_BUCKET}/faults/no-image.png")
    assert "no such object" in error and isinstance(image, np.ndarray)
    proxy.pause(3600)
    try:
        with pytest.raises(StorageUnavailable):
            _fetch_and_decode(spec, f"s3://{TEST_BUCKET}/faults/no-image.png")
    finally:
        proxy.pause(0)
