"""Storage and checkpoint safety: object keys that would land outside the download folder
are refused (against the suite's real S3 server), node-cache copies are verified against
the remote listing on every reuse, checkpoint extras load with ``weights_only=True``, and
a data set is never rebuilt over an existing manifest."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from mmrad.config import DataBuildConfig
from mmrad.data.build import build_dataset
from mmrad.data.builders.base import DataBuildError
from mmrad.model import loading
from mmrad.storage import Storage, UnsafeKey, local_target, split_s3
from mmrad.train.checkpoint import load_tensors, rng_states, set_rng_states
from tests.conftest import TEST_BUCKET

HOSTILE = [
    ("../escape.txt", "a '..' segment"),
    ("a/../../escape.txt", "a '..' segment"),
    ("/abs.txt", "an absolute path"),
    ("a//b.txt", "an empty path segment"),
    ("./dot.txt", "a '.' segment"),
]


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# -- the one key → local path mapping ---------------------------------------------------


@pytest.mark.parametrize(("relative", "why"), HOSTILE)
def test_unsafe_keys_are_refused_naming_the_key_and_the_prefix(tmp_path, relative, why):
    prefix = "s3://bucket/models/m"
    with pytest.raises(UnsafeKey) as err:
        local_target(prefix, f"{prefix}/{relative}", tmp_path)
    assert f"{prefix}/{relative}" in str(err.value) and repr(prefix) in str(err.value)
    assert why in str(err.value)


def test_safe_keys_map_below_the_folder(tmp_path):
    prefix = "s3://bucket/models/m/"
    assert local_target(prefix, "s3://bucket/models/m/a/b.txt", tmp_path) == tmp_path / "a/b.txt"
    assert local_target(prefix, "s3://bucket/models/m/..x", tmp_path) == tmp_path / "..x"
    with pytest.raises(UnsafeKey, match="not below the prefix"):
        local_target(prefix, "s3://bucket/models/other/x", tmp_path)


class HostileListing:
    """Objects under hostile keys on the real S3 server: each is put directly with boto3
    (no mmrad check in the way). SeaweedFS refuses ``..`` and ``.`` keys and collapses
    ``//``, as some stores do and AWS S3 does not; where it did not keep the key as
    written, the object is stored under a plain key and the listing answer of the real
    server is rewritten (a botocore hook on mmrad's own client) to show the key as an S3
    store that keeps keys verbatim would list it."""

    def __init__(self, storage: Storage, prefix: str):
        self.storage, self.prefix = storage, prefix
        self.renamed: dict[str, str] = {}
        self.client = storage.s3

    def put(self, relative: str, body: bytes) -> None:
        bucket, key = split_s3(f"{self.prefix}/{relative}")
        try:
            self.client.put_object(Bucket=bucket, Key=key, Body=body)
            listed = {o["Key"] for o in self._listed(bucket)}
            if key in listed:
                return  # the server kept it verbatim
            for stored in listed - {key}:  # collapsed by the server: delete that copy
                if stored.endswith(relative.rsplit("/", 1)[-1]):
                    self.client.delete_object(Bucket=bucket, Key=stored)
        except self.client.exceptions.ClientError:
            pass  # refused by the server
        plain = f"{split_s3(self.prefix)[1]}/plain-{uuid.uuid4().hex[:8]}"
        self.client.put_object(Bucket=bucket, Key=plain, Body=body)
        self.renamed[plain] = key

    def _listed(self, bucket: str) -> list[dict]:
        answer = self.client.list_objects_v2(Bucket=bucket, Prefix=split_s3(self.prefix)[1] + "/")
        return answer.get("Contents", [])

    def _rewrite(self, parsed, **_kwargs) -> None:
        for obj in parsed.get("Contents", []):
            obj["Key"] = self.renamed.get(obj["Key"], obj["Key"])

    def __enter__(self) -> HostileListing:
        self.client.meta.events.register("after-call.s3.ListObjectsV2", self._rewrite)
        return self

    def __exit__(self, *exc) -> None:
        self.client.meta.events.unregister("after-call.s3.ListObjectsV2", self._rewrite)


@pytest.mark.integration
@pytest.mark.parametrize(("relative", "why"), HOSTILE)
def test_downloads_refuse_hostile_keys_and_write_nothing(s3_server, tmp_path, relative, why):
    storage = Storage()
    prefix = f"s3://{TEST_BUCKET}/hostile/{uuid.uuid4().hex[:8]}/m"
    storage.write_text(f"{prefix}/config.json", "{}")
    storage.write_bytes(f"{prefix}/ok.bin", b"fine")
    inside = tmp_path / "deep" / "inside"
    inside.mkdir(parents=True)
    with HostileListing(storage, prefix) as hostile:
        hostile.put(relative, b"payload")
        listed = storage.list(prefix)
        assert f"{prefix}/{relative}" in listed  # what the download sees

        with pytest.raises(UnsafeKey) as err:
            storage.download_dir(prefix, inside / "dst")
        assert f"{prefix}/{relative}" in str(err.value) and repr(prefix) in str(err.value)
        assert why in str(err.value)

        cache = inside / "cache"
        with pytest.raises(UnsafeKey) as err:
            loading.download_to_node_cache(prefix, storage, str(cache))
        assert f"{prefix}/{relative}" in str(err.value) and repr(prefix) in str(err.value)

    # nothing written: not the download folder, not the safe files, not above it (the
    # keys are checked before the cache's lock is even taken)
    assert files_under(tmp_path) == []
    assert not (inside / "dst").exists() and list(cache.iterdir()) == []


# -- node cache verified on reuse --------------------------------------------------------


@pytest.mark.integration
def test_the_node_cache_is_verified_against_the_listing_and_refreshed(
    s3_server, tmp_path, monkeypatch
):
    storage = Storage()
    model = f"s3://{TEST_BUCKET}/cache-check/{uuid.uuid4().hex[:8]}/model"
    storage.write_text(f"{model}/config.json", '{"v": 1}')
    storage.write_bytes(f"{model}/weights.bin", b"w" * 5000)
    storage.write_bytes(f"{model}/sub/extra.bin", b"e" * 300)
    downloads: list[str] = []
    real = loading._download_file
    monkeypatch.setattr(
        loading, "_download_file", lambda s, uri, to: downloads.append(uri) or real(s, uri, to)
    )
    cache = str(tmp_path / "cache")

    local = loading.download_to_node_cache(model, storage, cache)
    assert sorted(downloads) == sorted(storage.list(model))
    marker = json.loads((local / loading.COMPLETE_MARKER).read_text())
    listed = storage.s3.list_objects_v2(Bucket=TEST_BUCKET, Prefix=split_s3(model)[1])
    etags = {obj["Key"].rsplit("/model/", 1)[1]: obj["ETag"] for obj in listed["Contents"]}
    assert marker["files"] == {
        "config.json": {"size": 8, "version": [8, etags["config.json"]]},
        "weights.bin": {"size": 5000, "version": [5000, etags["weights.bin"]]},
        "sub/extra.bin": {"size": 300, "version": [300, etags["sub/extra.bin"]]},
    }

    # unchanged: reused, nothing downloaded, nothing rewritten
    downloads.clear()
    mtimes = {p: p.stat().st_mtime_ns for p in local.rglob("*")}
    assert loading.download_to_node_cache(model, storage, cache) == local
    assert downloads == []
    assert {p: p.stat().st_mtime_ns for p in local.rglob("*")} == mtimes

    # a cached file cut short (a half-written copy): that file downloaded again
    with open(local / "weights.bin", "r+b") as handle:
        handle.truncate(1234)
    assert loading.download_to_node_cache(model, storage, cache) == local
    assert downloads == [f"{model}/weights.bin"]
    assert (local / "weights.bin").read_bytes() == b"w" * 5000

    # a cached file missing: downloaded again
    downloads.clear()
    (local / "sub" / "extra.bin").unlink()
    assert loading.download_to_node_cache(model, storage, cache) == local
    assert downloads == [f"{model}/sub/extra.bin"]

    # the remote object rewritten (same size, new ETag): refreshed
    downloads.clear()
    storage.write_text(f"{model}/config.json", '{"v": 2}')
    assert loading.download_to_node_cache(model, storage, cache) == local
    assert downloads == [f"{model}/config.json"]
    assert (local / "config.json").read_text() == '{"v": 2}'
    assert (local / "weights.bin").read_bytes() == b"w" * 5000

    # a marker of an older mmrad (names only): everything downloaded again
    downloads.clear()
    (local / loading.COMPLETE_MARKER).write_text(json.dumps({"files": sorted(marker["files"])}))
    assert loading.download_to_node_cache(model, storage, cache) == local
    assert sorted(downloads) == sorted(storage.list(model))
    leftovers = [p.name for p in Path(cache).iterdir()]
    assert sorted(leftovers) == sorted([local.name, f"{local.name}.lock"])  # no temp folders


# -- checkpoint extras -------------------------------------------------------------------


def test_rng_states_round_trip_through_weights_only_loading(tmp_path):
    random.seed(1)
    np.random.seed(2)
    np.random.normal()  # a cached Gaussian is part of NumPy's state
    torch.manual_seed(3)
    torch.save(rng_states(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))

    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    assert got[:3] == expected[:3]
    torch.testing.assert_close(got[3], expected[3], rtol=0, atol=0)


def test_pickled_objects_in_checkpoint_extras_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "rng_rank0.pt"
    torch.save({"numpy": np.random.get_state()}, path)  # what older checkpoints held
    with pytest.raises(ValueError, match=rf"{path}: holds objects other than tensors"):
        load_tensors(path)


def test_no_torch_load_without_weights_only_in_mmrad():
    root = Path(__file__).parents[1] / "mmrad"
    offenders = [str(p) for p in root.rglob("*.py") if "weights_only=False" in p.read_text()]
    assert offenders == []


# -- data build ---------------------------------------------------------------------------


def small_build(out: str, seed: int = 0) -> DataBuildConfig:
    return DataBuildConfig(out=out, seed=seed,
                           synthetic={"categories": ["brick", "coins"], "images_per_category": 4,
                                      "image_size": 64},
                           split={"test_categories": ["coins"], "val_fraction": 0.0})  # fmt: skip


def test_a_data_set_is_not_rebuilt_over_an_existing_manifest(tmp_path):
    out = tmp_path / "data"
    build_dataset(small_build(str(out)), Storage(), progress=False)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}

    with pytest.raises(DataBuildError, match=rf"data.out {out}: this folder already holds"):
        build_dataset(small_build(str(out), seed=1), Storage(), progress=False)
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    assert after == before  # nothing touched

    # a folder holding images but no manifest (a build cut short) is built into again
    (out / "manifest.parquet").unlink()
    assert build_dataset(small_build(str(out), seed=1), Storage(), progress=False).records


@pytest.mark.integration
def test_a_data_set_on_s3_is_not_rebuilt_over_its_manifest(s3_server):
    storage = Storage()
    out = f"s3://{TEST_BUCKET}/rebuild/{uuid.uuid4().hex[:8]}"
    build_dataset(small_build(out), storage, progress=False)
    before = storage.versions(out)
    with pytest.raises(DataBuildError, match=rf"data.out {out}: this folder already holds"):
        build_dataset(small_build(out, seed=1), storage, progress=False)
    assert storage.versions(out) == before
    # a bucket that does not exist yet is no data set
    fresh = f"s3://mmrad-rebuild-{uuid.uuid4().hex[:8]}/data"
    assert build_dataset(small_build(fresh), storage, progress=False).records
