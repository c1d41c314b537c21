"""Learner inputs: a shard's prompts and completions → model batches, and the per-token
log-probs of the completions.

A prompt is built exactly as the rollout engines built it
(:func:`mmrad.engine.requests.build_request`: same chat template, images on the same
model grid) and encoded by the model's processor without resizing, so the learner
scores the very token sequence vLLM sampled: ``prompt ids + completion ids``. Each
prompt is encoded once per step and shared by its group's samples.

Log-probs of completion token ``j`` come from the logits at the position before it,
computed a chunk of tokens at a time (:mod:`mmrad.train.token_logprobs`);
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
from mmrad.train.token_logprobs import ENTROPY, LOGP, RAW, ScoredTokens, score_tokens

MODEL_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values",
                "image_grid_thw")  # fmt: skip
"""What a collated batch passes to the model (the rest is for the loss)."""


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


def spread(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Flat per-token ``values`` placed at the ``True`` entries of ``(B, C)`` ``mask``
    (row-major, as :meth:`ScoredTokens.from_spans` lists them); 0 elsewhere."""
    out = values.new_zeros(mask.shape)
    out[mask] = values
    return out


def completion_logprobs(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    temperature: float = 1.0,
    *,
    chunk_tokens: int = 1024,
    with_raw: bool = False,
    with_entropy: bool = False,
) -> TokenLogprobs:
    """Log-probs of the completion tokens of a collated batch (``inputs``: the model's
    inputs plus ``starts`` and ``lengths``) under ``model``, from the logits of the
    position before each token, ``chunk_tokens`` at a time (see
    :mod:`mmrad.train.token_logprobs`); padding positions hold 0."""
    tokens, mask = ScoredTokens.from_spans(inputs["input_ids"], inputs["starts"], inputs["lengths"])
    stats = score_tokens(
        model, {k: inputs[k] for k in MODEL_INPUTS if k in inputs}, tokens, chunk_tokens,
        temperature=temperature, with_raw=with_raw and temperature != 1.0,
        with_entropy=with_entropy,
    )  # fmt: skip
    raw = spread(stats[:, RAW], mask) if with_raw and temperature != 1.0 else None
    entropy = spread(stats[:, ENTROPY], mask) if with_entropy else None
    return TokenLogprobs(spread(stats[:, LOGP], mask), raw, entropy, mask)


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
