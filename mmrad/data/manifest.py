"""Reading and writing ``manifest.parquet``: records plus image objects beside it."""

from __future__ import annotations

import hashlib
import io
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mmrad.data.schema import FIELDS, ManifestError, to_table, validate_records
from mmrad.storage import Storage, StorageError, join, parent, resolve

MANIFEST_NAME = "manifest.parquet"
SPLIT_METADATA_KEY = b"mmrad.split"


def manifest_uri(uri: str) -> str:
    """Accept a data set folder or its manifest file."""
    return uri if uri.endswith(".parquet") else join(uri, MANIFEST_NAME)


def write_manifest(
    storage: Storage,
    records: Sequence[Mapping[str, Any]],
    uri: str,
    split: Mapping[str, Any] | None = None,
) -> str:
    """Validate then write atomically; returns the manifest's URI. ``split``: how the
    splits were made (mode and held-out names), kept in the file's metadata."""
    target = manifest_uri(uri)
    validate_records(records, target)
    table = to_table(list(records))
    if split is not None:
        table = table.replace_schema_metadata({SPLIT_METADATA_KEY: json.dumps(dict(split))})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(target, buffer.getvalue())
    return target


def read_split_info(storage: Storage, uri: str) -> dict[str, Any] | None:
    """How the manifest's splits were made, as :func:`write_manifest` kept it; None for a
    manifest written without it."""
    target = manifest_uri(uri)
    try:
        schema = pq.read_schema(io.BytesIO(storage.read_bytes(target)))
    except StorageError:
        raise
    except Exception as err:
        raise ManifestError(f"{target}: not a readable Parquet manifest ({err})") from None
    found = (schema.metadata or {}).get(SPLIT_METADATA_KEY)
    return json.loads(found) if found else None


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


def in_split(record_split: str | None, split: str) -> bool:
    """Whether a record of ``record_split`` belongs to ``split``: ``"all"`` holds every
    record, and a record without a split (an unlabelled manifest) belongs to every one."""
    return split == "all" or record_split in (split, None)


def records_of_split(
    records: Sequence[dict[str, Any]], split: str, manifest: str, setting: str
) -> list[dict[str, Any]]:
    """The records of ``split``; none is a :class:`ManifestError` naming the manifest and
    ``setting``, what chose the split (a config key such as ``validation.split``)."""
    chosen = [record for record in records if in_split(record.get("split"), split)]
    if not chosen:
        raise ManifestError(f"data.manifest {manifest}: no records in split {split!r} ({setting})")
    return chosen


def spread_subset(records: Sequence[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """A fixed pseudo-random ``limit`` of ``records`` (the first by a hash of the id), so
    a small subset still spans categories and both classes; sorted by id."""
    chosen = sorted(records, key=lambda r: hashlib.sha256(str(r["id"]).encode()).digest())
    return sorted(chosen[:limit], key=lambda r: str(r["id"]))
