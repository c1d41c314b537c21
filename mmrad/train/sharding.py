"""Sharding a Hugging Face model with FSDP2 (``fully_shard`` per block, then the root) or
FSDP1, on GPUs (NCCL) or CPUs (gloo), from weights that only rank 0 holds.

Rank 0 passes the loaded model, every other rank the same architecture on ``meta``
(:func:`mmrad.train.building.load_on_rank0`). FSDP2: every rank shards its (meta) model,
allocates its shards on ``device``, and ``set_model_state_dict`` broadcasts rank 0's
full weights tensor by tensor, each rank keeping its shard; buffers that are not in the
state dict (rotary frequencies) are broadcast after. FSDP1 on GPUs: ``sync_module_states``
does the same from a ``param_init_fn``; on CPUs (where FSDP1 cannot sync) the other
ranks materialise the model and receive rank 0's weights before wrapping. On GPUs no
rank but 0 ever holds the whole model, and no GPU more than its shard plus a block
being gathered.

Compute dtype: bf16 with ``fsdp.mixed_precision`` bf16 (``auto``: on GPUs), gradients
reduced in float32; the sharded weights keep their own dtype (float32 where trained).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from mmrad.train.distributed import broadcast_from_rank0

if TYPE_CHECKING:
    from mmrad.config import FSDPConfig


def block_classes(model: nn.Module) -> set[type]:
    """The transformer block classes HF marks as not to be split (decoder layers and
    vision blocks of Qwen2.5-VL)."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def blocks(model: nn.Module) -> list[nn.Module]:
    classes = block_classes(model)
    return [m for m in model.modules() if type(m) in classes]


def patch_heads(model: nn.Module) -> list[nn.Module]:
    """FSDP2 units of their own: a head's output is no output of the root module, whose
    backward hooks would not see it (FSDP1 handles it within the root's flat parameter)."""
    from mmrad.train.patch_head import PatchHead

    return [m for m in model.modules() if isinstance(m, PatchHead)]


def wants_bf16(config: FSDPConfig, on_gpu: bool) -> bool:
    return config.mixed_precision == "bf16" or (config.mixed_precision == "auto" and on_gpu)


def shard_model(
    model: nn.Module, config: FSDPConfig, on_gpu: bool, device: torch.device
) -> nn.Module:
    """Shard ``model`` (rank 0: loaded; others: on ``meta``) over the default process
    group onto ``device``; returns the module to train, holding rank 0's weights."""
    if config.version == 2:
        return _fsdp2(model, config, on_gpu, device)
    return _fsdp1(model, config, on_gpu, device)


def _fsdp2(model: nn.Module, config: FSDPConfig, on_gpu: bool, device: torch.device):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    loaded = dist.get_rank() == 0
    full_state = model.state_dict() if loaded else {}
    rank0_buffers = (
        {name: b.detach().clone() for name, b in model.named_buffers()} if loaded else {}
    )
    model.to("meta")  # rank 0 too: its full copy lives on in ``full_state`` until loaded
    kwargs = {}
    if wants_bf16(config, on_gpu):
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    for block in [*blocks(model), *patch_heads(model)]:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    model.to_empty(device=device)
    set_model_state_dict(
        model,
        full_state,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True),
    )
    for name, buffer in model.named_buffers():
        if loaded:
            buffer.copy_(rank0_buffers[name])
        broadcast_from_rank0(buffer)
    return model


def _fsdp1(model: nn.Module, config: FSDPConfig, on_gpu: bool, device: torch.device):
    import functools

    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    mixed = None
    if wants_bf16(config, on_gpu):
        mixed = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    wrap = functools.partial(ModuleWrapPolicy, block_classes(model))()
    if not on_gpu:  # FSDP1 syncs module states on GPUs only: broadcast them here
        if dist.get_rank():
            model.to_empty(device=device)
        for tensor in (*model.parameters(), *model.buffers()):
            broadcast_from_rank0(tensor.data)
    return FullyShardedDataParallel(
        model,
        auto_wrap_policy=wrap,
        mixed_precision=mixed,
        use_orig_params=True,  # LoRA: frozen and trainable parameters share flat groups
        device_id=device if on_gpu else torch.device("cpu"),
        sync_module_states=on_gpu,  # rank 0's weights and buffers to every rank
        param_init_fn=lambda module: module.to_empty(device=device, recurse=False),
    )
