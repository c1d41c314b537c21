"""Micro-batches by a token budget, the same count on every rank, and the weights that
make their summed losses the loss of the whole step over all ranks.

FSDP's forward and backward are collectives, so every rank must run the same number of
micro-batches: a rank with fewer runs fillers whose loss weighs 0. FSDP averages
gradients over ranks, so a micro-batch's mean loss weighs ``its units x world / all
units of all ranks`` (units: the tokens, or sequences, its loss averages over): the
step then trains on the mean over every token of every rank, however unevenly the
tokens fell, instead of a mean of per-rank means.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch.distributed as dist

from mmrad.train.distributed import all_max, all_sum

Item = TypeVar("Item")


def by_token_budget(
    lengths: Sequence[int], max_samples: int, max_tokens: int | None
) -> list[list[int]]:
    """Sample indices grouped into micro-batches. ``max_tokens`` None: runs of
    ``max_samples`` in order. Otherwise longest first, a group growing while it has at
    most ``max_samples`` samples and ``samples x its longest`` (the padded size) stays
    within ``max_tokens``; a sample longer than the budget is a micro-batch of its own."""
    order = list(range(len(lengths)))
    if max_tokens is None:
        return [order[i : i + max_samples] for i in range(0, len(order), max_samples)]
    order.sort(key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for index in order:
        group = groups[-1] if groups else None
        if (
            group
            and len(group) < max_samples
            and (len(group) + 1) * lengths[group[0]] <= max_tokens
        ):
            group.append(index)
        else:
            groups.append([index])
    return groups


def step_weights(units: Sequence[float]) -> list[float]:
    """Collective: each local micro-batch's loss weight (see the module docstring)."""
    total = all_sum(float(sum(units)))
    if total <= 0:
        return [0.0 for _ in units]
    world = dist.get_world_size()
    return [u * world / total for u in units]


def with_fillers(items: list[Item], filler: Item) -> list[Item]:
    """Collective: ``items`` padded with ``filler`` to the largest count of any rank."""
    return items + [filler] * (int(all_max(len(items))) - len(items))


def same_count(items: list[Item], weights: list[float], filler: Item) -> list[tuple[Item, float]]:
    """Collective: ``(item, weight)`` pairs, padded with ``(filler, 0.0)`` to the largest
    count of any rank."""
    padded = with_fillers(items, filler)
    return list(zip(padded, [*weights, *[0.0] * (len(padded) - len(items))], strict=True))


def accumulate_gradients(
    model, weighted: Sequence[tuple[Item, float]], loss_of: Callable[[Item], object]
) -> None:
    """Backward of ``weight x loss_of(item)`` for each pair; FSDP2 reduce-scatters
    gradients on the last one only (FSDP1 on each: correct, one reduction per
    micro-batch)."""
    last = len(weighted) - 1
    for index, (item, weight) in enumerate(weighted):
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(index == last)
        (loss_of(item) * weight).backward()
