"""``detections.parquet`` and ``detections.csv``: the same rows, one per file, in path
order, each file put whole (:meth:`~mmrad.storage.Storage.write_bytes`: temp file and
rename, or one S3 put), so a reader never finds half of one.

The CSV is for spreadsheets and ``grep``: list columns (``boxes``, ``labels``) are JSON
text, booleans ``true``/``false``, nulls empty cells. Rows end in CRLF (RFC 4180):
Python's writer quotes a cell holding either character of the line ending, so a
carriage return inside a name or an answer cannot split a row. A text cell starting
with ``=``, ``+``, ``-``, ``@``, tab or carriage return gets a ``'`` in front (OWASP's
advice against CSV injection): file names and model answers are not to be trusted, and
a spreadsheet would run such a cell as a formula. The Parquet file keeps every value as
it is. Arrow's CSV writer was rejected: it refuses list columns.
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
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


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
    writer = csv.writer(buffer, lineterminator="\r\n")
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
    if isinstance(value, str):
        return inert_text(value)
    return str(value)


def inert_text(text: str) -> str:
    """``text`` as a spreadsheet shows it and never runs it: one that would start a
    formula gets a leading ``'`` (see the module docstring)."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text
