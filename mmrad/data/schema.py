"""The record schema of ``manifest.parquet`` (docs/architecture.md) and its validation."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

from mmrad.task.geometry import is_valid_box

SPLITS = ("train", "val", "test")
NORMAL_DEFECT_TYPE = "good"

RECORD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("reference_uri", pa.string(), nullable=True),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("is_anomalous", pa.bool_(), nullable=False),
        pa.field("boxes", pa.list_(pa.list_(pa.float64(), 4)), nullable=False),
        pa.field("labels", pa.list_(pa.string()), nullable=False),
        pa.field("defect_type", pa.string(), nullable=False),
        pa.field("reasoning", pa.string(), nullable=True),
    ]
)
FIELDS = tuple(RECORD_SCHEMA.names)


class ManifestError(ValueError):
    """A record breaks the schema; the message names the manifest, the id and the field."""


def record_problems(record: Mapping[str, Any]) -> list[str]:
    """Every way ``record`` breaks the schema, as ``field: problem`` strings."""
    missing = [name for name in FIELDS if name not in record]
    if missing:
        return [f"{name}: missing" for name in missing]
    problems = []
    for name in ("id", "source", "category", "image_uri", "defect_type"):
        if not isinstance(record[name], str) or not record[name]:
            problems.append(f"{name}: must be a non-empty string")
    if record["split"] not in SPLITS:
        problems.append(f"split: {record['split']!r} is not one of {', '.join(SPLITS)}")
    width, height = record["width"], record["height"]
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        problems.append(f"width/height: must be positive integers, got {width}x{height}")
        return problems
    boxes, labels = list(record["boxes"]), list(record["labels"])
    for index, box in enumerate(boxes):
        box = list(box)
        if not is_valid_box(box, (width, height)):
            problems.append(
                f"boxes[{index}]: {box} is not inside the {width}x{height} image "
                "with x1<x2 and y1<y2"
            )
    if not all(isinstance(label, str) and label for label in labels):
        problems.append("labels: every label must be a non-empty string")
    if len(labels) != len(boxes):
        problems.append(f"labels: {len(labels)} labels for {len(boxes)} boxes (one per box)")
    if bool(record["is_anomalous"]) != bool(boxes):
        state = "anomalous" if record["is_anomalous"] else "normal"
        problems.append(f"is_anomalous: a {state} image with {len(boxes)} boxes")
    if not record["is_anomalous"] and record["defect_type"] != NORMAL_DEFECT_TYPE:
        problems.append(f"defect_type: normal images use {NORMAL_DEFECT_TYPE!r}")
    return problems


def validate_records(records: Iterable[Mapping[str, Any]], origin: str) -> None:
    """Raise :class:`ManifestError` on the first bad records (up to 5 listed), or duplicate ids."""
    seen: set[str] = set()
    errors = []
    for position, record in enumerate(records):
        rid = record.get("id", f"<row {position}>")
        errors.extend(f"id {rid!r}: {problem}" for problem in record_problems(record))
        if rid in seen:
            errors.append(f"id {rid!r}: duplicate id")
        seen.add(rid)
        if len(errors) >= 5:
            break
    if errors:
        raise ManifestError(f"{origin}: " + "; ".join(errors[:5]))


def to_table(records: list[Mapping[str, Any]]) -> pa.Table:
    columns = {name: [record[name] for record in records] for name in FIELDS}
    columns["boxes"] = [[list(map(float, box)) for box in boxes] for boxes in columns["boxes"]]
    return pa.table(columns, schema=RECORD_SCHEMA)
