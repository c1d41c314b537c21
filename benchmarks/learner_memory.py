"""Per-GPU memory of the Qwen2.5-VL-7B learners of configs/cluster/, LoRA and full fine-tuning.

Measures, on CPU in bf16, what one Qwen2.5-VL-7B decoder layer (transformers' own
``Qwen2_5_VLDecoderLayer``, sdpa attention, LoRA r=64 through peft on its 7 projections,
or every weight trained) and one vision block (``Qwen2_5_VLVisionBlock``) keep for
backward, per token (per patch), with and without activation checkpointing, and the peak
of one layer's backward; then prints the memory of one learner GPU for the learners of
``configs/cluster/`` (sft.yaml, grpo.yaml, tune.yaml's trials) as they are configured,
LoRA and full fine-tuning, against a 70 GB budget on an 80 GB GPU. The configs' memory
comments quote its figures. Runs in about a minute on 2 cores; no GPU, no Ray.

    .venv/bin/python benchmarks/learner_memory.py [--tokens 512] [--json PATH]

The model of memory (one learner rank of N = learners.num_workers; GB = 1e9 bytes):

- parameters: FSDP2 shards every weight over the N ranks. LoRA: frozen base weights in
  bf16 (2 B/param) + adapters in fp32 (4 B). Full: fp32 master weights (4 B); GRPO with
  kl_beta > 0 also keeps a frozen bf16 reference copy (2 B), sharded (LoRA's reference is
  the same model with the adapter disabled: no copy).
- gradients: fp32, sharded: 4 B per trained parameter / N.
- optimizer states: AdamW m and v in fp32: 8 B per trained parameter / N.
- activations: what one forward pass (micro-batch) keeps for backward, charged at the
  learner's token budget (``micro_batch_tokens``, the most one pass may hold; without one,
  micro_batch_size samples of the longest length): the measured bytes per token per layer
  (plain: every layer's saved tensors; checkpointed: each layer's input) x 28 layers, plus
  the measured peak of one layer's backward (with checkpointing: its recompute), plus the
  final norm. The vision tower, where autograd records it (full fine-tuning; LoRA with
  see :func:`vision_in_graph`): 32 blocks per patch likewise (measured
  with trained weights: an upper bound for the frozen tower), plus patch embedding and
  merger. The LM and vision backward peaks do not overlap (the vision tower's backward
  runs after the last decoder layer's): the larger counts.
- logits: log-probs come from the final hidden states at the label (SFT) or completion
  (GRPO) positions only, ``logprob_chunk_tokens`` at a time, each chunk recomputed in
  backward (``mmrad.train.token_logprobs``): the measured peak bytes per chunk token
  (bf16 and fp32 logits, tempered log-softmax, gradients, over the 152k vocabulary) x
  min(chunk, label tokens), plus the gathered hidden states. Counted on top of the
  activations (they overlap the LM backward peak only partly: conservative).
- buffers: FSDP2's root unit (embeddings, lm_head, vision patch embedding and merger)
  stays all-gathered in bf16 from forward to the end of backward; 2 decoder blocks
  gathered at once (one computing, one prefetched); one block's unsharded gradients (bf16
  computed, fp32 reduced) and, for full fine-tuning, the root's bf16 gradients, held until
  the end of backward; rotary tables, the padding mask and the micro-batch's pixels;
  2 GB for the CUDA context and NCCL; 10 % of activations + logits for allocator
  fragmentation. Transients that run when the activations are gone (the root's fp32
  reduce-scatter at the end of backward, AdamW's foreach temporaries, no-grad forwards for
  old/reference log-probs) are smaller than what they replace and are not added.

A sample: ``[reference image,] query image`` at ``model.pixels.max_pixels`` (at most
max_pixels/784 merged tokens each: 334 at 512x512, 4 patches per token), the prompt text
(``mmrad.task.prompt`` at ~3.5 characters per token plus the chat template) and the
answer: GRPO ``rollout.max_tokens``; SFT at most ``SFT_ANSWER_TOKENS`` (the longest
chain-of-thought ``mmrad annotate`` writes).

Measured vs estimated: the per-token/per-patch bytes are measured with
``torch.autograd.graph.saved_tensors_hooks`` (tensors deduplicated by storage, weights and
tables shared by all layers left out) and the backward peaks with a dispatch mode that
tracks live storages (parameter gradients left out), on CPU kernels, adapters in bf16 as
FSDP2's bf16 mixed precision hands them to the forward pass. CUDA's sdpa kernels save the
same O(tokens) tensors (output, log-sum-exp), so the figures carry over. Decoder layers
are measured with a 4D padding mask, the case of a padded micro-batch: sdpa then repeats
the 4 KV heads to 28 and converts the mask to bf16 T x T per layer (bytes per token
growing with the padded length, fitted from two lengths); without padding they save
less. Everything else (sharded states, buffers, the sample's token counts, the SFT answer
length) is the arithmetic and the assumptions above.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint

GB = 1e9
BUDGET_GB = 70.0  # of an 80 GB GPU: the rest is headroom
RUNTIME_GB = 2.0  # CUDA context + NCCL buffers
FRAGMENTATION = 0.10  # of activations + logits
PREFETCHED_BLOCKS = 2
SFT_ANSWER_TOKENS = 768  # mmrad annotate's sampling max_tokens bounds the CoT answers
CHARS_PER_TOKEN = 3.5
CHAT_TEMPLATE_TOKENS = 30  # system turn, role markers, vision start/end per image
LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "cluster"


# --- the architecture -------------------------------------------------------------------


def qwen25vl_7b_config():
    """Qwen2.5-VL-7B-Instruct's config (as in its config.json), sdpa attention."""
    from transformers import Qwen2_5_VLConfig

    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 128000,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [16, 24, 24],
            },
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 3584,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        tie_word_embeddings=False,
    )
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    return config


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    vision: int
    decoder_block: int  # one decoder layer
    vision_block: int
    root: int  # what no block holds: embeddings, lm_head, patch embedding, merger, norms
    lora: int  # LoRA on the 7 projections of every decoder layer
    lora_block: int
    layers: int
    vision_blocks: int
    full_attention_blocks: int  # vision blocks with full (not window) attention


def lora_parameters(hidden: int, intermediate: int, heads: int, kv_heads: int, r: int) -> int:
    """LoRA parameters of one decoder layer: r x (in + out) per projection."""
    head_dim = hidden // heads
    shapes = [
        (hidden, hidden),  # q
        (hidden, kv_heads * head_dim),  # k
        (hidden, kv_heads * head_dim),  # v
        (hidden, hidden),  # o
        (hidden, intermediate),  # gate
        (hidden, intermediate),  # up
        (intermediate, hidden),  # down
    ]
    return sum(r * (fan_in + fan_out) for fan_in, fan_out in shapes)


def parameter_counts(config, r: int) -> ParameterCounts:
    """Counts from the real model class built on the meta device (no memory)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    text = config.text_config
    layers, blocks = model.model.language_model.layers, model.model.visual.blocks
    decoder_block, vision_block = count(layers[0]), count(blocks[0])
    total = count(model)
    lora_block = lora_parameters(
        text.hidden_size,
        text.intermediate_size,
        text.num_attention_heads,
        text.num_key_value_heads,
        r,
    )
    return ParameterCounts(
        total=total,
        vision=count(model.model.visual),
        decoder_block=decoder_block,
        vision_block=vision_block,
        root=total - len(layers) * decoder_block - len(blocks) * vision_block,
        lora=lora_block * len(layers),
        lora_block=lora_block,
        layers=len(layers),
        vision_blocks=len(blocks),
        full_attention_blocks=len(config.vision_config.fullatt_block_indexes),
    )


# --- measuring --------------------------------------------------------------------------


def storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def saved_bytes(run: Callable[[], Any], shared: set[int]) -> int:
    """Bytes autograd keeps for backward while ``run()`` builds its graph: every saved
    tensor's storage once, leaving out the storages in ``shared`` (weights, tables)."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = storage_key(tensor)
        if key not in shared:
            seen[key] = tensor.untyped_storage().nbytes()
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        output = run()
    del output
    return sum(seen.values())


class LiveStorages(TorchDispatchMode):
    """Tracks the storages the ops under it allocate (views of existing storages are not
    allocations) and when they die: :meth:`peak` is the most bytes alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[list[int]] = []  # [bytes, born, died (-1 while alive)]
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}  # cdata -> (ref, record)
        self.step = 0

    def _sweep(self) -> None:
        # A storage found dead after op k died after op k-1 (ops keep their inputs alive):
        # it is not counted at step k, when op k's outputs are born.
        for key, (ref, index) in list(self.live.items()):
            if ref.expired():
                self.records[index][2] = self.step
                del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.step += 1
        self._sweep()
        inputs = {
            t.untyped_storage()._cdata
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self.live or key in inputs:
                continue
            self.records.append([storage.nbytes(), self.step, -1])
            self.live[key] = (StorageWeakRef(storage), len(self.records) - 1)
        return out

    def peak(self, leave_out: list[torch.Tensor] = ()) -> int:
        """Most bytes alive at once, not counting the storages of ``leave_out`` (tensors
        still alive at the end, e.g. parameter gradients)."""
        self.step += 1
        self._sweep()
        keys = {t.untyped_storage()._cdata for t in leave_out if t is not None}
        excluded = {index for key, (_, index) in self.live.items() if key in keys}
        delta = [0] * (self.step + 2)
        for index, (nbytes, born, died) in enumerate(self.records):
            if index in excluded:
                continue
            delta[born] += nbytes
            delta[died if died >= 0 else self.step + 1] -= nbytes
        peak = running = 0
        for change in delta:
            running += change
            peak = max(peak, running)
        return peak


def backward_peak(output: torch.Tensor, params: list[nn.Parameter]) -> int:
    """Peak bytes allocated during ``output.backward()`` (recomputation included),
    leaving out the parameters' gradients (counted as gradients, not activations)."""
    for param in params:
        param.grad = None
    grad = torch.randn_like(output)
    with LiveStorages() as tracker:
        output.backward(grad)
    return tracker.peak([p.grad for p in params if p.grad is not None])


@dataclass(frozen=True)
class BlockBytes:
    """One block's memory for backward, bytes per token (per patch for vision blocks).
    ``per_padded_token``: growth of ``plain`` and ``backward_peak`` per token of padded
    sequence length (the padding mask's T x T part); 0 where there is none."""

    name: str
    plain: float  # saved for backward, no checkpointing
    checkpointed: float  # saved for backward, checkpointing the block (its inputs)
    plain_backward_peak: float  # allocated during the block's backward, no checkpointing
    recompute_peak: float  # allocated during the block's recompute + backward
    per_padded_token: float = 0.0
    measured_at: int = 0  # tokens (patches) of the measurement


def set_trainable(module: nn.Module, trainable: str) -> list[nn.Parameter]:
    """``"lora"``: only adapters train; ``"full"``: every weight trains."""
    params = []
    for name, param in module.named_parameters():
        param.requires_grad_(trainable == "full" or "lora_" in name)
        if param.requires_grad:
            params.append(param)
    return params


def add_lora(layer: nn.Module, r: int, alpha: int, dropout: float) -> nn.Module:
    """peft LoRA on the layer's 7 projections, adapters in bf16 as FSDP2's bf16 mixed
    precision hands them to the forward pass (their fp32 masters are sharded)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(LORA_PROJECTIONS)
    )
    return inject_adapter_in_model(config, layer).to(torch.bfloat16)


def set_lora_dropout(layer: nn.Module, dropout: float) -> None:
    for module in layer.modules():
        if hasattr(module, "lora_dropout") and isinstance(module.lora_dropout, nn.ModuleDict):
            for key in module.lora_dropout:
                module.lora_dropout[key] = nn.Dropout(dropout) if dropout else nn.Identity()


def materialize(factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()``'s module in bf16 on CPU, built on ``meta`` and filled with small
    uniform weights (norm weights 1): fast, and values do not change what is saved."""
    with torch.device("meta"):
        module = factory()
    module = module.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.uniform_(-0.02, 0.02)
    return module.train()


def build_decoder_layer(text_config) -> nn.Module:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer

    return materialize(lambda: Qwen2_5_VLDecoderLayer(text_config, layer_idx=0))


def decoder_inputs(text_config, tokens: int, padded: bool):
    """A (1, tokens, hidden) input, its rotary (cos, sin) and a 4D causal mask when
    ``padded`` (what a micro-batch with padding gets; None lets sdpa run causal)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

    hidden = torch.randn(1, tokens, text_config.hidden_size, dtype=torch.bfloat16)
    positions = torch.arange(tokens)[None].expand(3, 1, tokens)
    cos, sin = Qwen2_5_VLRotaryEmbedding(text_config)(hidden, positions)
    mask = torch.ones(tokens, tokens, dtype=torch.bool).tril()[None, None] if padded else None
    return hidden, (cos, sin), mask


def measure_decoder_layer(
    layer: nn.Module, text_config, tokens: int, trainable: str, name: str, padded: bool = True
) -> BlockBytes:
    """Saved bytes per token (plain and checkpointed, at ``tokens`` and half of it for the
    padding mask's slope) and the two backward peaks of ``layer``."""
    params = set_trainable(layer, trainable)
    weights = {storage_key(p) for p in layer.parameters()}

    def plain_saved(length: int) -> float:
        hidden, rotary, mask = decoder_inputs(text_config, length, padded)
        shared = weights | {storage_key(t) for t in rotary}
        hidden.requires_grad_(True)
        return saved_bytes(
            lambda: layer(hidden, attention_mask=mask, position_embeddings=rotary), shared
        )

    half = tokens // 2
    full_bytes, half_bytes = plain_saved(tokens), plain_saved(half)
    slope = max(0.0, (full_bytes / tokens - half_bytes / half) / (tokens - half))

    hidden, rotary, mask = decoder_inputs(text_config, tokens, padded)
    hidden.requires_grad_(True)
    shared = weights | {storage_key(t) for t in rotary}
    run = lambda x: layer(x, attention_mask=mask, position_embeddings=rotary)  # noqa: E731
    checkpointed = saved_bytes(lambda: checkpoint(run, hidden, use_reentrant=False), shared)
    recompute = backward_peak(checkpoint(run, hidden, use_reentrant=False), params)
    plain_peak = backward_peak(run(hidden), params)
    return BlockBytes(
        name=name,
        plain=full_bytes / tokens,
        checkpointed=checkpointed / tokens,
        plain_backward_peak=plain_peak / tokens,
        recompute_peak=recompute / tokens,
        per_padded_token=slope,
        measured_at=tokens,
    )


def measure_vision_block(vision_config, patches: int, full_attention: bool) -> BlockBytes:
    """One vision block, every weight trained, on one image of ``patches`` patches:
    window attention (windows of (window_size / patch_size)^2 patches) or full attention."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VLVisionBlock,
        Qwen2_5_VLVisionRotaryEmbedding,
    )

    block = materialize(lambda: Qwen2_5_VLVisionBlock(vision_config))
    params = set_trainable(block, "full")
    side = math.isqrt(patches)
    rows = torch.arange(patches) // side
    positions = torch.stack([rows, torch.arange(patches) % side], dim=-1)
    hidden = torch.randn(patches, vision_config.hidden_size, dtype=torch.bfloat16)
    rotary = Qwen2_5_VLVisionRotaryEmbedding(vision_config)(hidden, positions)
    window = (vision_config.window_size // vision_config.patch_size) ** 2
    step = patches if full_attention else window
    cu_seqlens = torch.tensor([*range(0, patches, step), patches], dtype=torch.int32)
    hidden.requires_grad_(True)
    shared = {storage_key(p) for p in block.parameters()} | {storage_key(t) for t in rotary}
    run = lambda x: block(x, cu_seqlens=cu_seqlens, position_embeddings=rotary)  # noqa: E731
    plain = saved_bytes(lambda: run(hidden), shared)
    checkpointed = saved_bytes(lambda: checkpoint(run, hidden, use_reentrant=False), shared)
    recompute = backward_peak(checkpoint(run, hidden, use_reentrant=False), params)
    plain_peak = backward_peak(run(hidden), params)
    kind = "full attn" if full_attention else f"window attn ({window} patches)"
    return BlockBytes(
        name=f"vision block, {kind}, full",
        plain=plain / patches,
        checkpointed=checkpointed / patches,
        plain_backward_peak=plain_peak / patches,
        recompute_peak=recompute / patches,
        measured_at=patches,
    )


def measure_vision_ends(vision_config, patches: int) -> float:
    """Saved bytes per patch of the patch embedding and the merger (not checkpointed),
    every weight trained."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionPatchEmbed,
        Qwen2_5_VLPatchMerger,
    )

    embed = Qwen2_5_VisionPatchEmbed(
        patch_size=vision_config.patch_size,
        temporal_patch_size=vision_config.temporal_patch_size,
        in_channels=vision_config.in_channels,
        embed_dim=vision_config.hidden_size,
    ).to(torch.bfloat16)
    merger = Qwen2_5_VLPatchMerger(
        dim=vision_config.out_hidden_size,
        context_dim=vision_config.hidden_size,
        spatial_merge_size=vision_config.spatial_merge_size,
    ).to(torch.bfloat16)
    shared = {storage_key(p) for m in (embed, merger) for p in m.parameters()}
    pixels = torch.randn(
        patches,
        vision_config.in_channels * vision_config.temporal_patch_size * vision_config.patch_size**2,
    )
    return saved_bytes(lambda: merger(embed(pixels)), shared) / patches


def measure_final_norm(text_config, tokens: int) -> float:
    """Saved bytes per token of the language model's final RMSNorm."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm

    norm = Qwen2_5_VLRMSNorm(text_config.hidden_size, eps=text_config.rms_norm_eps)
    norm = norm.to(torch.bfloat16)
    hidden = torch.randn(1, tokens, text_config.hidden_size, dtype=torch.bfloat16)
    hidden.requires_grad_(True)
    return saved_bytes(lambda: norm(hidden), {storage_key(norm.weight)}) / tokens


def reference_chunk(hidden, weight, targets, temperature, with_raw, with_entropy):
    """Stand-in for ``mmrad.train.token_logprobs.chunk_statistics`` where that is missing:
    lm_head in bf16, tempered log-softmax in fp32, the targets' log-probs."""
    logits = (hidden @ weight.T).float()
    tempered = torch.log_softmax(logits / temperature, dim=-1)
    return tempered.gather(-1, targets[:, None]).squeeze(-1)


def chunk_function() -> tuple[Callable, str]:
    """mmrad's own chunk of log-prob statistics (what SFT and the GRPO learner run)."""
    try:
        from mmrad.train.token_logprobs import chunk_statistics
    except ImportError:
        return reference_chunk, "reference_chunk"
    return chunk_statistics, "mmrad.train.token_logprobs.chunk_statistics"


def measure_logprob_chunk(hidden_size: int, vocab: int, tokens: int) -> float:
    """Peak bytes per chunk token of one checkpointed log-prob chunk as training runs it
    (log-probs at temperature 1), forward and backward (the frozen bf16 lm_head weight
    left out: it is the root unit's, under buffers)."""
    chunk, _ = chunk_function()
    weight = torch.empty(vocab, hidden_size, dtype=torch.bfloat16).uniform_(-0.02, 0.02)
    hidden = torch.randn(tokens, hidden_size, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    args = (hidden, weight, targets, 1.0, False, False)
    with LiveStorages() as forward:
        stats = checkpoint(chunk, *args, use_reentrant=False)
    with LiveStorages() as backward:
        stats[..., 0].sum().backward()
    return max(forward.peak(), backward.peak()) / tokens


@dataclass(frozen=True)
class Measurements:
    decoder: dict[str, BlockBytes]  # key: "lora-<dropout>" or "full"
    vision_window: BlockBytes
    vision_full: BlockBytes
    vision_ends: float  # per patch
    final_norm: float  # per token
    logprob_chunk: float  # per chunk token
    tokens: int
    seconds: float = 0.0

    def decoder_for(self, trainable: str, dropout: float) -> BlockBytes:
        return self.decoder["full" if trainable == "full" else f"lora-{dropout:g}"]


def measure_all(config, tokens: int, lora_r: int, lora_alpha: int, dropouts: list[float]):
    """Every measurement the table needs, at Qwen2.5-VL-7B width."""
    started = time.perf_counter()
    text, vision = config.text_config, config.vision_config
    layer = build_decoder_layer(text)
    decoder = {"full": measure_decoder_layer(layer, text, tokens, "full", "decoder layer, full")}
    layer = add_lora(layer, lora_r, lora_alpha, 0.0)
    for dropout in sorted(set(dropouts)):
        set_lora_dropout(layer, dropout)
        name = f"decoder layer, LoRA r={lora_r}, dropout {dropout:g}"
        decoder[f"lora-{dropout:g}"] = measure_decoder_layer(layer, text, tokens, "lora", name)
    del layer
    patches = max(64, (2 * tokens // 64) * 64)  # whole windows
    result = Measurements(
        decoder=decoder,
        vision_window=measure_vision_block(vision, patches, full_attention=False),
        vision_full=measure_vision_block(vision, patches, full_attention=True),
        vision_ends=measure_vision_ends(vision, patches),
        final_norm=measure_final_norm(text, tokens),
        logprob_chunk=measure_logprob_chunk(text.hidden_size, text.vocab_size, 64),
        tokens=tokens,
    )
    return replace(result, seconds=time.perf_counter() - started)


# --- the workload -----------------------------------------------------------------------


@dataclass(frozen=True)
class SampleShape:
    images: int
    patches_per_image: int  # 4 patches per merged image token
    prompt_tokens: int  # text + image tokens
    max_label_tokens: int  # SFT answer / GRPO completion

    @property
    def max_tokens(self) -> int:
        return self.prompt_tokens + self.max_label_tokens

    @property
    def patches(self) -> int:
        return self.images * self.patches_per_image


def prompt_text_tokens(use_reference: bool) -> int:
    """The inspection prompt's text (mmrad.task.prompt) in tokens, chat template included."""
    from mmrad.task.prompt import PromptVariant, prompt_text

    text = prompt_text(
        category="metal_nut", grid_size=(504, 504), variant=PromptVariant(use_reference)
    )
    return math.ceil(len(text) / CHARS_PER_TOKEN) + CHAT_TEMPLATE_TOKENS


def sample_shape(max_pixels: int, use_reference: bool, label_tokens: int) -> SampleShape:
    """The longest sample: images at the pixel budget (at most max_pixels / 28^2 merged
    tokens each), the prompt and ``label_tokens`` of answer."""
    merged_tokens = max_pixels // (28 * 28)
    images = 2 if use_reference else 1
    return SampleShape(
        images=images,
        patches_per_image=4 * merged_tokens,
        prompt_tokens=images * merged_tokens + prompt_text_tokens(use_reference),
        max_label_tokens=label_tokens,
    )


@dataclass(frozen=True)
class MicroBatch:
    """The largest forward pass a learner runs: ``tokens`` (samples x padded length),
    ``samples`` (the most that fit: vision patches), ``label_tokens`` (log-prob positions)."""

    tokens: int
    samples: int
    padded_length: int
    patches: int
    label_tokens: int


def micro_batch(micro_batch_size: int, micro_batch_tokens: int | None, sample: SampleShape):
    """Charged at the token budget (a sample longer than it runs alone); samples as many
    of the shortest (prompt-only) as the budget and micro_batch_size allow."""
    if micro_batch_tokens is None:
        tokens, samples = micro_batch_size * sample.max_tokens, micro_batch_size
    else:
        tokens = max(micro_batch_tokens, sample.max_tokens)
        samples = max(1, min(micro_batch_size, tokens // sample.prompt_tokens))
    return MicroBatch(
        tokens=tokens,
        samples=samples,
        padded_length=min(tokens, sample.max_tokens),
        patches=samples * sample.patches,
        label_tokens=min(samples * sample.max_label_tokens, tokens),
    )


# --- the formulas (bytes per GPU) -------------------------------------------------------


def trained_parameters(counts: ParameterCounts, lora: bool) -> int:
    return counts.lora if lora else counts.total


def parameter_bytes(counts: ParameterCounts, lora: bool, world: int, reference: bool) -> float:
    """LoRA: bf16 frozen base + fp32 adapters; full: fp32 masters (+ bf16 reference)."""
    if lora:
        return (counts.total * 2 + counts.lora * 4) / world
    return (counts.total * 4 + (counts.total * 2 if reference else 0)) / world


def gradient_bytes(counts: ParameterCounts, lora: bool, world: int) -> float:
    return trained_parameters(counts, lora) * 4 / world


def optimizer_bytes(counts: ParameterCounts, lora: bool, world: int) -> float:
    """AdamW m and v in fp32."""
    return trained_parameters(counts, lora) * 8 / world


def block_saved(block: BlockBytes, checkpointing: bool, padded_length: int) -> float:
    """Bytes one block keeps per token (patch) until its backward."""
    if checkpointing:
        return block.checkpointed
    return block.plain + block.per_padded_token * (padded_length - block.measured_at)


def block_peak(block: BlockBytes, checkpointing: bool, padded_length: int) -> float:
    """Bytes per token (patch) allocated during one block's backward (its recompute too)."""
    base = block.recompute_peak if checkpointing else block.plain_backward_peak
    return base + block.per_padded_token * (padded_length - block.measured_at)


def vision_bytes_per_patch(m: Measurements, counts: ParameterCounts, checkpointing: bool):
    """(saved, peak) per patch of the whole vision tower: window blocks, full-attention
    blocks (4 of 32), patch embedding and merger."""
    full_blocks = counts.full_attention_blocks
    window_blocks = counts.vision_blocks - full_blocks
    saved = (
        window_blocks * block_saved(m.vision_window, checkpointing, 0)
        + full_blocks * block_saved(m.vision_full, checkpointing, 0)
        + m.vision_ends
    )
    peak = max(block_peak(b, checkpointing, 0) for b in (m.vision_window, m.vision_full))
    return saved, peak


def vision_in_graph(lora: bool, checkpointing: bool) -> bool:
    """Whether autograd records the vision tower: only when it trains (full fine-tuning).
    Under LoRA mmrad enables checkpointing after peft wraps the model, so nothing makes
    the frozen tower's outputs require grad (``checkpointing`` is kept for the test
    that checks this against mmrad's own build)."""
    return not lora


def activation_bytes(
    m: Measurements,
    counts: ParameterCounts,
    batch: MicroBatch,
    decoder: BlockBytes,
    checkpointing: bool,
    vision: bool,
) -> float:
    """Saved tensors of every layer (and vision block when ``vision``, in the graph) + the
    larger of the language model's and the vision tower's one-block backward peaks."""
    lm_saved = batch.tokens * (
        counts.layers * block_saved(decoder, checkpointing, batch.padded_length) + m.final_norm
    )
    lm_peak = batch.tokens * block_peak(decoder, checkpointing, batch.padded_length)
    if not vision:
        return lm_saved + lm_peak
    vision_saved, vision_peak = vision_bytes_per_patch(m, counts, checkpointing)
    return lm_saved + batch.patches * vision_saved + max(lm_peak, batch.patches * vision_peak)


def logit_bytes(m: Measurements, batch: MicroBatch, chunk_tokens: int, hidden: int) -> float:
    """One log-prob chunk's peak + the final hidden states gathered at the label positions."""
    return min(chunk_tokens, batch.label_tokens) * m.logprob_chunk + batch.label_tokens * hidden * 2


def buffer_bytes(counts: ParameterCounts, lora: bool, batch: MicroBatch, transient: float):
    """All-gathered bf16 weights (root unit + prefetched blocks), unsharded gradients
    (one block; the root's when it trains), tables, mask, pixels, runtime, fragmentation."""
    gathered = (counts.root + PREFETCHED_BLOCKS * counts.decoder_block) * 2
    block_grads = (counts.lora_block if lora else counts.decoder_block) * (2 + 4)
    root_grads = 0 if lora else counts.root * 2
    head_dim_bytes = 128 * 2 * 2  # rotary cos + sin in bf16 per token
    tables = batch.tokens * head_dim_bytes + batch.samples * batch.padded_length**2
    pixel_values = batch.patches * 3 * 2 * 14 * 14 * 4  # fp32 patches
    return (
        gathered
        + block_grads
        + root_grads
        + tables
        + pixel_values
        + RUNTIME_GB * GB
        + FRAGMENTATION * transient
    )


# --- the learners of configs/cluster ----------------------------------------------------


@dataclass
class Learner:
    name: str
    lora: bool
    world: int
    micro_batch_size: int
    micro_batch_tokens: int | None
    checkpointing: bool
    chunk_tokens: int
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    reference: bool  # a frozen reference copy (full fine-tuning with kl_beta > 0)
    sample: SampleShape
    config: str


@dataclass
class Row:
    learner: Learner
    batch: MicroBatch
    parameters: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    buffers: float
    activations_without_checkpointing: float
    advice: str = ""

    @property
    def total(self) -> float:
        return (
            self.parameters
            + self.gradients
            + self.optimizer
            + self.activations
            + self.logits
            + self.buffers
        )

    @property
    def fits(self) -> bool:
        return self.total <= BUDGET_GB * GB


def cluster_learners(configs: Path = CONFIGS) -> list[Learner]:
    """SFT, the GRPO learner and a sweep trial's learner, each LoRA and full, as
    configured (full: ``lora.enabled=false`` / ``sync.weights=full`` added)."""
    from mmrad.config import SFTJobConfig, load_config, validate_config
    from mmrad.config import apply_overrides as overrides_of
    from mmrad.rl.config import GRPOJobConfig
    from mmrad.tune.config import TuneJobConfig, trial_base

    learners = []
    for lora in (True, False):
        sft = load_config(
            SFTJobConfig, configs / "sft.yaml", [] if lora else ["lora.enabled=false"]
        )
        learners.append(
            learner_from(
                "SFT", sft, lora, False, sft.prompt.use_reference, SFT_ANSWER_TOKENS, "sft.yaml"
            )
        )
    for lora in (True, False):
        grpo = load_config(
            GRPOJobConfig, configs / "grpo.yaml", [] if lora else ["sync.weights=full"]
        )
        learners.append(grpo_learner("GRPO learner", grpo, lora, grpo.algorithm.kl_beta > 0))
    tune = load_config(TuneJobConfig, configs / "tune.yaml")
    kl_choices = tune.search_space.get("algorithm.kl_beta")
    kl_max = max(kl_choices.choice or [0.0]) if kl_choices else 0.0
    base = trial_base(tune)
    for lora in (True, False):
        data = overrides_of(base, [] if lora else ["sync.weights=full", "lora.enabled=false"])
        trial = validate_config(GRPOJobConfig, data, "tune.yaml trial")
        reference = max(kl_max, trial.algorithm.kl_beta) > 0
        learners.append(grpo_learner("sweep-trial learner", trial, lora, reference, "tune.yaml"))
    return learners


def grpo_learner(name, job, lora: bool, reference: bool, config: str = "grpo.yaml") -> Learner:
    given = job.prompt.use_reference  # None: the export's variant, which shows a reference
    use_reference = True if given is None else given
    return learner_from(name, job, lora, reference, use_reference, job.rollout.max_tokens, config)


def learner_from(name, job, lora, reference, use_reference, label_tokens, config) -> Learner:
    learners = job.learners
    return Learner(
        name=name,
        lora=lora,
        world=learners.num_workers,
        micro_batch_size=learners.micro_batch_size,
        micro_batch_tokens=learners.micro_batch_tokens,
        checkpointing=learners.activation_checkpointing,
        chunk_tokens=learners.logprob_chunk_tokens,
        lora_r=job.lora.r,
        lora_alpha=job.lora.alpha,
        lora_dropout=job.lora.dropout,
        reference=reference and not lora,
        sample=sample_shape(job.model.pixels.max_pixels, use_reference, label_tokens),
        config=config,
    )


def memory_row(learner: Learner, m: Measurements, counts: ParameterCounts, hidden: int) -> Row:
    """The learner's per-GPU memory; where it does not fit, what to change."""
    row = plain_row(learner, m, counts, hidden)
    if not row.fits:
        row.advice = advice(learner, m, counts, hidden)
    return row


def plain_row(learner: Learner, m: Measurements, counts: ParameterCounts, hidden: int) -> Row:
    trainable = "lora" if learner.lora else "full"
    decoder = m.decoder_for(trainable, learner.lora_dropout)
    batch = micro_batch(learner.micro_batch_size, learner.micro_batch_tokens, learner.sample)
    activations = activation_bytes(
        m, counts, batch, decoder, learner.checkpointing,
        vision_in_graph(learner.lora, learner.checkpointing),
    )  # fmt: skip
    logits = logit_bytes(m, batch, learner.chunk_tokens, hidden)
    return Row(
        learner=learner,
        batch=batch,
        parameters=parameter_bytes(counts, learner.lora, learner.world, learner.reference),
        gradients=gradient_bytes(counts, learner.lora, learner.world),
        optimizer=optimizer_bytes(counts, learner.lora, learner.world),
        activations=activations,
        logits=logits,
        buffers=buffer_bytes(counts, learner.lora, batch, activations + logits),
        activations_without_checkpointing=activation_bytes(
            m, counts, batch, decoder, False, vision_in_graph(learner.lora, False)
        ),
    )


def advice(learner: Learner, m: Measurements, counts: ParameterCounts, hidden: int) -> str:
    """The first change that makes the learner fit: checkpointing, 2x or 4x the learners
    (at most 8, one node), half or a quarter of the token budget."""
    tries = []
    if not learner.checkpointing:
        tries.append(
            ("learners.activation_checkpointing=true", replace(learner, checkpointing=True))
        )
    fixed = replace(learner, checkpointing=True)
    for world in (learner.world * 2, learner.world * 4):
        if world <= 8:
            tries.append((f"learners.num_workers={world}", replace(fixed, world=world)))
    budget = learner.micro_batch_tokens or learner.micro_batch_size * learner.sample.max_tokens
    for divisor in (2, 4):
        smaller = max(learner.sample.max_tokens, budget // divisor)
        tries.append(
            (f"learners.micro_batch_tokens={smaller}", replace(fixed, micro_batch_tokens=smaller))
        )
    for label, changed in tries:
        row = plain_row(changed, m, counts, hidden)
        if row.fits:
            return f"set {label}: {row.total / GB:.1f} GB"
    states = (
        parameter_bytes(counts, learner.lora, learner.world, learner.reference)
        + gradient_bytes(counts, learner.lora, learner.world)
        + optimizer_bytes(counts, learner.lora, learner.world)
    )
    return f"weights + gradients + AdamW alone {states / GB:.1f} GB: more learners or LoRA"


# --- printing ---------------------------------------------------------------------------


def print_measurements(m: Measurements) -> None:
    print(
        f"Saved for backward per token (vision: per patch), Qwen2.5-VL-7B width, bf16, "
        f"measured at {m.tokens} tokens / {m.vision_window.measured_at} patches, KB:"
    )
    header = (
        f"{'block':<44}{'plain':>8}{'ckpt':>8}{'ratio':>7}"
        f"{'bwd peak':>10}{'recompute':>11}{'+/pad tok':>10}"
    )
    print(header)
    blocks = [*m.decoder.values(), m.vision_window, m.vision_full]
    for b in blocks:
        print(
            f"{b.name:<44}{b.plain / 1e3:>8.1f}{b.checkpointed / 1e3:>8.1f}"
            f"{b.plain / b.checkpointed:>6.0f}x{b.plain_backward_peak / 1e3:>10.1f}"
            f"{b.recompute_peak / 1e3:>11.1f}{b.per_padded_token:>10.1f}"
        )
    print(
        f"vision patch embedding + merger: {m.vision_ends / 1e3:.1f} KB per patch; final norm: "
        f"{m.final_norm / 1e3:.1f} KB per token; one log-prob chunk "
        f"({chunk_function()[1]}): {m.logprob_chunk / 1e3:.0f} KB per chunk token"
    )
    print(
        "(plain/ckpt: kept per layer until its backward; bwd peak: allocated during one "
        "layer's backward; recompute: during its recompute + backward with checkpointing; "
        "+/pad tok: bytes per token added per token of padded length, the padding mask)"
    )


def describe(learner: Learner) -> str:
    s = learner.sample
    return (
        f"{learner.name} ({learner.config}): samples up to {s.max_tokens} tokens "
        f"({s.images} images x {s.patches_per_image} patches, prompt {s.prompt_tokens} tokens, "
        f"labels {s.max_label_tokens}); micro_batch_size {learner.micro_batch_size}, "
        f"micro_batch_tokens {learner.micro_batch_tokens}, activation_checkpointing "
        f"{learner.checkpointing}, logprob_chunk_tokens {learner.chunk_tokens}"
    )


def print_table(rows: list[Row]) -> None:
    print(f"\nPer-GPU memory, GB (1e9 bytes), budget {BUDGET_GB:.0f} GB of an 80 GB GPU:")
    columns = ("params", "grads", "optim", "activ", "logits", "buffers", "total")
    print(f"{'learner':<30}{'N':>3}{'micro-batch':>16}" + "".join(f"{c:>9}" for c in columns))
    for row in rows:
        learner, batch = row.learner, row.batch
        name = f"{learner.name}, {'LoRA' if learner.lora else 'full'}"
        values = (
            row.parameters,
            row.gradients,
            row.optimizer,
            row.activations,
            row.logits,
            row.buffers,
            row.total,
        )
        shape = f"{batch.tokens} tok/{batch.samples}"
        cells = "".join(f"{v / GB:>9.1f}" for v in values)
        verdict = "fits" if row.fits else f"does not fit {BUDGET_GB:.0f} GB; {row.advice}"
        print(f"{name:<30}{learner.world:>3}{shape:>16}{cells}  {verdict}")
    print(
        "(N: learners sharing the model; micro-batch: tokens charged / samples; "
        "activ without checkpointing: "
        + ", ".join(
            f"{r.learner.name} {'LoRA' if r.learner.lora else 'full'} "
            f"{r.activations_without_checkpointing / GB:.0f}"
            for r in rows
        )
        + " GB)"
    )


def results_json(m: Measurements, counts: ParameterCounts, rows: list[Row]) -> dict[str, Any]:
    return {
        "measurements": asdict(m),
        "parameters": asdict(counts),
        "rows": [
            {
                "learner": row.learner.name,
                "lora": row.learner.lora,
                "config": row.learner.config,
                "num_workers": row.learner.world,
                "micro_batch": asdict(row.batch),
                "gb": {
                    "parameters": row.parameters / GB,
                    "gradients": row.gradients / GB,
                    "optimizer": row.optimizer / GB,
                    "activations": row.activations / GB,
                    "logits": row.logits / GB,
                    "buffers": row.buffers / GB,
                    "total": row.total / GB,
                    "activations_without_checkpointing": row.activations_without_checkpointing / GB,
                },
                "fits": row.fits,
                "advice": row.advice,
            }
            for row in rows
        ],
    }


def publish_checkpointing(m: Measurements) -> None:
    """The bytes a LoRA decoder layer keeps for backward per token, checkpointed against
    plain: both measured on the same layer and the same tokens."""
    # here, not at the top: scripts/gpu_check.py imports this module as
    # benchmarks.learner_memory, where the scripts' sibling module is not on the path
    from record import Arm, compare, publish

    lora = next(block for key, block in m.decoder.items() if key.startswith("lora"))
    work = {"tokens": lora.measured_at, "layers": 1}
    publish(
        compare(
            "learner_memory_checkpointing",
            f"bytes per token kept for backward, {lora.name} (Qwen2.5-VL-7B width)",
            Arm("activation checkpointing", lora.checkpointed, work),
            Arm("plain", lora.plain, work),
            same=("tokens", "layers"),
            goal="every cluster learner fits 70 GB (table above)",
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=512, help="tokens per measurement")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    started = time.perf_counter()
    config = qwen25vl_7b_config()
    learners = cluster_learners()
    adapters = {(learner.lora_r, learner.lora_alpha) for learner in learners if learner.lora}
    if len(adapters) != 1:
        raise SystemExit(f"the configs' LoRA ranks differ ({sorted(adapters)}): one at a time")
    ((lora_r, lora_alpha),) = adapters
    counts = parameter_counts(config, lora_r)
    print(
        f"Qwen2.5-VL-7B: {counts.total / 1e9:.2f}B parameters "
        f"({counts.vision / 1e9:.2f}B vision), LoRA r={lora_r}: {counts.lora / 1e6:.0f}M; "
        f"decoder layer {counts.decoder_block / 1e6:.0f}M, root unit {counts.root / 1e6:.0f}M"
    )
    dropouts = [learner.lora_dropout for learner in learners if learner.lora]
    m = measure_all(config, args.tokens, lora_r, lora_alpha, dropouts)
    print_measurements(m)
    hidden = config.text_config.hidden_size
    rows = [memory_row(learner, m, counts, hidden) for learner in learners]
    print()
    for learner in learners:
        if learner.lora:
            print(describe(learner))
    print_table(rows)
    publish_checkpointing(m)
    print(f"\n{time.perf_counter() - started:.0f} s (measurements {m.seconds:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(results_json(m, counts, rows), indent=2))


if __name__ == "__main__":
    main()
