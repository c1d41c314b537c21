"""Loading a Hugging Face model with transformers alone (no mmrad config or storage), so
that the trainer's model building also runs where only torch, transformers and peft are
installed (``scripts/gpu_check.sh``)."""

from __future__ import annotations

ATTN_IMPLEMENTATION = "sdpa"


def load_model(path: str, dtype: str, *, device: str = "cpu"):
    """A Qwen2.5-VL-style image-text-to-text model with SDPA attention."""
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation=ATTN_IMPLEMENTATION
    )
    return model.to(device)
