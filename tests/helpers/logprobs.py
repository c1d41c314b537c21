"""Reference log-probs from Hugging Face transformers, to check what vLLM computes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def hf_completion_logprobs(
    model: Any, processor: Any, request: Mapping[str, Any], completion: Sequence[int]
) -> list[float]:
    """Log-probs of ``completion`` tokens after a vLLM prompt (``{"prompt": text,
    "multi_modal_data": {"image": [...]}}``, as :func:`mmrad.engine.build_request`
    makes it) under a transformers (or peft) model: one teacher-forced forward pass over
    the processor's inputs with the completion appended, logits at temperature 1."""
    images = request.get("multi_modal_data", {}).get("image")
    batch = processor(text=[request["prompt"]], images=images, return_tensors="pt")
    prompt_length = batch["input_ids"].shape[1]
    appended = torch.tensor([list(completion)], dtype=batch["input_ids"].dtype)
    inputs = dict(batch)
    for key, value in batch.items():  # per-token tensors grow with the completion
        if torch.is_tensor(value) and value.shape[:2] == (1, prompt_length):
            tail = appended if key == "input_ids" else torch.zeros_like(appended)
            if key == "attention_mask":
                tail = torch.ones_like(appended)
            inputs[key] = torch.cat([value, tail], dim=1)
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
    steps = logits[prompt_length - 1 : prompt_length - 1 + len(completion)]
    logprobs = torch.log_softmax(steps, dim=-1)
    return logprobs.gather(1, appended[0].unsqueeze(1)).squeeze(1).tolist()
