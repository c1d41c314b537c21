"""Checkpoints of a sharded model: DCP shards of the trainable weights and the optimizer
(every rank writes its own part into its own folder; Ray Train merges the folders of one
report into one checkpoint), plus the loop's state and each rank's RNG.

With LoRA only the adapter is saved: the frozen base comes from the model path again.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

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

WEIGHTS_DIR = "weights"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """What the loop needs to continue exactly where it stopped."""

    step: int = 0  # optimizer steps committed, all epochs
    epoch: int = 0
    step_in_epoch: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    trained_ids: list[str] = field(default_factory=list)  # in commit order, every rank

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        return cls(**json.loads(text))


WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter's name as state dicts spell it, without FSDP1/compile wrapper parts."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


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
    state: TrainerState,
    rank: int,
    only_trainable: bool,
) -> None:
    """Collective: every rank calls it with its own (empty) ``folder``."""
    model_state, optim_state = _sharded_state(model, optimizer, only_trainable)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder / WEIGHTS_DIR)
    rng = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    torch.save(rng, folder / f"rng_rank{rank}.pt")
    if rank == 0:
        (folder / STATE_FILE).write_text(state.to_json())
        torch.save(scheduler.state_dict(), folder / "scheduler.pt")


def load_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    rank: int,
    only_trainable: bool,
) -> TrainerState:
    model_state, optim_state = _sharded_state(model, optimizer, only_trainable)
    loaded = {"model": model_state, "optim": optim_state}
    dcp.load(loaded, checkpoint_id=folder / WEIGHTS_DIR)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=loaded["model"],
        optim_state_dict=loaded["optim"],
        options=StateDictOptions(strict=not only_trainable),
    )
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))
    rng_file = folder / f"rng_rank{rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
    return TrainerState.from_json((folder / STATE_FILE).read_text())


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
