import pytest

from mmrad.data.manifest import read_manifest, records_of_split, write_manifest
from mmrad.data.schema import ManifestError
from mmrad.storage import Storage


def record(**changes):
    base = {
        "id": "s/c/1", "source": "s", "category": "c", "split": "train",
        "image_uri": "images/1.png", "reference_uri": None, "width": 100, "height": 80,
        "is_anomalous": True, "boxes": [[10.0, 10.0, 20.0, 30.0]], "labels": ["scratch"],
        "defect_type": "scratch", "reasoning": None,
    }  # fmt: skip
    return {**base, **changes}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"boxes": [[10.0, 10.0, 120.0, 30.0]]}, r"boxes\[0\].*not inside the 100x80 image"),
        ({"boxes": [[20.0, 10.0, 10.0, 30.0]]}, r"x1<x2"),
        ({"labels": []}, "0 labels for 1 boxes"),
        ({"is_anomalous": False, "defect_type": "good"}, "a normal image with 1 boxes"),
        ({"split": "holdout"}, "split: 'holdout'"),
    ],
)
def test_bad_records_are_refused_naming_manifest_id_and_field(tmp_path, changes, message):
    target = tmp_path / "set"
    with pytest.raises(ManifestError, match=message) as err:
        write_manifest(Storage(), [record(**changes)], str(target))
    assert "id 's/c/1'" in str(err.value) and "manifest.parquet" in str(err.value)
    assert not target.exists()


def test_duplicate_ids_refused_and_existing_manifest_kept(tmp_path):
    good = write_manifest(Storage(), [record()], str(tmp_path))
    with pytest.raises(ManifestError, match="duplicate id"):
        write_manifest(Storage(), [record(), record()], str(tmp_path))
    assert len(read_manifest(Storage(), good)) == 1


def test_relative_uris_resolve_against_the_manifest_folder(tmp_path):
    write_manifest(Storage(), [record(reference_uri="ref/0.png")], str(tmp_path))
    (loaded,) = read_manifest(Storage(), str(tmp_path))
    assert loaded["image_uri"] == f"{tmp_path}/images/1.png"
    assert loaded["reference_uri"] == f"{tmp_path}/ref/0.png"
    assert loaded["boxes"] == [[10.0, 10.0, 20.0, 30.0]]


def test_records_of_split_refuses_an_empty_split_naming_manifest_and_setting():
    records = [record(id="a"), record(id="b", split="val")]
    assert [r["id"] for r in records_of_split(records, "val", "m.parquet", "x")] == ["b"]
    with pytest.raises(ManifestError) as err:
        records_of_split(records, "test", "m.parquet", "validation.split")
    assert str(err.value) == (
        "data.manifest m.parquet: no records in split 'test' (validation.split)"
    )


def test_all_holds_every_record_and_one_without_a_split_belongs_to_every_split():
    records = [record(id="a"), record(id="b", split="val"), record(id="c", split=None)]
    assert len(records_of_split(records, "all", "m", "data.split")) == 3
    assert [r["id"] for r in records_of_split(records, "test", "m", "data.split")] == ["c"]
    with pytest.raises(ManifestError, match="no records in split 'all'"):
        records_of_split([], "all", "m", "data.split")
