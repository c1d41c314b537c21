"""vLLM engine arguments from an :class:`~mmrad.config.EngineConfig`, for CPUs and GPUs.

Pure: :func:`engine_kwargs` returns the keyword arguments of ``vllm.LLM(...)`` (the same
names ``AsyncEngineArgs`` takes) and touches nothing. The one process-wide setting a CPU
engine needs is applied separately by :func:`prepare_cpu_environment`.
"""

from __future__ import annotations

import os
from typing import Any

from mmrad.config import EngineConfig

CPU_ENVIRONMENT = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
"""Run vLLM's engine core in the calling process instead of a child process.

vLLM normally runs the engine core (scheduler + model) in a separate process and talks
to it over ZMQ. On a small CPU machine that second busy process competes with the
caller for the same few cores and every step pays a serialisation round trip; in-process
it is 5-10x faster on 2 cores. It also makes ``collective_rpc`` (weight reloads) a plain
function call, so tensors are not pickled. vLLM reads the variable when an engine is
created, so it must be set before ``vllm.LLM(...)``."""

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ``max_lora_rank`` values vLLM 0.32 accepts (``vllm.config.lora.MaxLoRARanks``)."""

MAX_LORAS = 1
"""Adapters in one batch: :class:`~mmrad.engine.engine.Engine` runs one adapter per
``generate`` call, so one slot is enough (older versions are evicted, least recently
used first, and reloaded from their directory if asked for again)."""


def on_gpu_default() -> bool:
    """Whether vLLM will run on a GPU here."""
    import torch

    return torch.cuda.is_available()


def engine_kwargs(
    config: EngineConfig, model_path: str, *, on_gpu: bool | None = None
) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM(**kwargs)`` / ``AsyncEngineArgs(**kwargs)``.

    ``on_gpu=None`` asks torch. On CPUs the engine is single-process (``uni``), eager
    (no graph capture), float32 for ``dtype="auto"`` (bfloat16 matmuls are slow or absent
    on many CPUs) and gets an explicit KV cache size; on GPUs the KV cache is what
    ``gpu_memory_utilization`` leaves, the model is split over ``tensor_parallel_size``
    GPUs and ``auto`` means bfloat16.
    """
    if on_gpu is None:
        on_gpu = on_gpu_default()
    kwargs: dict[str, Any] = {
        "model": model_path,
        "max_model_len": config.max_model_len,
        "max_num_seqs": config.max_num_seqs,
        "seed": config.seed,
        "limit_mm_per_prompt": {"image": config.max_images},
    }
    if on_gpu:
        kwargs |= {
            "dtype": "bfloat16" if config.dtype == "auto" else config.dtype,
            "gpu_memory_utilization": config.gpu_memory_utilization,
            "tensor_parallel_size": config.tensor_parallel_size,
        }
    else:
        kwargs |= {
            "dtype": "float32" if config.dtype == "auto" else config.dtype,
            "distributed_executor_backend": "uni",
            "enforce_eager": True,
            "kv_cache_memory_bytes": config.kv_cache_bytes,
        }
    if config.enable_lora:
        kwargs |= {
            "enable_lora": True,
            "max_lora_rank": lora_rank_slot(config.max_lora_rank),
            "max_loras": MAX_LORAS,
        }
    return kwargs


def lora_rank_slot(rank: int) -> int:
    """The smallest rank vLLM accepts that holds ``rank`` (vLLM takes only a few values)."""
    for slot in LORA_RANKS:
        if slot >= rank:
            return slot
    raise ValueError(f"max_lora_rank {rank} exceeds vLLM's largest, {LORA_RANKS[-1]}")


def prepare_cpu_environment() -> None:
    """Set :data:`CPU_ENVIRONMENT` in this process; call before the engine is created."""
    os.environ.update(CPU_ENVIRONMENT)
