from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmrad.config import DataBuildConfig
from mmrad.data.build import build_dataset
from mmrad.data.builders.synthetic import CATEGORY_IMAGES, category_picture
from mmrad.data.manifest import read_manifest
from mmrad.data.stats import manifest_stats
from mmrad.storage import Storage


def build(tmp_path, name="out", synthetic=(), **overrides):
    small = {"categories": ["brick", "coins"], "images_per_category": 6, "image_size": 96}
    config = DataBuildConfig(
        out=str(tmp_path / name), synthetic={**small, **dict(synthetic)}, **overrides
    )
    build_dataset(config, Storage(), progress=False)
    return read_manifest(Storage(), str(tmp_path / name))


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    first = build(tmp_path, "a", seed=1)
    again = build(tmp_path, "b", seed=1)
    other = build(tmp_path, "c", seed=2)
    strip = [{k: v for k, v in r.items() if not k.endswith("uri")} for r in first]
    assert strip == [{k: v for k, v in r.items() if not k.endswith("uri")} for r in again]
    for r1, r2 in zip(first, again, strict=True):
        assert Path(r1["image_uri"]).read_bytes() == Path(r2["image_uri"]).read_bytes()
    assert [r["boxes"] for r in first] != [r["boxes"] for r in other]


def test_boxes_cover_exactly_the_changed_pixels(tmp_path):
    """A defect changes pixels only inside its boxes, and each box edge touches a change."""
    records = build(tmp_path, seed=5)
    anomalous = [r for r in records if r["is_anomalous"]]
    assert anomalous and all(len(r["boxes"]) == len(r["labels"]) for r in anomalous)
    for record in anomalous:
        for (x1, y1, x2, y2), label in zip(record["boxes"], record["labels"], strict=True):
            assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 96
            assert label in {"scratch", "hole", "stain", "crack", "missing", "color_shift"}
        assert record["defect_type"] == record["labels"][0]
        assert "anomalous" in record["reasoning"]
    normal = [r for r in records if not r["is_anomalous"]]
    assert normal and all(r["boxes"] == [] and r["defect_type"] == "good" for r in normal)
    assert all("normal" in r["reasoning"] for r in normal)


def test_every_query_has_a_normal_reference_of_its_category(tmp_path):
    for record in build(tmp_path):
        assert record["reference_uri"] and f"/{record['category']}/" in record["reference_uri"]
        reference = np.asarray(Image.open(record["reference_uri"]))
        assert reference.shape == (96, 96, 3)


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_an_aligned_reference_is_the_query_before_its_defects(tmp_path, scale):
    records = build(tmp_path, seed=5, synthetic={"reference": "aligned", "defect_scale": scale})
    assert len({r["reference_uri"] for r in records}) == len(records)  # one per query
    for record in records:
        query = np.asarray(Image.open(record["image_uri"])).astype(int)
        reference = np.asarray(Image.open(record["reference_uri"])).astype(int)
        changed = (query != reference).any(axis=2)
        inside = np.zeros_like(changed)
        for x1, y1, x2, y2 in record["boxes"]:
            inside[int(y1) : int(y2), int(x1) : int(x2)] = True
        assert not (changed & ~inside).any()  # the same view outside the defects
        assert changed.any() == record["is_anomalous"]  # and the defects differ


def test_a_defect_scale_of_2_paints_defects_about_twice_as_large(tmp_path):
    def short_sides(scale: float) -> list[float]:
        records = build(tmp_path, f"scale{scale}", seed=3, synthetic={
            "images_per_category": 24, "anomaly_ratio": 1.0, "defect_scale": scale})  # fmt: skip
        return [min(x2 - x1, y2 - y1) for r in records for x1, y1, x2, y2 in r["boxes"]]

    assert np.median(short_sides(2.0)) > 1.5 * np.median(short_sides(1.0))


def test_held_out_category_is_test_only_and_stats_agree(tmp_path):
    records = build(tmp_path, split={"test_categories": ["coins"], "val_fraction": 0.34})
    coins = {r["split"] for r in records if r["category"] == "coins"}
    assert coins == {"test"}
    brick = [r["split"] for r in records if r["category"] == "brick"]
    assert brick.count("val") == 2 and brick.count("train") == 4  # round(3*0.34) per class
    stats = manifest_stats(records)
    assert stats["categories"]["synthetic/coins"]["test"] == 6
    assert stats["train_test_overlap"] == []
    assert stats["anomaly_ratio"] == pytest.approx(0.5)


def test_validation_categories_are_val_only_and_apart_from_test(tmp_path):
    """A validation category is as unseen as a test one: all of its images in val,
    none in train, the seen categories' images all in train."""
    records = build(tmp_path, synthetic={"categories": ["brick", "coins", "grass"]}, split={
        "test_categories": ["coins"], "val_categories": ["synthetic/grass"]})  # fmt: skip
    splits = {c: {r["split"] for r in records if r["category"] == c} for c in
              ("brick", "coins", "grass")}  # fmt: skip
    assert splits == {"brick": {"train"}, "coins": {"test"}, "grass": {"val"}}
    with pytest.raises(ValueError, match="split.val_categories: coins also in split.test_"):
        DataBuildConfig(split={"test_categories": ["coins"], "val_categories": ["coins"]})
    with pytest.raises(ValueError, match=r"data\.split\.val_categories: 'grsas' names nothing"):
        build(tmp_path, "typo", split={"val_categories": ["grsas"]})
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("category", sorted(CATEGORY_IMAGES))
def test_every_category_is_an_rgb_picture_with_detail(category):
    """Each category loads offline from scikit-image as 8-bit RGB, whatever the picture's
    own format (grey, RGBA, boolean mask, floats in [0, 1])."""
    picture = category_picture(category)
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    assert min(picture.shape[:2]) >= 100 and picture.std() > 5


def test_stats_flag_categories_in_train_and_test(tmp_path):
    records = build(tmp_path, split={"test_fraction": 0.34, "val_fraction": 0.0})
    assert manifest_stats(records)["train_test_overlap"] == ["synthetic/brick", "synthetic/coins"]


def test_unknown_category_fails_before_writing(tmp_path):
    config = DataBuildConfig(out=str(tmp_path / "x"), synthetic={"categories": ["plutonium"]})
    with pytest.raises(ValueError, match="plutonium.*known: "):
        build_dataset(config, Storage(), progress=False)
    assert not (tmp_path / "x").exists()
