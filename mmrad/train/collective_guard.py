"""A process-wide check that mmrad hands NCCL-ready tensors to every collective, even
where the collectives run on gloo.

On CPUs every tensor is on the CPU, so a reduction whose tensor was built without naming
a device runs fine here and raises at the first logged step on GPUs (NCCL has no CPU
tensors). With ``MMRAD_CHECK_COLLECTIVES=1`` in a worker's environment (the test suite
sets it for every process), :func:`install` wraps ``torch.distributed``'s tensor
collectives: a call made from mmrad's own code must pass tensors made by
:func:`mmrad.train.distributed.group_tensor`, which places them on the group's device,
and of a dtype NCCL reduces. Calls from torch itself (FSDP, DCP) are left alone: their
tensors live with the parameters they move.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mmrad.train.distributed import GROUP_TENSOR

ENV_FLAG = "MMRAD_CHECK_COLLECTIVES"
TENSOR_COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
    "reduce_scatter_tensor", "broadcast", "reduce", "all_to_all", "all_to_all_single",
    "gather", "scatter", "send", "recv", "isend", "irecv",
)  # fmt: skip
NCCL_DTYPES = {
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int8, torch.uint8, torch.bool,
}  # fmt: skip
MMRAD_DIR = str(Path(__file__).resolve().parents[1]) + os.sep


class CollectiveOnWrongDevice(RuntimeError):
    """mmrad passed a collective a tensor that NCCL would refuse."""


def tensors_of(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for item in value for t in tensors_of(item)]
    return []


def refusal(name: str, tensor: torch.Tensor) -> str | None:
    """Why NCCL-ready code would not pass ``tensor`` to collective ``name`` (or None)."""
    if not getattr(tensor, GROUP_TENSOR, False):
        return (
            f"torch.distributed.{name} got a {tensor.dtype} tensor on {tensor.device} that "
            "was not made by mmrad.train.distributed.group_tensor: under NCCL it would be "
            "on the CPU, which NCCL refuses"
        )
    if tensor.dtype not in NCCL_DTYPES:
        return f"torch.distributed.{name}: NCCL cannot reduce {tensor.dtype}"
    return None


def called_from_mmrad() -> bool:
    caller = sys._getframe(2).f_code.co_filename  # 0: here, 1: the wrapper
    return caller.startswith(MMRAD_DIR) and not caller.endswith("collective_guard.py")


def guarded(name: str, collective):
    @functools.wraps(collective)
    def check_then_run(*args, **kwargs):
        if called_from_mmrad():
            for tensor in tensors_of(list(args) + list(kwargs.values())):
                if (reason := refusal(name, tensor)) is not None:
                    raise CollectiveOnWrongDevice(reason)
        return collective(*args, **kwargs)

    check_then_run.__mmrad_guarded__ = True
    return check_then_run


def install() -> bool:
    """Wrap the collectives once per process when ``MMRAD_CHECK_COLLECTIVES=1``;
    returns whether the guard is active."""
    if os.environ.get(ENV_FLAG) != "1":
        return False
    for name in TENSOR_COLLECTIVES:
        collective = getattr(dist, name)
        if not getattr(collective, "__mmrad_guarded__", False):
            setattr(dist, name, guarded(name, collective))
    return True
