"""Per-token log-probs of chosen tokens without full-vocabulary logits for the batch.

A causal LM's head turns every position's hidden state into ``vocab`` logits: for a
micro-batch of 8 x 1,400 tokens and Qwen2.5-VL's 152k vocabulary that is 3.4 GB in bf16
and twice that in the float32 log-softmax, plus their gradients. The loss needs one
number per scored token (SFT: the label tokens; GRPO: the completion tokens). Here the
model's head is replaced, for one forward pass, by one that takes the final hidden
states at the scored positions only and computes log-softmax statistics
``chunk_tokens`` rows at a time, each chunk recomputed in backward (non-reentrant
checkpoint), so at most ``chunk_tokens x vocab`` float32 logits exist at once.

The swap happens inside the model's own forward, where FSDP has gathered the head's
weight, so it holds under FSDP1 and FSDP2 alike. Imports torch only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

LOGP, RAW, ENTROPY = 0, 1, 2
"""Columns of :func:`token_statistics`' result."""


@dataclass(frozen=True)
class ScoredTokens:
    """Which tokens to score, flat over the batch: token ``i`` is ``targets[i]`` in row
    ``rows[i]``, predicted by the hidden state at ``positions[i]``."""

    rows: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return int(self.targets.numel())

    @classmethod
    def from_labels(cls, labels: torch.Tensor, ignore_index: int = -100) -> ScoredTokens:
        """Every label that is not ``ignore_index`` (HF's convention: position ``t``
        predicts ``labels[t + 1]``)."""
        rows, positions = torch.nonzero(labels[:, 1:] != ignore_index, as_tuple=True)
        return cls(rows, positions, labels[rows, positions + 1])

    @classmethod
    def from_spans(
        cls, input_ids: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[ScoredTokens, torch.Tensor]:
        """The completion of each row (``lengths[b]`` tokens from ``starts[b]``), and the
        ``(B, C)`` mask that places the flat tokens back (``C``: the longest)."""
        longest = max(int(lengths.max()), 1)
        offsets = torch.arange(longest, device=input_ids.device)
        mask = offsets[None, :] < lengths[:, None].to(input_ids.device)
        rows, columns = torch.nonzero(mask, as_tuple=True)
        at = starts.to(input_ids.device)[rows] + columns
        return cls(rows, at - 1, input_ids[rows, at]), mask


def chunk_statistics(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    with_raw: bool,
    with_entropy: bool,
) -> torch.Tensor:
    """``(n, 3)``: the targets' log-probs at ``temperature``, at temperature 1, and the
    entropy of the tempered distribution (columns not asked for hold 0)."""
    logits = F.linear(hidden, weight).float()
    tempered = torch.log_softmax(logits / temperature, dim=-1)
    logp = tempered.gather(-1, targets[:, None]).squeeze(-1)
    raw = torch.zeros_like(logp)
    if with_raw:
        raw = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    entropy = torch.zeros_like(logp)
    if with_entropy:
        entropy = -(tempered.exp() * tempered).sum(-1)
    return torch.stack([logp, raw, entropy], dim=-1)


def token_statistics(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    with_raw: bool = False,
    with_entropy: bool = False,
) -> torch.Tensor:
    """:func:`chunk_statistics` of ``hidden (n, h)`` under the head ``weight (V, h)``,
    ``chunk_tokens`` rows at a time; under autograd each chunk is recomputed in backward
    instead of keeping its logits."""
    parts = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        args = (hidden[start : start + chunk_tokens], weight, targets[start : start + chunk_tokens],
                temperature, with_raw, with_entropy)  # fmt: skip
        if torch.is_grad_enabled():
            parts.append(checkpoint(chunk_statistics, *args, use_reentrant=False))
        else:
            parts.append(chunk_statistics(*args))
    if not parts:
        return hidden.new_zeros((0, 3), dtype=torch.float32)
    return torch.cat(parts)


@contextlib.contextmanager
def scoring_head(
    model: nn.Module, tokens: ScoredTokens, chunk_tokens: int, **options
) -> Iterator[None]:
    """Within the block, ``model(...).logits`` is :func:`token_statistics` of ``tokens``
    (``(n, 3)``), not the full-vocabulary logits."""
    head = model.get_output_embeddings()

    def score(hidden: torch.Tensor) -> torch.Tensor:
        picked = hidden[tokens.rows.to(hidden.device), tokens.positions.to(hidden.device)]
        return token_statistics(
            picked, head.weight, tokens.targets.to(hidden.device),
            chunk_tokens=chunk_tokens, **options,
        )  # fmt: skip

    head.forward = score
    try:
        yield
    finally:
        del head.forward


def score_tokens(
    model: nn.Module, inputs: dict, tokens: ScoredTokens, chunk_tokens: int, **options
) -> torch.Tensor:
    """One forward pass of ``model`` on ``inputs``; ``(n, 3)`` statistics of ``tokens``
    (see :func:`chunk_statistics`; ``options``: temperature, with_raw, with_entropy)."""
    with scoring_head(model, tokens, chunk_tokens, **options):
        return model(**inputs).logits
