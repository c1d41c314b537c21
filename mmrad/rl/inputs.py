"""Learner inputs: a shard's prompts and completions → model batches, and the per-token
log-probs of the completions.

A prompt is built exactly as the rollout engines built it
(:func:`mmrad.engine.requests.build_request`: same chat template, images on the same
model grid) and encoded by the model's processor without resizing, so the learner
scores the very token sequence vLLM sampled: ``prompt ids + completion ids``. Each
prompt is encoded once per step and shared by its group's samples.

Log-probs of completion token ``j`` come from the logits at the position before it;
dividing the logits by the sampling temperature gives the distribution the engines
sampled from (GRPO's ``old_logp`` and ``logp``), temperature 1 gives vLLM's raw
log-probs (the mismatch metric and the importance weights compare those).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmrad.config import PixelBudget
from mmrad.engine.requests import build_request
from mmrad.model.collate import IMAGE_TOKEN, VISION_START_TOKEN, check_image_tokens
from mmrad.rl.prompts import PromptItem
from mmrad.task.prompt import PromptVariant


@dataclass(frozen=True)
class EncodedPrompt:
    input_ids: list[int]
    mm_token_type_ids: list[int]
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor


class RolloutCollator:
    """Encodes prompts and pads ``(prompt, completion)`` pairs into model batches."""

    def __init__(self, processor, variant: PromptVariant, pixels: PixelBudget):
        self.processor = processor
        self.variant = variant
        self.pixels = pixels
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.vision_start_id = tokenizer.convert_tokens_to_ids(VISION_START_TOKEN)
        self.merge_size = processor.image_processor.merge_size

    def encode_prompt(self, item: PromptItem) -> EncodedPrompt:
        request = build_request(self.processor, item.inputs(), self.variant, self.pixels)
        encoded = self.processor(
            text=[request["prompt"]],
            images=request["multi_modal_data"]["image"],
            do_resize=False,
            return_tensors="pt",
        )
        return EncodedPrompt(
            input_ids=encoded["input_ids"][0].tolist(),
            mm_token_type_ids=encoded["mm_token_type_ids"][0].tolist(),
            pixel_values=encoded["pixel_values"],
            image_grid_thw=encoded["image_grid_thw"],
        )

    def __call__(
        self, prompts: Sequence[EncodedPrompt], pairs: Sequence[tuple[int, Sequence[int]]]
    ) -> dict[str, Any]:
        """``pairs`` of ``(prompt index, completion token ids)`` → a right-padded batch
        with ``starts`` (each completion's first position) and ``lengths``."""
        if not pairs:
            raise ValueError("cannot collate an empty list of samples")
        sequences, types, starts, lengths = [], [], [], []
        for index, completion in pairs:
            prompt = prompts[index]
            sequences.append(prompt.input_ids + list(completion))
            types.append(prompt.mm_token_type_ids + [0] * len(completion))
            starts.append(len(prompt.input_ids))
            lengths.append(len(completion))
        width = max(len(s) for s in sequences)
        shape = (len(sequences), width)
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        mm_token_type_ids = torch.zeros(shape, dtype=torch.long)
        for row, (ids, kinds) in enumerate(zip(sequences, types, strict=True)):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
            mm_token_type_ids[row, : len(kinds)] = torch.tensor(kinds)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": mm_token_type_ids,
            "pixel_values": torch.cat([prompts[i].pixel_values for i, _ in pairs]),
            "image_grid_thw": torch.cat([prompts[i].image_grid_thw for i, _ in pairs]),
        }
        check_image_tokens(
            batch,
            image_token_id=self.image_token_id,
            vision_start_id=self.vision_start_id,
            merge_size=self.merge_size,
        )
        batch["starts"] = torch.tensor(starts)
        batch["lengths"] = torch.tensor(lengths)
        return batch


@dataclass(frozen=True)
class TokenLogprobs:
    """Per completion token, ``(B, C)``: log-probs at the sampling temperature, at
    temperature 1 (``None`` when that is the same), the entropy of the tempered
    distribution (when asked for) and the mask of real tokens."""

    logp: torch.Tensor
    raw: torch.Tensor | None
    entropy: torch.Tensor | None
    mask: torch.Tensor

    @property
    def untempered(self) -> torch.Tensor:
        return self.logp if self.raw is None else self.raw


def completion_logits(logits: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor):
    """``(B, C, V)`` logits predicting each completion token, and the ``(B, C)`` mask;
    ``C`` is the longest completion."""
    longest = max(int(lengths.max()), 1)
    offsets = torch.arange(longest, device=logits.device)
    positions = (starts[:, None].to(logits.device) - 1 + offsets[None, :]).clamp(
        0, logits.shape[1] - 1
    )
    mask = offsets[None, :] < lengths[:, None].to(logits.device)
    picked = logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))
    return picked, mask


def completion_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    temperature: float = 1.0,
    *,
    with_raw: bool = False,
    with_entropy: bool = False,
) -> TokenLogprobs:
    """Log-probs of the completion tokens (see :class:`TokenLogprobs`); padding
    positions hold 0."""
    picked, mask = completion_logits(logits, starts, lengths)
    longest = picked.shape[1]
    offsets = torch.arange(longest, device=input_ids.device)
    targets_at = (starts[:, None].to(input_ids.device) + offsets[None, :]).clamp(
        max=input_ids.shape[1] - 1
    )
    targets = input_ids.gather(1, targets_at)[..., None].to(picked.device)
    picked = picked.float()
    tempered = torch.log_softmax(picked / temperature, dim=-1)
    logp = tempered.gather(-1, targets).squeeze(-1).masked_fill(~mask, 0.0)
    raw = None
    if with_raw and temperature != 1.0:
        raw = torch.log_softmax(picked, dim=-1).gather(-1, targets).squeeze(-1)
        raw = raw.masked_fill(~mask, 0.0)
    entropy = None
    if with_entropy:
        entropy = -(tempered.exp() * tempered).sum(-1).masked_fill(~mask, 0.0)
    return TokenLogprobs(logp, raw, entropy, mask)


def padded(rows: Sequence[Sequence[float] | None], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, width)`` values and a mask of where a row had a value (``None`` rows and
    rows of another length than expected are all-masked)."""
    values = torch.zeros((len(rows), width), dtype=torch.float32)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        if row is None or len(row) > width:
            continue
        values[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
        mask[i, : len(row)] = True
    return values, mask
