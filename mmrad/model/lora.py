"""LoRA on the language model's projections, or full fine-tuning.

Adapters go on the language model only (``LANGUAGE_MODEL_PROJECTIONS``) because vLLM
serves LoRA on the language model, not on the vision tower; peft freezes everything else.
peft renames parameters: ``model.language_model.layers.0.self_attn.q_proj.weight``
becomes ``base_model.model.model.language_model.layers.0.self_attn.q_proj.base_layer.weight``
beside ``...q_proj.lora_A.default.weight`` and ``...q_proj.lora_B.default.weight``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmrad.config import LoraConfig


ADAPTER_NAME = "default"


def peft_config(config: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        bias="none",
    )


def apply_lora(model, config: LoraConfig):
    """A peft model training only the adapters; with ``enabled=False`` the model itself
    with every parameter trainable (full fine-tuning)."""
    if not config.enabled:
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    from peft import get_peft_model

    return get_peft_model(model, peft_config(config), adapter_name=ADAPTER_NAME)


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def trainable_summary(model) -> dict[str, float]:
    """``{"trainable": n, "total": n, "fraction": trainable / total}`` in parameters."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return {"trainable": trainable, "total": total, "fraction": trainable / max(total, 1)}
