import logging

import pytest

from mmrad.storage import Storage, StorageError, absolute, resolve
from tests.conftest import TEST_BUCKET, TEST_SECRET_KEY


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    storage = Storage()
    target = tmp_path / "deep" / "file.bin"
    storage.write_bytes(str(target), b"first")
    storage.write_bytes(str(target), b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_failed_local_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "keep.txt"
    Storage().write_text(str(target), "old")

    with pytest.raises(TypeError):  # the write itself fails after the temp file exists
        Storage().write_bytes(str(target), "not bytes")  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_local_missing_file_names_the_path(tmp_path):
    with pytest.raises(StorageError, match="absent.png: no such file"):
        Storage().read_bytes(str(tmp_path / "absent.png"))


def test_relative_uris_resolve_against_the_manifest_folder():
    assert resolve("s3://b/data", "images/a.png") == "s3://b/data/images/a.png"
    assert resolve("s3://b/data", "s3://other/x.png") == "s3://other/x.png"
    assert resolve("/data", "file:///x.png") == "file:///x.png"


def test_local_paths_come_out_absolute_and_normalized_as_the_listing_spells_them(
    tmp_path, monkeypatch
):
    """``.``, ``//`` and a trailing ``/`` would make a prefix miss the listed files."""
    monkeypatch.chdir(tmp_path)
    assert absolute("a/./b//c/") == str(tmp_path / "a" / "b" / "c")
    assert absolute(f"{tmp_path}/./x//y/") == str(tmp_path / "x" / "y")
    assert absolute(f"file://{tmp_path}/x/../z") == str(tmp_path / "z")
    assert absolute("s3://bucket/a/./b//c/") == "s3://bucket/a/./b//c/"  # part of the key
    Storage().write_text(str(tmp_path / "d" / "e.txt"), "e")
    assert Storage().list(absolute("d/.//")) == [absolute("d//e.txt")]


@pytest.mark.integration
def test_s3_round_trip_list_exists_delete(s3_server):
    storage = Storage()
    base = f"s3://{TEST_BUCKET}/storage-test"
    storage.write_bytes(f"{base}/a/1.bin", b"one")
    storage.write_text(f"{base}/a/2.txt", "two")
    assert storage.read_bytes(f"{base}/a/1.bin") == b"one"
    assert storage.list(base) == [f"{base}/a/1.bin", f"{base}/a/2.txt"]
    assert storage.exists(f"{base}/a/2.txt") and not storage.exists(f"{base}/a/3")
    storage.delete(f"{base}/a/1.bin")
    assert storage.list(base) == [f"{base}/a/2.txt"]


@pytest.mark.integration
def test_s3_folders_and_arrow_filesystem(s3_server, tmp_path):
    import pyarrow.fs as pafs

    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "sub" / "x.txt").write_text("x")
    storage = Storage()
    storage.upload_dir(tmp_path / "src", f"s3://{TEST_BUCKET}/dir-test")
    storage.download_dir(f"s3://{TEST_BUCKET}/dir-test", tmp_path / "dst")
    assert (tmp_path / "dst" / "sub" / "x.txt").read_text() == "x"
    fs, path = storage.arrow_filesystem(f"s3://{TEST_BUCKET}/dir-test/sub/x.txt")
    assert isinstance(fs, pafs.S3FileSystem)
    with fs.open_input_stream(path) as stream:
        assert stream.read() == b"x"

    # Folders that pyarrow (and so Ray Train) creates are empty "dir/" marker objects:
    # neither listed as files nor downloaded as one.
    fs.create_dir(f"{TEST_BUCKET}/dir-test/made-by-arrow")
    bucket_keys = storage.s3.list_objects_v2(Bucket=TEST_BUCKET, Prefix="dir-test/")["Contents"]
    assert "dir-test/made-by-arrow/" in {obj["Key"] for obj in bucket_keys}
    assert storage.list(f"s3://{TEST_BUCKET}/dir-test") == [
        f"s3://{TEST_BUCKET}/dir-test/sub/x.txt"
    ]
    storage.download_dir(f"s3://{TEST_BUCKET}/dir-test", tmp_path / "again")
    assert [p.name for p in (tmp_path / "again").rglob("*") if p.is_file()] == ["x.txt"]


@pytest.mark.integration
def test_s3_errors_name_the_uri(s3_server):
    storage = Storage()
    with pytest.raises(StorageError, match=r"s3://no-such-bucket-x/k: bucket does not exist"):
        storage.read_bytes("s3://no-such-bucket-x/k")
    with pytest.raises(StorageError, match=rf"s3://{TEST_BUCKET}/absent: no such object"):
        storage.read_bytes(f"s3://{TEST_BUCKET}/absent")


@pytest.mark.integration
def test_wrong_credentials_fail_clearly_without_leaking_the_secret(s3_server, monkeypatch, caplog):
    wrong_secret = "definitely-wrong-secret-value"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StorageError) as err:
        Storage(max_attempts=2).read_bytes(f"s3://{TEST_BUCKET}/anything")
    assert "access denied" in str(err.value)
    assert f"s3://{TEST_BUCKET}/anything" in str(err.value)
    for text in (str(err.value), caplog.text):
        assert wrong_secret not in text and TEST_SECRET_KEY not in text
