"""Sharding a Hugging Face model with FSDP2 (``fully_shard`` per block, then the root) or
FSDP1, on GPUs (NCCL, optional bf16) or CPUs (gloo, float32)."""

from __future__ import annotations

import torch
from torch import nn

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


def wants_bf16(config: FSDPConfig, on_gpu: bool) -> bool:
    return config.mixed_precision == "bf16" or (config.mixed_precision == "auto" and on_gpu)


def shard_model(model: nn.Module, config: FSDPConfig, on_gpu: bool) -> nn.Module:
    """Shard ``model`` over the default process group; returns the module to train."""
    if config.version == 2:
        return _fsdp2(model, config, on_gpu)
    return _fsdp1(model, config, on_gpu)


def _fsdp2(model: nn.Module, config: FSDPConfig, on_gpu: bool) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if wants_bf16(config, on_gpu):
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    for block in blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _fsdp1(model: nn.Module, config: FSDPConfig, on_gpu: bool) -> nn.Module:
    import functools

    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    mixed = None
    if wants_bf16(config, on_gpu):
        mixed = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    wrap = functools.partial(ModuleWrapPolicy, block_classes(model))()
    return FullyShardedDataParallel(
        model,
        auto_wrap_policy=wrap,
        mixed_precision=mixed,
        use_orig_params=True,  # LoRA: frozen and trainable parameters share flat groups
        device_id=torch.cuda.current_device() if on_gpu else torch.device("cpu"),
    )
