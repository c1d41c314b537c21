"""Reading back what W&B wrote in offline mode: its ``run-<id>.wandb`` file, a LevelDB-style
log of W&B's own protobuf records (W&B's Python package no longer ships a reader)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

FILE_HEADER = 7  # b":W&B", a 2-byte magic, a version byte
BLOCK = 32 * 1024
RECORD_HEADER = struct.Struct("<IHB")  # crc32, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    out, pending, pos = [], b"", FILE_HEADER
    while pos + RECORD_HEADER.size <= len(data):
        if BLOCK - pos % BLOCK < RECORD_HEADER.size:  # a block's tail is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = RECORD_HEADER.unpack_from(data, pos)
        pos += RECORD_HEADER.size
        if kind == 0 and length == 0:  # zero padding to the block's end
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        pending += data[pos : pos + length]
        pos += length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def offline_history(wandb_dir: Path, run_id: str) -> dict[int, dict]:
    """``step -> {key: value}`` over every offline run folder of ``run_id`` (a resumed
    run writes a second folder)."""
    steps: dict[int, dict] = {}
    for path in sorted(Path(wandb_dir).glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        for record in records(path):
            if record.WhichOneof("record_type") != "history":
                continue
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                   for item in record.history.item}  # fmt: skip
            step = row.pop("_step")
            steps.setdefault(step, {}).update(
                {k: v for k, v in row.items() if not k.startswith("_")}
            )
    return steps
