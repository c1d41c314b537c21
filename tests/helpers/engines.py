"""The engine settings tests give the tiny model."""

from __future__ import annotations

from typing import Any

from mmrad.config import EngineConfig


def small_engine_config(**overrides: Any) -> EngineConfig:
    """A small KV cache, 16 sequences and rank-8 LoRA slots; ``overrides`` win."""
    settings: dict[str, Any] = {
        "max_model_len": 1024,
        "kv_cache_bytes": 64 * 2**20,
        "max_num_seqs": 16,
        "enable_lora": True,
        "max_lora_rank": 8,
    }
    return EngineConfig(**(settings | overrides))
