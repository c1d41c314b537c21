"""The model a Ray Train worker trains, built so that a 7B model starts on a node of GPUs:

- **one copy per node, not per rank**: rank 0 loads the checkpoint on the CPU, every other
  rank builds the same architecture on the ``meta`` device (no memory); sharding then
  broadcasts rank 0's weights and each rank keeps its shard (:mod:`mmrad.train.sharding`);
- **float32 where it is trained**: the weights that train (the LoRA adapter, or every
  weight in full fine-tuning) and so AdamW's moments are float32, whatever
  ``model.dtype``; compute runs in bf16 under FSDP's mixed precision. Pure bf16 full
  fine-tuning would lose most updates at lr 1e-5 (below bf16's resolution of ~4e-3
  relative);
- **activation checkpointing** per decoder layer and vision block, non-reentrant (HF's
  own ``gradient_checkpointing_enable``, which keeps parameter names).

Imports torch, transformers and peft only (no Ray), so ``scripts/gpu_check.sh`` can use
it on a machine with nothing else.
"""

from __future__ import annotations

import torch
from torch import nn


def load_on_rank0(path: str, dtype: str, rank: int) -> nn.Module:
    """The model from ``path`` on rank 0 (CPU); the same architecture on ``meta`` elsewhere."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from mmrad.model.hf import ATTN_IMPLEMENTATION, load_model

    if rank == 0:
        return load_model(path, dtype)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(
            config, dtype=getattr(torch, dtype), attn_implementation=ATTN_IMPLEMENTATION
        )


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every decoder layer and vision block in backward (non-reentrant)."""
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None:
            config.use_cache = False  # a KV cache is for generation, and warns here
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # HF also hooks the embeddings (tokens and image patches) so that their outputs require
    # grad, which only reentrant checkpointing needs; under LoRA it would make the frozen
    # vision tower keep activations and run a backward that trains nothing.
    model.disable_input_require_grads()


def keep_trained_in_float32(model: nn.Module) -> None:
    """Trainable parameters as float32 master weights (frozen ones keep their dtype)."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def build_model(
    job,
    model_path: str,
    device: torch.device,
    rank: int,
    *,
    trainable: bool = True,
    patch_head: bool = False,
) -> nn.Module:
    """The model as the job trains it, sharded over the default process group: loaded on
    rank 0, LoRA applied (``lora.enabled``), trained weights in float32, checkpointed
    (``learners.activation_checkpointing``). ``trainable=False``: a frozen copy without
    LoRA (a reference policy). ``patch_head``: with the auxiliary vision head
    (:mod:`mmrad.train.patch_head`)."""
    from mmrad.train.sharding import shard_model

    model = load_on_rank0(model_path, job.model.dtype, rank)
    if trainable:
        model = prepare_for_training(model, job, patch_head)
    else:
        model.requires_grad_(False)
        model.eval()
    return shard_model(model, job.learners.fsdp, job.learners.use_gpu, device)


def prepare_for_training(model: nn.Module, job, patch_head: bool = False) -> nn.Module:
    """The seeded LoRA adapter (or every weight trainable), the auxiliary vision head
    (``patch_head``, trainable under LoRA too), float32 trained weights, and activation
    checkpointing (after peft, which would hook the embeddings as HF does)."""
    from mmrad.model.lora import apply_lora
    from mmrad.train.patch_head import attach_patch_head

    torch.manual_seed(job.schedule.seed)  # the adapter's and head's init, from rank 0
    model = apply_lora(model, job.lora)
    if patch_head:
        attach_patch_head(model)
    keep_trained_in_float32(model)
    if job.learners.activation_checkpointing:
        enable_activation_checkpointing(model)
    return model
