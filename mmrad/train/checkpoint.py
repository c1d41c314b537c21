"""Checkpoints of a sharded model: DCP shards of the trainable weights and the optimizer
(every rank writes its own part into its own folder; Ray Train merges the folders of one
report into one checkpoint), the scheduler, each rank's RNG, and ``trainer_state.json``:
the step and the job's own ``extra`` state.

With LoRA only the adapter is saved: the frozen base comes from the model path again.
"""

from __future__ import annotations

import json
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from mmrad.model.names import clean_name

WEIGHTS_DIR = "weights"
STATE_FILE = "trainer_state.json"
SCHEDULER_FILE = "scheduler.pt"


def trainable_keys(model: nn.Module) -> set[str]:
    return {clean_name(name) for name, p in model.named_parameters() if p.requires_grad}


def _filtered(model_state: dict, keep: set[str]) -> dict:
    return {k: v for k, v in model_state.items() if k in keep}


def _sharded_state(model: nn.Module, optimizer, only_trainable: bool) -> tuple[dict, dict]:
    """This rank's shards of the model (trainable weights only, with LoRA) and optimizer."""
    model_state, optim_state = get_state_dict(model, optimizer)
    if only_trainable:
        model_state = _filtered(model_state, trainable_keys(model))
    return model_state, optim_state


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    step: int,
    extra: dict[str, Any],
    rank: int,
    only_trainable: bool,
) -> None:
    """Collective: every rank calls it with its own (empty) ``folder``; rank 0's
    ``extra`` (JSON types) is kept."""
    model_state, optim_state = _sharded_state(model, optimizer, only_trainable)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder / WEIGHTS_DIR)
    torch.save(rng_states(), folder / rng_file(rank))
    if rank == 0:
        (folder / STATE_FILE).write_text(json.dumps({"step": step, "extra": extra}))
        torch.save(scheduler.state_dict(), folder / SCHEDULER_FILE)


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def rng_states() -> dict[str, Any]:
    """Every generator a step may draw from: Python's, NumPy's, torch's CPU one and, on
    GPUs, each device's; as tensors and plain Python containers only, so the file loads
    with ``torch.load(weights_only=True)`` (no pickled classes)."""
    numpy_state = np.random.get_state(legacy=False)
    states = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    saved = states["numpy"]
    np.random.set_state({
        "bit_generator": saved["bit_generator"],
        "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]},
        "has_gauss": saved["has_gauss"],
        "gauss": saved["gauss"],
    })  # fmt: skip
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def load_tensors(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never
    an arbitrary pickled object; a file that holds one (a checkpoint of an older mmrad,
    or one not written by mmrad) is refused, naming the file."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise ValueError(
            f"{path}: holds objects other than tensors and plain containers{what}; refused "
            "(read with torch.load weights_only=True: a checkpoint of an older mmrad, or not "
            "written by mmrad)"
        ) from None


def load_every_key(state: dict, weights: Path) -> None:
    """``dcp.load`` into ``state``, every one of whose keys the checkpoint must hold.

    Checked here rather than by DCP's strict mode, which takes a checkpoint holding keys
    that this rank's ``state`` lacks for a pre-2.4 one and then fails on its own list
    keys ("Missing key ... optim.param_groups"). That happens under FSDP1, which leaves a
    parameter out of a rank's sharded state when the rank holds none of its elements (a
    small one at the end of a flat parameter, such as the auxiliary patch head's bias)."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    saved = dcp.FileSystemReader(weights).read_metadata().state_dict_metadata
    missing = sorted(set(flatten_state_dict(state)[0]) - saved.keys())
    if missing:
        raise KeyError(f"{weights}: the checkpoint lacks {len(missing)} keys, e.g. {missing[:3]}")
    dcp.load(state, checkpoint_id=weights, planner=DefaultLoadPlanner(allow_partial_load=True))


def load_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    rank: int,
    only_trainable: bool,
) -> tuple[int, dict[str, Any]]:
    """Collective: restore the weights, optimizer, scheduler and this rank's RNG from
    ``folder``; returns the checkpoint's step and ``extra`` state."""
    step, extra = read_trainer_state(folder / STATE_FILE)
    model_state, optim_state = _sharded_state(model, optimizer, only_trainable)
    loaded = {"model": model_state, "optim": optim_state}
    load_every_key(loaded, folder / WEIGHTS_DIR)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=loaded["model"],
        optim_state_dict=loaded["optim"],
        options=StateDictOptions(strict=not only_trainable),
    )
    scheduler.load_state_dict(load_tensors(folder / SCHEDULER_FILE))
    rng = folder / rng_file(rank)
    if rng.exists():  # absent when the world size changed: a rank of its own has no past
        set_rng_states(load_tensors(rng))
    return step, extra


def read_trainer_state(path: Path | str, text: str | None = None) -> tuple[int, dict[str, Any]]:
    """``(step, extra)`` of a checkpoint's ``trainer_state.json`` (``text``: its content,
    when already read from an object store)."""
    state = json.loads(Path(path).read_text() if text is None else text)
    if not isinstance(state, dict) or "extra" not in state:
        raise ValueError(
            f"{path}: a checkpoint of an older mmrad (before SFT and GRPO shared one "
            "trainer core); it cannot be resumed: start a new run (another run.name)"
        )
    return state["step"], state["extra"]


def full_model_state(model: nn.Module, on_gpu: bool, only_trainable: bool = False) -> dict:
    """Collective: the unsharded state dict on CPU (on rank 0 only when on GPUs; on every
    rank on CPUs, where gathering with CPU offload crashes FSDP1)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=on_gpu)
    state = get_model_state_dict(model, options=options)
    if only_trainable:
        state = _filtered(state, trainable_keys(model))
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def load_weights_without_process_group(folder: Path, state_dict: dict) -> dict:
    """Read a checkpoint's model weights into ``state_dict`` (e.g. for export on one node)."""
    loaded = {"model": state_dict}
    dcp.load(loaded, checkpoint_id=folder / WEIGHTS_DIR, no_dist=True)
    return loaded["model"]
