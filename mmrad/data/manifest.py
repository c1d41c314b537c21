"""Reading and writing ``manifest.parquet``: records plus image objects beside it."""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mmrad.data.schema import FIELDS, ManifestError, to_table, validate_records
from mmrad.storage import Storage, StorageError, join, parent, resolve

MANIFEST_NAME = "manifest.parquet"


def manifest_uri(uri: str) -> str:
    """Accept a data set folder or its manifest file."""
    return uri if uri.endswith(".parquet") else join(uri, MANIFEST_NAME)


def write_manifest(storage: Storage, records: Sequence[Mapping[str, Any]], uri: str) -> str:
    """Validate then write atomically; returns the manifest's URI."""
    target = manifest_uri(uri)
    validate_records(records, target)
    buffer = io.BytesIO()
    pq.write_table(to_table(list(records)), buffer)
    storage.write_bytes(target, buffer.getvalue())
    return target


def read_manifest_table(storage: Storage, uri: str, *, validate: bool = True) -> pa.Table:
    target = manifest_uri(uri)
    try:
        # Threaded reads from in-memory files make pyarrow 26 abort at interpreter exit.
        table = pq.read_table(io.BytesIO(storage.read_bytes(target)), use_threads=False)
    except StorageError:
        raise
    except Exception as err:
        raise ManifestError(f"{target}: not a readable Parquet manifest ({err})") from None
    missing = [name for name in FIELDS if name not in table.column_names]
    if missing:
        raise ManifestError(f"{target}: missing columns {', '.join(missing)}")
    table = table.select(list(FIELDS))
    if validate:
        validate_records(table.to_pylist(), target)
    return table


def read_manifest(storage: Storage, uri: str, *, validate: bool = True) -> list[dict[str, Any]]:
    """Records as dicts, with image and reference URIs made absolute."""
    target = manifest_uri(uri)
    records = read_manifest_table(storage, target, validate=validate).to_pylist()
    return absolutize(records, parent(target))


def absolutize(records: list[dict[str, Any]], base_dir: str) -> list[dict[str, Any]]:
    for record in records:
        record["image_uri"] = resolve(base_dir, record["image_uri"])
        if record.get("reference_uri"):
            record["reference_uri"] = resolve(base_dir, record["reference_uri"])
    return records


def defect_types_by_category(records: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Each category's known anomaly types (the domain-knowledge prompt): the box labels
    of all its records among ``records``."""
    found: dict[str, set[str]] = defaultdict(set)
    for record in records:
        found[str(record.get("category"))].update(record.get("labels") or [])
    return {category: sorted(labels) for category, labels in found.items()}
