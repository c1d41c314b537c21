"""``gs://`` and ``abfs://`` through pyarrow's GCS and Azure filesystems, against local
emulators on 127.0.0.1 (fake-gcs-server, Azurite: see tests/helpers/cloud_emulators.py):
the same calls, errors, retries and node cache as ``s3://``, and a data set built there
and read back by the manifest reader and Ray Data. Unknown schemes and filesystems that
are not installed fail with errors that name the URI."""

from __future__ import annotations

import logging
import os
import uuid
from collections import Counter
from dataclasses import dataclass

import pytest

from mmrad.config import DataBuildConfig, PixelBudget, StorageConfig
from mmrad.data.build import build_dataset
from mmrad.data.loading import DecodeSpec, rank_datasets
from mmrad.data.manifest import read_manifest
from mmrad.model.loading import COMPLETE_MARKER, cached_model_dir, download_to_node_cache
from mmrad.storage import (
    AccessDenied,
    AzureSettings,
    GcsSettings,
    ObjectMissing,
    Storage,
    StorageError,
    StorageUnavailable,
    is_transient,
)
from tests.conftest import TEST_BUCKET
from tests.helpers.chaos import ChaosProxy
from tests.helpers.cloud_emulators import AZURITE_ACCOUNT, AZURITE_KEY

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Store:
    storage: Storage
    root: str
    """A fresh folder in the store's test bucket (container)."""


def gcs_storage(endpoint_url: str, **kwargs) -> Storage:
    settings = GcsSettings(endpoint_url=endpoint_url, anonymous=True, project_id="test")
    return Storage(gcs=settings, **kwargs)


def azure_storage(endpoint_url: str, **kwargs) -> Storage:
    return Storage(azure=AzureSettings(AZURITE_ACCOUNT, endpoint_url), **kwargs)


@pytest.fixture(scope="module", params=["gs", "abfs"])
def store(request) -> Store:
    if request.param == "gs":
        storage = gcs_storage(request.getfixturevalue("gcs_emulator").endpoint_url)
        bucket = f"gs://{TEST_BUCKET}"
    else:
        storage = azure_storage(request.getfixturevalue("azurite").endpoint_url)
        bucket = f"abfs://{TEST_BUCKET}"
    storage.ensure_bucket(bucket)
    storage.ensure_bucket(bucket)  # there already: nothing to do
    return Store(storage, f"{bucket}/{uuid.uuid4().hex[:8]}")


def test_round_trip_list_exists_delete(store):
    storage, base = store.storage, store.root
    storage.write_bytes(f"{base}/a/1.bin", b"one")
    storage.write_text(f"{base}/a/2.txt", "two")
    storage.write_bytes(f"{base}/a/3.json.gz", b"not gzip")  # no compression guessed
    assert storage.read_bytes(f"{base}/a/1.bin") == b"one"
    assert storage.read_bytes(f"{base}/a/3.json.gz") == b"not gzip"
    assert storage.list(base) == [f"{base}/a/1.bin", f"{base}/a/2.txt", f"{base}/a/3.json.gz"]
    assert storage.list(f"{base}/absent") == []
    assert storage.exists(f"{base}/a/2.txt") and not storage.exists(f"{base}/a/4")
    storage.delete(f"{base}/a/1.bin")
    storage.delete(f"{base}/a/1.bin")  # gone already: no error, as on S3
    assert storage.list(f"{base}/a/") == [f"{base}/a/2.txt", f"{base}/a/3.json.gz"]
    with pytest.raises(ObjectMissing, match=f"{base}/a/1.bin: no such object"):
        storage.read_bytes(f"{base}/a/1.bin")


def test_folders_and_the_arrow_filesystem(store, tmp_path):
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "sub" / "x.txt").write_text("x")
    (tmp_path / "src" / "y.bin").write_bytes(bytes(range(256)))
    storage, base = store.storage, f"{store.root}/dir"
    storage.upload_dir(tmp_path / "src", base)
    storage.download_dir(base, tmp_path / "dst")
    assert (tmp_path / "dst" / "sub" / "x.txt").read_text() == "x"
    assert (tmp_path / "dst" / "y.bin").read_bytes() == bytes(range(256))

    # what Ray Data, Train and Tune are handed; folders they make are no files
    filesystem, path = storage.arrow_filesystem(f"{base}/sub/x.txt")
    with filesystem.open_input_stream(path) as stream:
        assert stream.read() == b"x"
    filesystem, folder = storage.arrow_filesystem(base)
    filesystem.create_dir(f"{folder}/made-by-arrow/deep")
    assert storage.list(base) == [f"{base}/sub/x.txt", f"{base}/y.bin"]

    storage.upload_file(tmp_path / "src" / "y.bin", f"{base}/streamed.bin")
    storage.download_file(f"{base}/streamed.bin", tmp_path / "streamed.bin")
    assert (tmp_path / "streamed.bin").read_bytes() == bytes(range(256))


def test_the_node_cache_refreshes_when_an_object_changes(store, tmp_path):
    """The fingerprint holds each object's size, modification time and the service's own
    tag: a rewrite of the same size within the same second is seen too."""
    storage, model = store.storage, f"{store.root}/model"
    storage.write_text(f"{model}/config.json", '{"v": 1}')
    storage.write_bytes(f"{model}/weights.bin", b"w" * 1000)
    cache = str(tmp_path / "cache")
    local = download_to_node_cache(model, storage, cache)
    assert local == cached_model_dir(model, cache)
    assert (local / "config.json").read_text() == '{"v": 1}'
    marker = (local / COMPLETE_MARKER).read_text()

    assert download_to_node_cache(model, storage, cache) == local  # unchanged: reused
    assert (local / COMPLETE_MARKER).read_text() == marker

    storage.write_text(f"{model}/config.json", '{"v": 2}')  # same size, same second
    assert download_to_node_cache(model, storage, cache) == local
    assert (local / "config.json").read_text() == '{"v": 2}'
    assert (local / COMPLETE_MARKER).read_text() != marker


@pytest.fixture(scope="module")
def built(store):
    """A tiny synthetic data set built into the store: ``(build result, records)``."""
    config = DataBuildConfig(
        out=f"{store.root}/synthetic",
        seed=1,
        synthetic={"categories": ["brick", "grass"], "images_per_category": 4, "image_size": 64},
        split={"test_categories": ["grass"], "val_fraction": 0.0},
    )
    result = build_dataset(config, store.storage, progress=False)
    return result, read_manifest(store.storage, result.manifest_uri)


def test_a_data_set_built_there_reads_back(store, built):
    result, records = built
    assert result.manifest_uri == f"{store.root}/synthetic/manifest.parquet"
    assert len(records) == result.records == 8
    assert {record["category"] for record in records} == {"brick", "grass"}
    for record in records:
        assert record["image_uri"].startswith(f"{store.root}/synthetic/")
        assert store.storage.read_bytes(record["image_uri"])[:8] == b"\x89PNG\r\n\x1a\n"


def test_ray_data_reads_the_manifest_and_the_images(store, built, ray_cluster):
    """Ray's own Parquet reader on the filesystem Ray Data, Train and Tune are handed
    (pickled to its tasks), and mmrad's decode tasks on the images."""
    import ray.data

    result, records = built
    filesystem, path = store.storage.arrow_filesystem(result.manifest_uri)
    manifest = ray.data.read_parquet(path, filesystem=filesystem).take_all()
    assert sorted(row["id"] for row in manifest) == sorted(record["id"] for record in records)

    spec = DecodeSpec(store.storage, PixelBudget(min_pixels=28 * 28, max_pixels=56 * 56))
    (dataset,) = rank_datasets(records, spec, world_size=1, seed=0, batch_size=4)
    rows = list(dataset.iter_rows())
    assert Counter(row["id"] for row in rows) == Counter(record["id"] for record in records)
    for row in rows:
        assert not row["error"]
        assert row["image"].shape == (row["grid_height"], row["grid_width"], 3) == (56, 56, 3)


def test_wrong_azure_key_is_access_denied_without_leaking_it(azurite, monkeypatch, caplog):
    wrong = "d3Jvbmcta2V5LXRoYXQtaXMtbm90LXRoZS1yaWdodC1vbmU="
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", wrong)
    caplog.set_level(logging.DEBUG)
    uri = f"abfs://{TEST_BUCKET}/anything"
    with pytest.raises(AccessDenied, match=f"{uri}: access denied") as err:
        azure_storage(azurite.endpoint_url).read_bytes(uri)
    for text in (str(err.value), caplog.text):
        assert wrong not in text and AZURITE_KEY not in text


def test_gcs_outages_are_outlasted_by_the_retry_loop_or_fail_clearly(gcs_emulator, caplog):
    """The same retry loop as S3's, around the GCS client's own retries (2 s at most): an
    outage longer than those is outlasted; one longer than ``storage.outage_timeout_s``
    is :class:`StorageUnavailable` naming the URI."""
    host, port = gcs_emulator.endpoint_url.rsplit("/", 1)[1].split(":")
    proxy = ChaosProxy(host, int(port))
    try:
        uri = f"gs://{TEST_BUCKET}/faults/{uuid.uuid4().hex[:8]}.bin"
        storage = gcs_storage(proxy.url, outage_timeout_s=30.0)
        storage.ensure_bucket(uri)
        storage.write_bytes(uri, b"payload" * 1000)
        caplog.set_level(logging.WARNING, logger="mmrad.storage.errors")
        proxy.pause(4.0)  # longer than the client's own tries can last
        assert storage.read_bytes(uri) == b"payload" * 1000
        assert f"{uri}: OSError; retrying in" in caplog.text  # the loop's, not the client's

        proxy.pause(5.0)
        with pytest.raises(StorageUnavailable, match=f"{uri}: object storage unreachable"):
            gcs_storage(proxy.url, outage_timeout_s=1.0).read_bytes(uri)

        # The filesystem handed to Ray (checkpoints, Ray Data) has no loop around it: its
        # client outlasts the same outage on its own.
        proxy.pause(4.0)
        filesystem, path = storage.arrow_filesystem(uri)
        with filesystem.open_input_stream(path) as stream:
            assert stream.read() == b"payload" * 1000
    finally:
        proxy.close()


@pytest.mark.parametrize(
    ("message", "transient"),
    [  # as pyarrow 26 words them (seen against the emulators)
        ("google::cloud::Status(UNAVAILABLE: Retry policy exhausted, with a last message of "
         "PerformWork() - CURL error [7]=Could not connect to server", True),
        ("GetProperties failed for 'http://127.0.0.1:4998/devstoreaccount1/b/x'. Azure Error: "
         "[] Fail to get a new connection for: http://127.0.0.1:4998. Could not connect", True),
        ("UploadFrom failed. Azure Error: [ServerBusy] 503 The server is busy.", True),
        ("google::cloud::Status(NOT_FOUND: Permanent error, with a last message of Not", False),
        ("GetProperties failed. Azure Error: [AuthorizationFailure] 403 Server failed to "
         "authenticate the request.", False),
    ],
)  # fmt: skip
def test_pyarrow_faults_are_told_apart(message, transient):
    assert is_transient(OSError(message)) is transient


def test_unknown_schemes_and_missing_filesystems_fail_naming_the_uri(monkeypatch):
    storage = Storage()
    with pytest.raises(StorageError, match=r"ftp://host/x: unknown storage scheme 'ftp'"):
        storage.read_bytes("ftp://host/x")
    with pytest.raises(StorageError, match=r"gs://: not a gs://bucket/key URI"):
        storage.list("gs://")
    monkeypatch.delenv("AZURE_STORAGE_ACCOUNT_NAME", raising=False)
    with pytest.raises(StorageError, match=r"abfs://box/x: which storage account\?"):
        storage.read_bytes("abfs://box/x")
    with pytest.raises(StorageError, match=r"abfs://box@example.com/x: example.com is no Azure"):
        storage.read_bytes("abfs://box@example.com/x")

    # HDFS needs Java and Hadoop's libhdfs on the node, which a machine without Hadoop lacks
    if os.environ.get("HADOOP_HOME") or os.environ.get("ARROW_LIBHDFS_DIR"):
        pytest.skip("Hadoop is installed here: HDFS would try to connect")
    with pytest.raises(StorageError) as err:
        storage.read_bytes("hdfs://127.0.0.1:1/data/x")
    message = str(err.value)
    assert message.startswith("hdfs://127.0.0.1:1/data/x: the hdfs:// filesystem (HDFS)")
    assert "not installed here" in message and "JAVA_HOME" in message
    assert len(message) < 600  # the first line of the JVM's search, not all of it


def test_the_config_reaches_the_filesystems():
    config = StorageConfig(
        gcs={"endpoint_url": "http://127.0.0.1:4443", "anonymous": True},
        azure={"account_name": "acct", "endpoint_url": "http://127.0.0.1:10000"},
    )
    storage = Storage.from_config(config)
    assert storage.gcs == GcsSettings("http://127.0.0.1:4443", True, None)
    assert storage.azure == AzureSettings("acct", "http://127.0.0.1:10000")
    assert hash(storage) == hash(Storage.from_config(config))  # a cache key (Ray Data's)
    assert storage.arrow_filesystem("abfs://box/a/b")[1] == "box/a/b"
