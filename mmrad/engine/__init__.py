"""The one vLLM wrapper that rollouts, evaluation, Ray Serve and annotation share.

- ``settings``: ``vllm.LLM`` arguments from an ``EngineConfig`` (CPU and GPU).
- ``requests``: an inspection (query, reference, category) → a multimodal vLLM prompt
  with images on the model grid.
- ``sampling``: ``Sampling`` in, ``Completion`` (tokens, log-probs, P(Yes) score) out.
- ``engine``: ``Engine``, one in-process ``vllm.LLM``: generate, score given completions,
  update weights in place, load LoRA adapters.
- ``async_engine``: ``AsyncEngine``, one vLLM ``AsyncLLM`` for many concurrent callers
  (continuous batching; Ray Serve replicas).

Importing this package does not import vLLM or torch; starting an ``Engine`` does.
"""

from mmrad.engine.async_engine import AsyncEngine
from mmrad.engine.engine import Engine, EngineStats, LoraHandle, Throughput
from mmrad.engine.requests import InspectionInput, QueryGrid, build_request, grid_of
from mmrad.engine.sampling import Completion, Sampling
from mmrad.engine.settings import engine_kwargs, prepare_cpu_environment

__all__ = [
    "AsyncEngine",
    "Completion",
    "Engine",
    "EngineStats",
    "InspectionInput",
    "LoraHandle",
    "QueryGrid",
    "Sampling",
    "Throughput",
    "build_request",
    "engine_kwargs",
    "grid_of",
    "prepare_cpu_environment",
]
