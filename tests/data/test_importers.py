"""The MVTec AD, VisA and MMR-AD importers on small layouts built here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

import mmrad.data.builders.mmrad_layout as mmrad_layout
import mmrad.data.builders.mvtec  # noqa: F401  (registers the builder)
import mmrad.data.builders.visa  # noqa: F401  (registers the builder)
from mmrad.config import DataBuildConfig, DataJobConfig, load_config
from mmrad.data.build import BuildResult, build_dataset
from mmrad.data.builders.base import DataBuildError
from mmrad.data.manifest import read_manifest, read_manifest_table, read_split_info
from mmrad.data.stats import manifest_stats
from mmrad.storage import Storage

W, H = 64, 48
# Two components under 8-connectivity: the first two rectangles touch only at a corner
# (pixel (19, 9) and pixel (20, 10)), so they form one component.
TWO_PARTS = [(10, 5, 20, 10), (20, 10, 25, 13), (40, 30, 50, 40)]
TWO_PARTS_BOXES = [[10.0, 5.0, 25.0, 13.0], [40.0, 30.0, 50.0, 40.0]]
ONE_PART = [(3, 3, 8, 6)]
ONE_PART_BOXES = [[3.0, 3.0, 8.0, 6.0]]


def save_image(path: Path, seed: int = 0, size: tuple[int, int] = (W, H)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def save_mask(path: Path, rects, size: tuple[int, int] = (W, H)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    for x1, y1, x2, y2 in rects:
        mask[y1:y2, x1:x2] = 255
    Image.fromarray(mask).save(path)
    return path


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def build(
    source: str, root: Path, out: Path, split: dict | None = None, **extra
) -> tuple[BuildResult, dict[str, dict]]:
    """Build, then read the manifest back: records by id, URIs as stored (relative).
    No val split unless ``split`` asks for one."""
    config = DataBuildConfig(
        source=source, input=str(root), out=str(out), split={"val_fraction": 0, **(split or {})},
        **extra,
    )  # fmt: skip
    result = build_dataset(config, Storage(), progress=False)
    records = {r["id"]: r for r in read_manifest_table(Storage(), str(out)).to_pylist()}
    for record in read_manifest(Storage(), str(out)):  # absolute URIs: the files exist
        assert Path(record["image_uri"]).is_file(), record["image_uri"]
        if record["reference_uri"]:
            assert Path(record["reference_uri"]).is_file(), record["reference_uri"]
    return result, records


def ids_in(records: dict[str, dict], split: str) -> set[str]:
    return {rid for rid, record in records.items() if record["split"] == split}


# -- MVTec AD --------------------------------------------------------------------------------


def make_mvtec(root: Path) -> Path:
    for i in range(3):
        save_image(root / "bottle/train/good" / f"{i:03d}.png", seed=i)
    save_image(root / "bottle/test/good/000.png", seed=10)
    save_image(root / "bottle/test/broken_large/000.png", seed=11)
    save_mask(root / "bottle/ground_truth/broken_large/000_mask.png", TWO_PARTS)
    save_image(root / "bottle/test/broken_large/001.png", seed=12)
    save_mask(root / "bottle/ground_truth/broken_large/001_mask.png", ONE_PART)
    save_image(root / "grid/train/good/000.png", seed=20)
    save_image(root / "grid/test/crack/000.png", seed=21)
    save_mask(root / "grid/ground_truth/crack/000_mask.png", ONE_PART)
    (root / "license.txt").write_text("not a category")
    (root / "docs").mkdir()
    return root


def test_mvtec_records(tmp_path):
    out = tmp_path / "out"
    result, records = build("mvtec", make_mvtec(tmp_path / "mvtec_ad"), out)
    assert result.records == 8 and result.skipped == {}
    assert sorted(records) == [
        "mvtec/bottle/test/broken_large/000",
        "mvtec/bottle/test/broken_large/001",
        "mvtec/bottle/test/good/000",
        "mvtec/bottle/train/good/000",
        "mvtec/bottle/train/good/001",
        "mvtec/bottle/train/good/002",
        "mvtec/grid/test/crack/000",
        "mvtec/grid/train/good/000",
    ]
    broken = records["mvtec/bottle/test/broken_large/000"]
    assert broken == {
        "id": "mvtec/bottle/test/broken_large/000",
        "source": "mvtec",
        "category": "bottle",
        "split": "test",
        "image_uri": "mvtec/bottle/test/broken_large/000.png",
        "reference_uri": "mvtec/bottle/train/good/000.png",
        "width": W,
        "height": H,
        "is_anomalous": True,
        "boxes": TWO_PARTS_BOXES,
        "labels": ["broken_large", "broken_large"],
        "defect_type": "broken_large",
        "reasoning": None,
    }
    assert records["mvtec/bottle/test/broken_large/001"]["boxes"] == ONE_PART_BOXES
    good = records["mvtec/bottle/test/good/000"]
    assert (good["is_anomalous"], good["boxes"], good["labels"]) == (False, [], [])
    assert good["defect_type"] == "good"
    refs = {rid: r["reference_uri"] for rid, r in records.items()}
    assert refs["mvtec/bottle/train/good/000"] == "mvtec/bottle/train/good/001.png"
    assert refs["mvtec/bottle/train/good/002"] == "mvtec/bottle/train/good/000.png"
    assert refs["mvtec/grid/train/good/000"] is None  # no other normal image
    assert refs["mvtec/grid/test/crack/000"] == "mvtec/grid/train/good/000.png"
    assert records["mvtec/grid/test/crack/000"]["labels"] == ["crack"]
    copied = out / "mvtec/bottle/test/broken_large/000.png"
    assert (
        copied.read_bytes() == (tmp_path / "mvtec_ad/bottle/test/broken_large/000.png").read_bytes()
    )


def test_mvtec_truncated_png_is_skipped_or_fails(tmp_path):
    root = make_mvtec(tmp_path / "in")
    bad_query = save_image(root / "bottle/test/broken_large/002.png", seed=13)
    save_mask(root / "bottle/ground_truth/broken_large/002_mask.png", ONE_PART)
    truncate(bad_query)
    bad_train = truncate(root / "bottle/train/good/000.png")
    result, records = build("mvtec", root, tmp_path / "out")
    assert result.records == 7
    assert set(result.skipped) == {str(bad_query), str(bad_train)}
    assert "mvtec/bottle/train/good/000" not in records
    # the unreadable training image is never a reference
    assert {r["reference_uri"] for r in records.values() if r["category"] == "bottle"} == {
        "mvtec/bottle/train/good/001.png",
        "mvtec/bottle/train/good/002.png",
    }
    with pytest.raises(DataBuildError, match="000.png"):
        build("mvtec", root, tmp_path / "out_fail", on_bad_image="fail")
    assert not (tmp_path / "out_fail/manifest.parquet").exists()


def test_mvtec_bad_masks_are_skipped(tmp_path):
    root = make_mvtec(tmp_path / "in")
    gt = root / "bottle/ground_truth/broken_large"
    save_image(root / "bottle/test/broken_large/003.png", seed=3)  # no mask at all
    save_image(root / "bottle/test/broken_large/004.png", seed=4)
    save_mask(gt / "004_mask.png", ONE_PART, size=(32, 32))  # another size
    save_image(root / "bottle/test/broken_large/005.png", seed=5)
    save_mask(gt / "005_mask.png", [])  # no defect pixel
    save_image(root / "bottle/test/broken_large/006.png", seed=6)
    (gt / "006_mask.png").write_bytes(b"not a png")
    result, records = build("mvtec", root, tmp_path / "out")
    assert result.records == 8
    assert set(result.skipped) == {str(gt / f"00{i}_mask.png") for i in (3, 4, 5, 6)}
    assert "32x32" in result.skipped[str(gt / "004_mask.png")]
    assert "no defect pixel" in result.skipped[str(gt / "005_mask.png")]


def test_mvtec_without_categories_names_the_folder(tmp_path):
    root = tmp_path / "raw"
    save_image(root / "images/000.png")
    with pytest.raises(DataBuildError, match=r"raw.*no MVTec AD category.*images/"):
        build("mvtec", root, tmp_path / "out")
    with pytest.raises(DataBuildError, match="does not exist"):
        build("mvtec", tmp_path / "missing", tmp_path / "out")


# -- VisA ------------------------------------------------------------------------------------


def write_csv(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def make_visa(root: Path) -> Path:
    images, masks = "candle/Data/Images", "candle/Data/Masks"
    for i in range(4):
        save_image(root / images / f"Normal/{i:04d}.JPG", seed=i)
    save_image(root / images / "Anomaly/000.JPG", seed=10)
    save_mask(root / masks / "Anomaly/000.png", TWO_PARTS)
    save_image(root / images / "Anomaly/001.JPG", seed=11)
    save_mask(root / masks / "Anomaly/001.png", ONE_PART)
    save_image(root / "pcb1/Data/Images/Normal/0000.JPG", seed=20)
    save_image(root / "pcb1/Data/Images/Anomaly/000.JPG", seed=21)
    save_mask(root / "pcb1/Data/Masks/Anomaly/000.png", ONE_PART)
    write_csv(
        root / "split_csv/1cls.csv",
        [
            "object,split,label,image,mask",
            f"candle,test,anomaly,{images}/Anomaly/001.JPG,{masks}/Anomaly/001.png",
            f"candle,train,normal,{images}/Normal/0002.JPG,",
            f"candle,train,normal,{images}/Normal/0001.JPG,",
            f"candle,test,normal,{images}/Normal/0000.JPG,",
            f"candle,train,normal,{images}/Normal/0003.JPG,",
            f"candle,test,anomaly,{images}/Anomaly/000.JPG,{masks}/Anomaly/000.png",
            "pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,",
            "pcb1,test,anomaly,pcb1/Data/Images/Anomaly/000.JPG,pcb1/Data/Masks/Anomaly/000.png",
        ],
    )
    write_csv(
        root / "candle/image_anno.csv",
        [
            "image,label,mask",
            f"{images}/Anomaly/000.JPG,chunk of wax missing,{masks}/Anomaly/000.png",
            f'{images}/Anomaly/001.JPG,"damaged corner,different colour spot",'
            f"{masks}/Anomaly/001.png",
        ],
    )
    return root


def test_visa_records(tmp_path):
    out = tmp_path / "out"
    result, records = build("visa", make_visa(tmp_path / "visa"), out)
    assert result.records == 8 and result.skipped == {}
    per_category = {
        c: sum(r["category"] == c for r in records.values()) for c in ("candle", "pcb1")
    }
    assert per_category == {"candle": 6, "pcb1": 2}
    a0 = records["visa/candle/Data/Images/Anomaly/000"]
    assert a0["source"] == "visa" and a0["image_uri"] == "visa/candle/Data/Images/Anomaly/000.JPG"
    assert a0["boxes"] == TWO_PARTS_BOXES
    assert a0["labels"] == ["chunk of wax missing"] * 2
    assert a0["defect_type"] == "chunk of wax missing"
    # the first sorted normal *train* image (0000 is a test image)
    assert a0["reference_uri"] == "visa/candle/Data/Images/Normal/0001.JPG"
    a1 = records["visa/candle/Data/Images/Anomaly/001"]
    assert a1["labels"] == ["damaged corner,different colour spot"]
    assert a1["boxes"] == ONE_PART_BOXES
    n1 = records["visa/candle/Data/Images/Normal/0001"]
    assert (n1["is_anomalous"], n1["defect_type"]) == (False, "good")
    assert n1["reference_uri"] == "visa/candle/Data/Images/Normal/0002.JPG"
    pcb = records["visa/pcb1/Data/Images/Anomaly/000"]
    assert (pcb["labels"], pcb["defect_type"]) == (["defect"], "defect")
    assert pcb["reference_uri"] == "visa/pcb1/Data/Images/Normal/0000.JPG"
    assert records["visa/pcb1/Data/Images/Normal/0000"]["reference_uri"] is None
    assert (out / "visa/candle/Data/Images/Anomaly/000.JPG").is_file()


def test_visa_without_split_csv_names_the_path(tmp_path):
    root = tmp_path / "visa"
    save_image(root / "candle/Data/Images/Normal/0000.JPG")
    with pytest.raises(DataBuildError, match=r"split_csv/1cls\.csv.*not found"):
        build("visa", root, tmp_path / "out")


def test_visa_csv_without_columns_names_what_it_found(tmp_path):
    root = make_visa(tmp_path / "visa")
    write_csv(root / "split_csv/1cls.csv", ["object,split,image", "candle,train,x.JPG"])
    with pytest.raises(
        DataBuildError,
        match=r"1cls\.csv: missing columns label, mask; found: "
        r"object, split, image",
    ):
        build("visa", root, tmp_path / "out")


def test_visa_bad_rows_are_skipped(tmp_path):
    root = make_visa(tmp_path / "visa")
    csv_path = root / "split_csv/1cls.csv"
    lines = csv_path.read_text().splitlines()
    lines += [
        "candle,test,broken,candle/Data/Images/Normal/0000.JPG,",
        "candle,test,anomaly,../x.JPG,",
        "candle,valid,normal,candle/Data/Images/Normal/0000.JPG,",
    ]
    write_csv(csv_path, lines)
    truncate(root / "candle/Data/Images/Normal/0001.JPG")
    result, records = build("visa", root, tmp_path / "out")
    assert result.records == 7
    assert set(result.skipped) == {
        f"{csv_path}:10",
        f"{csv_path}:11",
        f"{csv_path}:12",
        str(root / "candle/Data/Images/Normal/0001.JPG"),
    }
    assert "split 'valid' is not train or test" in result.skipped[f"{csv_path}:12"]
    ref = records["visa/candle/Data/Images/Anomaly/000"]["reference_uri"]
    assert ref == "visa/candle/Data/Images/Normal/0002.JPG"


# -- MMR-AD ----------------------------------------------------------------------------------


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def make_mmrad(root: Path) -> Path:
    bottle = root / "MVTec-AD/bottle"
    save_image(bottle / "train_good/000.png", seed=0)
    save_image(bottle / "train_good/001.png", seed=1)
    save_image(bottle / "test_good/000.png", seed=2)
    save_image(bottle / "test/broken/000.png", seed=3)  # boxes from bbox_annos.json
    save_image(bottle / "test/broken/001.png", seed=4)  # no entry: boxes from its mask
    save_mask(bottle / "ground_truth/broken/001_mask.png", TWO_PARTS)
    save_image(bottle / "test/crack/000.png", seed=5)  # an empty box: skipped
    write_json(
        bottle / "bbox_annos.json",
        {
            "test/broken/000.png": [
                {"bbox_2d": [5, 6, 70, 20], "label": "broken glass"},  # clipped to x2=64
                {"bbox": [30, 30, 40, 44]},
            ],
            "test/crack/000.png": {"boxes": [{"box": [10, 10, 10, 20], "type": "crack"}]},
            "test_good/000.png": [],
        },
    )
    write_json(
        bottle / "text_annos.json",
        {
            "test/broken/000.png": "<think>\nThe neck is broken.\n</think><answer>Yes.</answer>",
            "train_good/000.png": {"reasoning": "Looks normal."},
        },
    )
    write_json(bottle / "reference.json", {"test/broken/000.png": ["test_good/000.png", "x.png"]})
    candle = root / "VisA/candle"
    save_image(candle / "train_good/0000.png", seed=6)
    save_image(candle / "test/spot/000.png", seed=7)
    save_mask(candle / "ground_truth/spot/000_mask.png", ONE_PART)
    write_json(candle / "text_annos.json", {"000.png": {"cot": "A spot."}})  # by file name
    (root / "README.md").write_text("not a source")
    return root


def test_mmrad_records(tmp_path):
    root = make_mmrad(tmp_path / "MMR-AD")
    result, records = build("mmrad", root, tmp_path / "out")
    bbox_file = root / "MVTec-AD/bottle/bbox_annos.json"
    assert set(result.skipped) == {f"{bbox_file}[test/crack/000.png]"}
    assert "empty" in result.skipped[f"{bbox_file}[test/crack/000.png]"]
    assert sorted(records) == [
        "mmrad/MVTec-AD/bottle/test/broken/000",
        "mmrad/MVTec-AD/bottle/test/broken/001",
        "mmrad/MVTec-AD/bottle/test_good/000",
        "mmrad/MVTec-AD/bottle/train_good/000",
        "mmrad/MVTec-AD/bottle/train_good/001",
        "mmrad/VisA/candle/test/spot/000",
        "mmrad/VisA/candle/train_good/0000",
    ]
    b0 = records["mmrad/MVTec-AD/bottle/test/broken/000"]
    assert (b0["source"], b0["category"]) == ("MVTec-AD", "bottle")
    assert b0["image_uri"] == "mmrad/MVTec-AD/bottle/test/broken/000.png"
    assert b0["boxes"] == [[5.0, 6.0, 64.0, 20.0], [30.0, 30.0, 40.0, 44.0]]
    assert b0["labels"] == ["broken glass", "broken"]
    assert (b0["is_anomalous"], b0["defect_type"]) == (True, "broken")
    assert b0["reasoning"] == "The neck is broken."
    assert b0["reference_uri"] == "mmrad/MVTec-AD/bottle/test_good/000.png"
    b1 = records["mmrad/MVTec-AD/bottle/test/broken/001"]
    assert (b1["boxes"], b1["labels"]) == (TWO_PARTS_BOXES, ["broken", "broken"])
    assert b1["reasoning"] is None
    assert b1["reference_uri"] == "mmrad/MVTec-AD/bottle/train_good/000.png"
    t0 = records["mmrad/MVTec-AD/bottle/train_good/000"]
    assert (t0["reasoning"], t0["reference_uri"]) == (
        "Looks normal.",
        "mmrad/MVTec-AD/bottle/train_good/001.png",
    )
    spot = records["mmrad/VisA/candle/test/spot/000"]
    assert (spot["source"], spot["boxes"], spot["labels"]) == ("VisA", ONE_PART_BOXES, ["spot"])
    assert spot["reasoning"] == "A spot."
    assert records["mmrad/VisA/candle/train_good/0000"]["reference_uri"] is None
    assert records["mmrad/VisA/candle/train_good/0000"]["reasoning"] is None


def test_mmrad_published_splits_are_its_folders(tmp_path):
    _, records = build("mmrad", make_mmrad(tmp_path / "MMR-AD"), tmp_path / "out")
    assert ids_in(records, "train") == {
        "mmrad/MVTec-AD/bottle/train_good/000",
        "mmrad/MVTec-AD/bottle/train_good/001",
        "mmrad/VisA/candle/train_good/0000",
    }
    assert ids_in(records, "test") == set(records) - ids_in(records, "train")


def test_mmrad_list_shaped_bbox_file_with_prefixed_paths(tmp_path):
    root = tmp_path / "MMR-AD"
    cat = root / "src/cat"
    save_image(cat / "train_good/000.png")
    save_image(cat / "test/scratch/000.png", seed=1)
    write_json(
        cat / "bbox_annos.json",
        [
            {"image": "/data/MMR-AD/src/cat/test/scratch/000.png", "bbox": [1, 2, 3, 4]},
            {
                "image": "/data/MMR-AD/src/cat/test/scratch/000.png",
                "bbox": [5, 6, 7, 8],
                "label": "dent",
            },
        ],
    )
    write_json(cat / "reference.json", {"test/scratch/000.png": {"reference": "000.png"}})
    _, records = build("mmrad", root, tmp_path / "out")
    rec = records["mmrad/src/cat/test/scratch/000"]
    assert rec["boxes"] == [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]
    assert rec["labels"] == ["scratch", "dent"]
    assert rec["reference_uri"] == "mmrad/src/cat/train_good/000.png"


def test_mmrad_unknown_bbox_file_shape_shows_what_was_found(tmp_path):
    root = make_mmrad(tmp_path / "MMR-AD")
    bbox_file = write_json(
        root / "MVTec-AD/bottle/bbox_annos.json",
        {"version": 2, "objects": {"a": [1, 2]}},
    )
    with pytest.raises(DataBuildError) as err:
        build("mmrad", root, tmp_path / "out")
    message = str(err.value)
    assert str(bbox_file) in message
    assert "a dict of 2 entries" in message and "'version', 'objects'" in message
    assert "first value 2" in message


def test_mmrad_unknown_entry_shape_names_the_entry(tmp_path):
    root = make_mmrad(tmp_path / "MMR-AD")
    write_json(
        root / "MVTec-AD/bottle/bbox_annos.json",
        {"test/broken/000.png": {"polygon": [[1, 2], [3, 4], [5, 6]]}},
    )
    with pytest.raises(
        DataBuildError,
        match=r"bbox_annos\.json: entry 'test/broken/000\.png'.*"
        r"polygon",
    ):
        build("mmrad", root, tmp_path / "out")


def test_mmrad_keys_that_name_no_image_fail(tmp_path):
    root = make_mmrad(tmp_path / "MMR-AD")
    write_json(root / "VisA/candle/text_annos.json", {"other/place/1.png": "text"})
    with pytest.raises(DataBuildError, match=r"text_annos\.json: none of its 1 keys"):
        build("mmrad", root, tmp_path / "out")


def test_mmrad_without_categories_gives_a_hint(tmp_path):
    root = make_mmrad(tmp_path / "MMR-AD")
    with pytest.raises(DataBuildError, match="look like categories"):
        build("mmrad", root / "MVTec-AD", tmp_path / "out")


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (None, None),
        ("  plain text ", "plain text"),
        ("<think>inside</think><answer>Yes.</answer>", "inside"),
        ("before <answer>No.</answer>", "before"),
        ({"think": "a"}, "a"),
        ({"answer": "<think>b</think><answer>No.</answer>"}, "b"),
        ([{"text": ""}, {"cot": "c"}], "c"),
    ],
)
def test_reasoning_from_annotation(entry, expected):
    assert mmrad_layout._reasoning_from_annotation(entry) == expected


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (None, []),
        ([], []),
        ([1, 2, 3, 4], [([1, 2, 3, 4], None)]),
        ([[1, 2, 3, 4]], [([1, 2, 3, 4], None)]),
        ({"bbox_2d": [1, 2, 3, 4], "type": "hole"}, [([1, 2, 3, 4], "hole")]),
        (
            {
                "label": "dent",
                "boxes": [{"box": [1, 2, 3, 4]}, {"box": [0, 0, 1, 1], "label": "x"}],
            },
            [([1, 2, 3, 4], "dent"), ([0, 0, 1, 1], "x")],
        ),
    ],
)
def test_boxes_from_annotation(entry, expected):
    assert mmrad_layout._boxes_from_annotation(entry) == expected


def test_annotation_keys():
    assert mmrad_layout._annotation_key(".\\test\\crack\\000.PNG") == "test/crack/000"
    assert mmrad_layout._annotation_key("/abs/train_good/001.jpg") == "abs/train_good/001"


# -- split modes: published test sets kept, held-out categories never trained on ------------

MVTEC_TEST = {
    "mvtec/bottle/test/broken_large/000",
    "mvtec/bottle/test/broken_large/001",
    "mvtec/bottle/test/good/000",
    "mvtec/grid/test/crack/000",
}
VISA_TEST = {
    "visa/candle/Data/Images/Anomaly/000",
    "visa/candle/Data/Images/Anomaly/001",
    "visa/candle/Data/Images/Normal/0000",
    "visa/pcb1/Data/Images/Anomaly/000",
}


def test_mvtec_published_mode_is_the_archives_split(tmp_path):
    """The default for MVTec: the archive's test images exactly, val carved from train."""
    result, records = build("mvtec", make_mvtec(tmp_path / "in"), tmp_path / "out",
                            split={"val_fraction": 0.34})  # fmt: skip
    assert ids_in(records, "test") == MVTEC_TEST
    assert ids_in(records, "val") == {"mvtec/bottle/train/good/001"}
    assert not any(r["is_anomalous"] for r in records.values() if r["split"] != "test")
    assert result.unused == 0
    info = read_split_info(Storage(), str(tmp_path / "out"))
    assert (info["mode"], info["val_fraction"]) == ("published", 0.34)


def test_visa_published_mode_is_the_csv_split(tmp_path):
    _, records = build("visa", make_visa(tmp_path / "visa"), tmp_path / "out")
    assert ids_in(records, "test") == VISA_TEST
    assert ids_in(records, "train") == set(records) - VISA_TEST


@pytest.mark.parametrize("mode", ["published", "unseen"])
def test_held_out_category_tests_its_published_test_images_only(tmp_path, mode):
    """A held-out category sends exactly its published test images to test and its
    training images nowhere (still written as references); in unseen mode the seen
    categories' published test images train."""
    out = tmp_path / "out"
    result, records = build("mvtec", make_mvtec(tmp_path / "in"), out,
                            split={"mode": mode, "test_categories": ["grid"]})  # fmt: skip
    assert "mvtec/grid/train/good/000" not in records and result.unused == 1
    assert records["mvtec/grid/test/crack/000"]["reference_uri"] == "mvtec/grid/train/good/000.png"
    bottle_test = {rid for rid in MVTEC_TEST if "/bottle/" in rid}
    if mode == "published":
        assert ids_in(records, "test") == MVTEC_TEST
    else:
        assert ids_in(records, "test") == {"mvtec/grid/test/crack/000"}
        assert bottle_test <= ids_in(records, "train")
    assert manifest_stats(records.values())["train_test_overlap"] == (
        ["mvtec/bottle"] if mode == "published" else []
    )


def test_a_validation_category_trains_nothing_and_keeps_its_published_test_images(tmp_path):
    """Published mode: grid validates (its training image in val) and its published test
    image stays in the published test set; nothing of grid trains."""
    _, records = build("mvtec", make_mvtec(tmp_path / "in"), tmp_path / "out",
                       split={"val_categories": ["grid"], "val_fraction": 0.0})  # fmt: skip
    grid = {rid: r["split"] for rid, r in records.items() if "/grid/" in rid}
    assert grid == {"mvtec/grid/train/good/000": "val", "mvtec/grid/test/crack/000": "test"}
    assert (
        ids_in(records, "test") == MVTEC_TEST and ids_in(records, "val") == set(grid) - MVTEC_TEST
    )


@pytest.mark.parametrize("mode", ["published", "unseen"])
def test_held_out_visa_source_is_its_published_test_set(tmp_path, mode):
    _, records = build("visa", make_visa(tmp_path / "visa"), tmp_path / "out",
                       split={"mode": mode, "test_sources": ["visa"]})  # fmt: skip
    assert set(records) == VISA_TEST and ids_in(records, "test") == VISA_TEST


def test_unseen_mode_carves_test_fraction_from_seen_categories(tmp_path):
    _, records = build("visa", make_visa(tmp_path / "visa"), tmp_path / "out",
                       split={"mode": "unseen", "test_fraction": 0.5})  # fmt: skip
    assert ids_in(records, "test") and ids_in(records, "test") != VISA_TEST
    assert ids_in(records, "train") | ids_in(records, "test") == set(records)


def test_split_settings_that_cannot_hold_are_refused(tmp_path):
    with pytest.raises(ValidationError, match="split.test_fraction: refused in published mode"):
        DataBuildConfig(source="mvtec", input="x", split={"test_fraction": 0.2})
    with pytest.raises(ValidationError, match="'synthetic' has no published split"):
        DataBuildConfig(source="synthetic", split={"mode": "published"})
    assert DataBuildConfig(source="synthetic").split_mode == "unseen"
    assert DataBuildConfig(source="visa", input="x").split_mode == "published"


def test_held_out_names_that_match_nothing_fail_naming_them(tmp_path):
    root = make_mvtec(tmp_path / "in")
    with pytest.raises(
        DataBuildError,
        match=r"data\.split\.test_categories: 'bottel'.*names nothing.*categories: "
        r"mvtec/bottle, mvtec/grid",
    ):
        build("mvtec", root, tmp_path / "out", split={"test_categories": ["bottel", "grid"]})
    assert not (tmp_path / "out").exists()  # found before any image was written
    with pytest.raises(DataBuildError, match=r"data\.split\.test_sources: 'mvtek'"):
        build_dataset(DataBuildConfig(out=str(tmp_path / "synthetic"), split={
            "test_sources": ["mvtek"]}), Storage(), progress=False)  # fmt: skip
    assert not (tmp_path / "synthetic").exists()


def test_cluster_data_config_tests_unseen_categories(tmp_path):
    """configs/cluster/data.yaml on an MMR-AD-shaped tree: a test split, all of it from
    categories with no training image."""
    cluster = load_config(DataJobConfig, "configs/cluster/data.yaml").data
    assert cluster.split_mode == "unseen"
    _, records = build("mmrad", make_mmrad(tmp_path / "MMR-AD"), tmp_path / "out",
                       split=cluster.split.model_dump())  # fmt: skip
    assert ids_in(records, "test") == {"mmrad/VisA/candle/test/spot/000"}
    assert manifest_stats(records.values())["train_test_overlap"] == []


def test_readme_lists_what_the_mmrad_importer_reads():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    names = (
        mmrad_layout.BBOX_FILE, mmrad_layout.TEXT_FILE, mmrad_layout.REFERENCE_FILE,
        *mmrad_layout.IMAGE_FIELDS, *mmrad_layout.BOX_FIELDS, *mmrad_layout.BOXES_FIELDS,
        *mmrad_layout.LABEL_FIELDS, *mmrad_layout.TEXT_FIELDS, *mmrad_layout.REFERENCE_FIELDS,
    )  # fmt: skip
    assert "layout is inferred" in readme
    missing = [name for name in names if not re.search(rf"[`/]{re.escape(name)}`", readme)]
    assert missing == []


def test_data_stats_shows_the_split_mode_and_flags_overlap(tmp_path):
    from typer.testing import CliRunner

    from mmrad.cli import app

    out = tmp_path / "out"
    build("mvtec", make_mvtec(tmp_path / "in"), out, split={"test_categories": ["grid"]})
    shown = CliRunner().invoke(app, ["data", "stats", str(out)])
    assert shown.exit_code == 0, shown.output
    assert "split: mode published, held out: grid" in shown.output
    assert (
        "seen in both train and test (published splits: tested as seen categories): "
        "mvtec/bottle" in shown.output
    )
    as_json = json.loads(CliRunner().invoke(app, ["data", "stats", str(out), "--json"]).output)
    assert as_json["split"]["mode"] == "published"
    assert as_json["train_test_overlap"] == ["mvtec/bottle"]
