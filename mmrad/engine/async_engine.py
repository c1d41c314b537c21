"""The async side of the one vLLM wrapper: many concurrent callers, one continuously
batched engine (Ray Serve replicas use it).

:class:`AsyncEngine` owns a vLLM ``AsyncLLM``. Each caller awaits its own request while
the engine schedules every request in flight into the same forward passes, so N
concurrent requests cost far less than N sequential ones. Prompts, engine arguments and
results are the ones :class:`~mmrad.engine.engine.Engine` uses
(:mod:`~mmrad.engine.requests`, :mod:`~mmrad.engine.settings`,
:mod:`~mmrad.engine.sampling`).

What vLLM 0.32 does here: ``AsyncLLM`` always runs its engine core (scheduler + model)
in a child process and talks to it over ZMQ (it builds its client with
``make_async_mp_client`` directly); ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` does not change
that, and vLLM's in-process client is synchronous only (``make_client`` refuses asyncio
without multiprocessing: "not currently supported"). So unlike the in-process ``Engine``,
an ``AsyncEngine`` is two processes. On CPUs the variable still matters: with it unset
vLLM's CPU platform swaps the ``uni`` executor the settings choose for ``mp``, a third
process that runs the model; set (as here, process-wide, like ``Engine`` does) the core
process runs the model itself. The child is started with ``spawn``: a script that
builds an ``AsyncEngine`` at import time needs the ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from mmrad.config import EngineConfig, PixelBudget
from mmrad.engine.requests import ImageLike, ModelPrompts, Prompt, chat_request
from mmrad.engine.sampling import Completion, Sampling, completion_from_output
from mmrad.engine.settings import (
    engine_kwargs,
    freeze_startup_heap,
    on_gpu_default,
    prepare_cpu_environment,
)
from mmrad.task.prompt import PromptVariant


class AsyncEngine:
    """One vLLM ``AsyncLLM`` for the model at ``model_path``.

    Safe to call from many coroutines of one event loop at once (that is the point).
    Cancelling a caller (a client that hung up) aborts its request in the engine.
    ``log_stats`` turns on vLLM's periodic throughput log lines; ``ray_metrics`` exports
    vLLM's engine metrics (time to first token, queue length, KV-cache use, ...) through
    Ray's metrics agent, so they reach Ray's Prometheus endpoint. Images are resized to
    ``pixels`` whichever way they arrive (a prompt from :meth:`request`, or vLLM's own
    chat rendering).
    """

    def __init__(
        self,
        model_path: str,
        config: EngineConfig,
        pixels: PixelBudget,
        variant: PromptVariant = PromptVariant(),  # noqa: B008 (frozen, safe to share)
        *,
        log_stats: bool = False,
        ray_metrics: bool = False,
    ):
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.model_path = str(model_path)
        self.config = config
        self.pixels = pixels
        self.variant = variant
        self._prompts = ModelPrompts(self.model_path)
        self._prompts.processor  # noqa: B018 (load now, not in the first request)
        on_gpu = on_gpu_default()
        if not on_gpu:
            prepare_cpu_environment()  # the model runs in the core process: 2 processes, not 3
        args = AsyncEngineArgs(
            **engine_kwargs(config, self.model_path, on_gpu=on_gpu),
            mm_processor_kwargs={"size": pixels.processor_size()},
            # JSON answers (response_format) compact: a model cannot loop on whitespace.
            structured_outputs_config=StructuredOutputsConfig(
                backend="xgrammar", disable_any_whitespace=True
            ),
            disable_log_stats=not log_stats,
        )
        freeze_startup_heap()
        self._llm: Any = AsyncLLM.from_engine_args(args, stat_loggers=_stat_loggers(ray_metrics))

    # -- prompts ----------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The vLLM ``AsyncLLM`` (an ``EngineClient``: what vLLM's serving classes take)."""
        return self._vllm()

    @property
    def processor(self) -> Any:
        return self._prompts.processor

    def request(self, item: Prompt) -> dict[str, Any]:
        """The vLLM prompt dict of an inspection (a prompt dict is passed through)."""
        return self._prompts.request(item, self.variant, self.pixels)

    def chat_request(
        self, messages: Sequence[Mapping[str, Any]], images: Sequence[ImageLike]
    ) -> dict[str, Any]:
        """The vLLM prompt dict of chat messages with ``{"type": "image"}`` parts."""
        return chat_request(self.processor, messages, images, self.pixels)

    # -- sampling ---------------------------------------------------------------------

    async def outputs(
        self, item: Prompt, sampling: Sampling, *, stream: bool = False, lora: Any = None
    ) -> AsyncIterator[Any]:
        """vLLM ``RequestOutput``s of one prompt: with ``stream``, one per engine step
        holding what each of the ``sampling.n`` completions added (``outputs[i].index``
        says which), else a single final one holding all of them. ``lora``: a vLLM
        ``LoRARequest`` to answer with (``None``: the base weights)."""
        from vllm.sampling_params import RequestOutputKind

        params = sampling.to_vllm()
        params.output_kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
        prompt = self.request(item)
        request_id = uuid.uuid4().hex
        async for output in self._vllm().generate(prompt, params, request_id, lora_request=lora):
            yield output

    async def generate(
        self, item: Prompt, sampling: Sampling, lora: Any = None
    ) -> list[Completion]:
        """``sampling.n`` completions of one prompt (with scores when log-probs are
        asked for), in index order."""
        final = None
        async for output in self.outputs(item, sampling, lora=lora):
            final = output
        if final is None:
            raise RuntimeError("the engine returned no output")
        return [completion_from_output(o) for o in sorted(final.outputs, key=lambda o: o.index)]

    def unfinished_requests(self) -> int:
        """Requests the engine holds (running or waiting): a client that hung up must
        not leave its request here."""
        return self._vllm().get_num_unfinished_requests()

    # -- life cycle -------------------------------------------------------------------

    async def check_health(self) -> None:
        """Raises when the engine core died (Ray Serve then replaces the replica)."""
        await self._vllm().check_health()

    def close(self) -> None:
        """Shut the engine core process down. Safe to call twice."""
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()

    def _vllm(self) -> Any:
        if self._llm is None:
            raise RuntimeError("the engine is closed")
        return self._llm


def _stat_loggers(ray_metrics: bool) -> list[Any] | None:
    """vLLM's Ray stat logger (its metrics through ``ray.util.metrics``), or none."""
    if not ray_metrics:
        return None
    from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

    return [RayPrometheusStatLogger]
