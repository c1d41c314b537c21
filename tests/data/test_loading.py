"""Ray Data loading from the real S3 server, on the session's local Ray cluster."""

import shutil
from collections import Counter

import pytest

from mmrad.config import PixelBudget
from mmrad.data.loading import (
    BadImageError,
    DecodeSpec,
    SkipLog,
    epoch_order,
    ordered_rows,
    rank_datasets,
    rank_positions,
)
from mmrad.data.manifest import read_manifest, write_manifest
from mmrad.storage import Storage
from mmrad.task.geometry import from_model_grid, to_model_grid

pytestmark = pytest.mark.integration


def collect(datasets):
    return [list(ds.iter_rows()) for ds in datasets]


def test_positions_partition_the_epoch_and_resume_takes_the_rest():
    assert list(rank_positions(10, 0, 2)) == [0, 2, 4, 6, 8]
    assert list(rank_positions(10, 1, 2, start=5)) == [5, 7, 9]
    assert list(rank_positions(10, 0, 2, start=5)) == [6, 8]
    records = [{"id": f"r{i}"} for i in range(9)]
    forward = [records[i]["id"] for i in epoch_order(records, 1, 0)]
    backward = list(reversed(records))
    assert [backward[i]["id"] for i in epoch_order(backward, 1, 0)] == forward  # input order
    assert sorted(forward) == sorted(r["id"] for r in records)
    assert epoch_order(records, 1, 0) != epoch_order(records, 1, 1)


def test_s3_to_ray_data_in_two_shards_gives_every_id_once(ray_cluster, synthetic_s3):
    uri, records = synthetic_s3
    spec = DecodeSpec(Storage(), PixelBudget(max_pixels=224 * 224))
    shards = collect(rank_datasets(records, spec, world_size=2, seed=7))
    ids = [row["id"] for shard in shards for row in shard]
    assert Counter(ids) == Counter(r["id"] for r in records)
    order = [records[i]["id"] for i in epoch_order(records, 7, 0)]
    for rank, shard in enumerate(shards):
        assert [row["id"] for row in shard] == order[rank::2]  # deterministic, in order
        assert [row["position"] for row in shard] == list(range(rank, len(records), 2))


def test_images_arrive_on_the_model_grid_and_boxes_survive_the_round_trip(
    ray_cluster, synthetic_s3
):
    _, records = synthetic_s3
    spec = DecodeSpec(Storage(), PixelBudget(max_pixels=224 * 224))
    (rows,) = collect(rank_datasets(records, spec, world_size=1, seed=0))
    anomalous = 0
    for row in rows:
        assert row["error"] == ""
        grid = (int(row["grid_width"]), int(row["grid_height"]))
        assert grid == (196, 196)  # smart resize of 200x200 to multiples of 28
        assert row["image"].shape == (196, 196, 3) and row["reference"].shape == (196, 196, 3)
        size = (int(row["width"]), int(row["height"]))
        boxes = [list(map(float, box)) for box in row["boxes"]]
        back = from_model_grid(to_model_grid(boxes, size, grid), size, grid)
        for original, restored in zip(boxes, back, strict=True):
            assert max(abs(a - b) for a, b in zip(original, restored, strict=True)) <= 1.0
        anomalous += bool(boxes)
    assert anomalous >= 6


def test_resume_from_a_position_reads_exactly_the_rest(ray_cluster, synthetic_s3):
    _, records = synthetic_s3
    spec = DecodeSpec(Storage(), PixelBudget())
    full = ordered_rows(records, seed=2, world_size=2, rank=1)
    (resumed,) = collect([rank_datasets(records, spec, world_size=2, seed=2, start=9)[1]])
    assert [row["id"] for row in resumed] == [r["id"] for r in full if r["position"] >= 9]


@pytest.fixture()
def damaged_copy(synthetic_s3, tmp_path):
    """A local copy of the set with one truncated PNG and one missing image."""
    _, records = synthetic_s3
    storage = Storage()
    local = []
    for record in records:
        copy = dict(record)
        for key in ("image_uri", "reference_uri"):
            relative = record[key].split("/datasets/synthetic/", 1)[1]
            target = tmp_path / relative
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(storage.read_bytes(record[key]))
            copy[key] = relative
        local.append(copy)
    write_manifest(storage, local, str(tmp_path))
    truncated, missing = sorted(r["id"] for r in local if r["split"] == "train")[:2]
    by_id = {r["id"]: r for r in local}
    png = tmp_path / by_id[truncated]["image_uri"]
    png.write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])
    (tmp_path / by_id[missing]["image_uri"]).unlink()
    shutil.rmtree(tmp_path / "unused", ignore_errors=True)
    return read_manifest(storage, str(tmp_path)), truncated, missing


def test_bad_images_are_skipped_and_counted(ray_cluster, damaged_copy):
    records, truncated, missing = damaged_copy
    spec = DecodeSpec(Storage(), PixelBudget(), on_bad_image="skip")
    (rows,) = collect(rank_datasets(records, spec, world_size=1, seed=0))
    skips = SkipLog()
    kept = [row["id"] for row in skips.usable_rows(rows)]
    assert set(skips.skipped) == {truncated, missing}
    assert len(kept) == len(records) - 2 and truncated not in kept
    assert "no such file" in skips.skipped[missing]


def test_bad_image_policy_fail_names_id_and_uri(ray_cluster, damaged_copy):
    records, truncated, missing = damaged_copy
    spec = DecodeSpec(Storage(), PixelBudget(), on_bad_image="fail")
    with pytest.raises(BadImageError) as err:  # itself, not Ray Data's UserCodeException
        collect(rank_datasets(records, spec, world_size=1, seed=0))
    message = str(err.value)
    assert any(f"id {rid!r}" in message for rid in (truncated, missing))
    assert ".png" in message
