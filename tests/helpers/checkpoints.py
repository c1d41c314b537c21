"""Reading a whole training checkpoint back, to compare a resumed run with an
uninterrupted one: the weights and AdamW's moments (DCP shards read whole), the
scheduler, every rank's RNG states and the trainer's state (step, data position)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmrad.storage import Storage, is_s3, join

SNAPSHOT = "checkpoint_manager_snapshot.json"


def latest_checkpoint(storage: Storage, run_uri: str) -> str:
    """The URI of the checkpoint a rerun of a run (local or S3) resumes from: the latest
    one Ray Train committed (its checkpoint manager's snapshot names it)."""
    snapshot = json.loads(storage.read_text(join(run_uri, SNAPSHOT)))
    return join(run_uri, snapshot["latest_checkpoint_result"]["checkpoint_dir_name"])


def committed_step(storage: Storage, run_uri: str) -> int:
    """The step of the latest checkpoint Ray Train committed (0 before the first)."""
    try:
        name = latest_checkpoint(storage, run_uri).rstrip("/").rsplit("/", 1)[1]
    except Exception:
        return 0
    return int(name.removeprefix("checkpoint_"))


def read_checkpoint(storage: Storage, uri: str) -> dict[str, Any]:
    """Every tensor and state a checkpoint holds, under flat names."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory(prefix="mmrad-ckpt-read-") as scratch:
        folder = Path(scratch) / "checkpoint"
        if is_s3(uri):
            storage.download_dir(uri, folder)
        else:
            folder = Path(uri)
        dcp_to_torch_save(folder / "weights", Path(scratch) / "whole.pt")
        whole = torch.load(Path(scratch) / "whole.pt", weights_only=True)
        flat = flatten(whole)
        flat["scheduler"] = torch.load(folder / "scheduler.pt", weights_only=True)
        for rng in sorted(folder.glob("rng_rank*.pt")):
            flat[rng.stem] = torch.load(rng, weights_only=True)
        flat["trainer_state"] = json.loads((folder / "trainer_state.json").read_text())
    return flat


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def same(a: Any, b: Any) -> bool:
    """Exact equality of tensors, arrays and nested RNG states."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(a, b)
        )
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The names of the entries that differ or exist in one checkpoint only."""
    return sorted(
        k for k in a.keys() | b.keys() if k not in a or k not in b or not same(a[k], b[k])
    )


def drop_optimizer_state(folder: Path) -> None:
    """Rewrite a local checkpoint as a resume that re-initialised AdamW would see it:
    every moment and step count zeroed (the negative control of the resume tests)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

    with tempfile.TemporaryDirectory(prefix="mmrad-ckpt-edit-") as scratch:
        whole_file = Path(scratch) / "whole.pt"
        dcp_to_torch_save(folder / "weights", whole_file)
        whole = torch.load(whole_file, weights_only=True)
        for state in whole["optim"]["state"].values():
            for name, value in state.items():
                state[name] = torch.zeros_like(value)
        torch.save(whole, whole_file)
        for item in (folder / "weights").iterdir():
            item.unlink()
        torch_save_to_dcp(whole_file, folder / "weights")
