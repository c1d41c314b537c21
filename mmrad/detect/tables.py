"""``detections.parquet`` and ``detections.csv``: the same rows, one per file, in path
order, each file put whole (:meth:`~mmrad.storage.Storage.write_bytes`: temp file and
rename, or one S3 put), so a reader never finds half of one.

The CSV is for spreadsheets and ``grep``: list columns (``boxes``, ``labels``) are JSON
text, booleans ``true``/``false``, nulls empty cells. Arrow's CSV writer was rejected: it
refuses list columns.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mmrad.detect.results import DETECTION_SCHEMA

PARQUET_NAME = "detections.parquet"
CSV_NAME = "detections.csv"


def detections_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """The rows (dicts with every :data:`DETECTION_SCHEMA` column) as a table."""
    names = DETECTION_SCHEMA.names
    return pa.Table.from_pylist([{name: row[name] for name in names} for row in rows],
                                schema=DETECTION_SCHEMA)  # fmt: skip


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def csv_text(table: pa.Table) -> str:
    """The table as CSV with a header row (see the module docstring for the cells)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(table.column_names)
    for row in table.to_pylist():
        writer.writerow([csv_cell(row[name]) for name in table.column_names])
    return buffer.getvalue()


def csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)
