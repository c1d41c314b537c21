"""Small collectives and step helpers that every Ray Train loop (SFT, GRPO learners)
shares: reductions of Python numbers over ranks, gradient clipping for FSDP1 and FSDP2,
peak memory, moving a batch to the device, checkpoint folder names.

Reductions run on the process group's own device: this process's GPU under NCCL (Ray
Train's backend on GPUs), the CPU under gloo. Rejected: ``TorchConfig(backend=
"cpu:gloo,cuda:nccl")``, which would let CPU tensors through on GPUs but opens a second
(gloo, TCP) communicator per group beside NCCL for a few numbers per step. Every tensor
mmrad hands to a collective is made by :func:`group_tensor`, which
:mod:`mmrad.train.collective_guard` checks for.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def barrier() -> None:
    """Wait for every rank (a no-op outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:06d}"


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def clip_gradients(model, params: list[torch.nn.Parameter], max_norm: float, version: int):
    """Clip the global gradient norm to ``max_norm``; returns the norm before clipping."""
    if version == 1:
        return float(model.clip_grad_norm_(max_norm))
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


GROUP_TENSOR = "_mmrad_group_tensor"
"""Attribute marking a tensor made by :func:`group_tensor` (see the collective guard)."""


def device_for_backend(backend: str) -> torch.device:
    """Where a collective of ``backend`` takes its tensors: NCCL has no CPU tensors."""
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def group_device() -> torch.device:
    """The default process group's collective device."""
    return device_for_backend(str(dist.get_backend()))


def group_tensor(values: list[float], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``values`` as a tensor on the process group's device, ready for a collective."""
    tensor = torch.tensor(values, dtype=dtype, device=group_device())
    setattr(tensor, GROUP_TENSOR, True)
    return tensor


def broadcast_from_rank0(tensor: torch.Tensor) -> None:
    """Rank 0's values of ``tensor`` (on the group's device, as NCCL needs) on every rank."""
    if tensor.device != group_device():
        raise ValueError(
            f"broadcast of a tensor on {tensor.device}; the group uses {group_device()}"
        )
    setattr(tensor, GROUP_TENSOR, True)
    dist.broadcast(tensor, src=0)


def all_sum(value: float) -> float:
    tensor = group_tensor([value])
    dist.all_reduce(tensor)
    return float(tensor.item())


def all_max(value: float) -> float:
    tensor = group_tensor([value])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def all_mean(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over ranks (one collective for the whole dict; every rank
    must pass the same keys)."""
    keys = sorted(values)
    tensor = group_tensor([float(values[k]) for k in keys])
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return dict(zip(keys, tensor.tolist(), strict=True))


def peak_memory_mb(on_gpu: bool) -> float:
    """This process's peak memory: GPU allocations on GPUs, resident set size on CPUs."""
    if on_gpu:
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
