"""VisA importer.

Layout under ``config.input`` (the official archive, extracted)::

    split_csv/1cls.csv          columns object,split,label,image,mask
                                (label normal|anomaly; paths relative to the input folder;
                                mask empty on normal rows)
    <object>/image_anno.csv     optional; columns image,label,mask: the defect label text
                                of each anomalous image (e.g. "chunk of wax missing")
    <object>/Data/Images/...    the images and masks the CSV files point at

Every listed image becomes one record with the CSV's split as its published split
(``data.split.mode`` decides what becomes of it). The reference of an object is its first
(sorted) normal ``train`` image (the next one for that image itself). Every box of an
image gets that image's label text as is, or ``defect`` when ``image_anno.csv`` does not
name one.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mmrad.data.builders.base import BuildLog, DataBuildError, Draft, builder
from mmrad.data.builders.mvtec import (
    checked_normals,
    default_reference,
    input_folder,
    listing,
    make_draft,
    mask_boxes,
    query_size,
    safe_relative,
)
from mmrad.data.schema import NORMAL_DEFECT_TYPE

SOURCE = "visa"
SPLIT_CSV = Path("split_csv") / "1cls.csv"
SPLIT_COLUMNS = ("object", "split", "label", "image", "mask")
ANNO_CSV = "image_anno.csv"
ANNO_COLUMNS = ("image", "label")
DEFAULT_LABEL = "defect"
LABELS = {"normal": False, "anomaly": True}
SPLITS = ("train", "test")


def read_csv(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """``(line number, row)`` pairs with stripped header names and values; a
    :class:`DataBuildError` naming the file when it is unreadable or lacks a column."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [name.strip() for name in next(reader, [])]
            missing = [name for name in required if name not in header]
            if missing:
                found = ", ".join(header) if header else "no header (empty file)"
                raise DataBuildError(
                    f"{path}: missing columns {', '.join(missing)}; found: {found}"
                )
            rows = []
            for values in reader:
                if not any(v.strip() for v in values):
                    continue
                row = {
                    name: (values[i].strip() if i < len(values) else "")
                    for i, name in enumerate(header)
                }
                rows.append((reader.line_num, row))
            return rows
    except OSError as err:
        raise DataBuildError(f"{path}: cannot read ({err.strerror or err})") from None
    except (csv.Error, UnicodeDecodeError) as err:
        raise DataBuildError(f"{path}: not a readable CSV file ({err})") from None


def object_labels(root: Path, obj: str) -> dict[str, str]:
    """``image path -> label text`` from ``<object>/image_anno.csv``, {} when absent."""
    path = root / obj / ANNO_CSV
    if not path.is_file():
        return {}
    labels = {}
    for _, row in read_csv(path, ANNO_COLUMNS):
        image = safe_relative(row["image"])
        if image is not None:
            labels[image.as_posix()] = row["label"]
    return labels


@builder(SOURCE)
def build_visa(config: Any, build_log: BuildLog) -> Iterator[Draft]:
    """Records of every image listed in ``split_csv/1cls.csv`` under ``config.input``."""
    root = input_folder(config, SOURCE)
    split_csv = root / SPLIT_CSV
    if not split_csv.is_file():
        raise DataBuildError(
            f"{split_csv}: VisA split file not found (expected <input>/{SPLIT_CSV.as_posix()}); "
            f"{root} holds: {listing(root)}"
        )
    by_object: dict[str, list[tuple[str, dict[str, str]]]] = defaultdict(list)
    first_line: dict[str, int] = {}
    for line, row in read_csv(split_csv, SPLIT_COLUMNS):
        where = f"{split_csv}:{line}"
        image = safe_relative(row["image"])
        if safe_relative(row["object"]) is None or image is None:
            build_log.bad(where, f"needs an object and a relative image path, got {row}")
            continue
        if row["label"].lower() not in LABELS:
            build_log.bad(where, f"label {row['label']!r} is not normal or anomaly")
            continue
        if row["split"].lower() not in SPLITS:
            build_log.bad(where, f"split {row['split']!r} is not train or test")
            continue
        key = image.as_posix()
        if key in first_line:
            build_log.bad(where, f"{key} listed again (first on line {first_line[key]})")
            continue
        first_line[key] = line
        by_object[row["object"]].append((where, {**row, "image": key}))
    for obj in sorted(by_object):
        rows = sorted(by_object[obj], key=lambda item: item[1]["image"])
        yield from _visa_object(root, obj, rows, build_log)


def _visa_object(
    root: Path, obj: str, rows: list[tuple[str, dict[str, str]]], build_log: BuildLog
) -> Iterator[Draft]:
    labels = object_labels(root, obj)
    train_normal = [
        row["image"]
        for _, row in rows
        if not LABELS[row["label"].lower()] and row["split"].lower() == "train"
    ]
    normals, sizes = checked_normals(
        [root / p for p in train_normal], [f"{SOURCE}/{p}" for p in train_normal], build_log
    )
    for where, row in rows:
        path = root / row["image"]
        relative = f"{SOURCE}/{row['image']}"
        anomalous = LABELS[row["label"].lower()]
        split = row["split"].lower()
        normal_train = not anomalous and split == "train"
        size = query_size(sizes, relative, path, build_log, checked_before=normal_train)
        if size is None:
            continue
        boxes, defect = [], NORMAL_DEFECT_TYPE
        if anomalous:
            mask = safe_relative(row["mask"]) if row["mask"] else None
            if mask is None:
                build_log.bad(where, f"anomalous image {path} has no usable mask path")
                continue
            found = mask_boxes(root / mask, path, size, build_log)
            if found is None:
                continue
            boxes, defect = found, labels.get(row["image"], "").strip() or DEFAULT_LABEL
        yield make_draft(
            source=SOURCE,
            category=obj,
            relative=relative,
            path=path,
            size=size,
            boxes=boxes,
            labels=[defect] * len(boxes),
            defect_type=defect,
            reference=default_reference(normals, relative),
            published_split=split,
        )
