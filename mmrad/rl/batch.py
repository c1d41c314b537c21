"""A GRPO training batch, from rollouts to learner shards. Pure: no Ray, no engine.

- :func:`score` parses a completion on the model grid (boxes back to original pixels)
  and weighs the task's reward components.
- :class:`Group` is one prompt's ``G`` scored samples; a group whose rewards are all
  equal teaches nothing (its advantages are 0).
- :func:`repair_group` is contrastive sampling: a group where every sample fails gets the
  ground-truth answer as one sample (a guaranteed positive), one where every sample
  succeeds gets a negative; replaced samples carry no sampling log-probs.
- :func:`fill_batch` is dynamic sampling's choice: groups with variance first, in draw
  order, then zero-variance groups only when the tries ran out.
- :func:`build_batch` computes group advantages and :meth:`TrainBatch.shard` cuts the
  batch into equal contiguous learner shards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from mmrad.rl.prompts import PromptItem
from mmrad.task.answer import Verdict, format_answer, parse_answer
from mmrad.task.geometry import answer_scale, as_boxes, to_answer_boxes
from mmrad.task.rewards import RewardBreakdown, compute_reward

Replacement = Literal["", "positive", "negative"]

ADVERSARIAL_HINT = 'Whatever the query image shows, the final answer must be "{word}."'
"""Appended to the prompt of a group whose samples all succeed: it asks for the opposite
verdict, so the sample it yields is a plausible, well-formed wrong answer."""


@dataclass(frozen=True)
class RewardSpec:
    """The rewards' weights and parameters, and how answers are read: whether a
    ``<think>`` block is required and the model-grid pixels per box coordinate
    (:func:`mmrad.task.geometry.answer_unit`)."""

    weights: dict[str, float]
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    require_think: bool = True
    answer_unit: int = 1


def verdict_of(
    text: str, item: PromptItem, require_think: bool = True, answer_unit: int = 1
) -> Verdict:
    """The completion read back in original pixels (answers carry model-grid boxes, in
    ``answer_unit`` grid pixels per coordinate)."""
    return parse_answer(
        text,
        scale=answer_scale(item.size, item.grid, answer_unit),
        size=item.size,
        require_think=require_think,
    )


def score(text: str, item: PromptItem, spec: RewardSpec) -> tuple[RewardBreakdown, Verdict]:
    verdict = verdict_of(text, item, spec.require_think, spec.answer_unit)
    return compute_reward(verdict, item.record, spec.weights, spec.params), verdict


@dataclass(frozen=True)
class Sample:
    """One completion of a group, scored. ``sampling_logprobs`` are vLLM's (``None`` for
    a replaced sample: it was not sampled from this prompt); ``version`` is the weight
    version that generated the group."""

    token_ids: tuple[int, ...]
    text: str
    reward: float
    components: dict[str, float]
    decision_right: bool
    sampling_logprobs: tuple[float, ...] | None
    version: int
    finish_reason: str | None = None
    replaced: Replacement = ""


@dataclass(frozen=True)
class Group:
    item: PromptItem
    samples: tuple[Sample, ...]

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.samples]

    @property
    def has_variance(self) -> bool:
        rewards = self.rewards
        return any(r != rewards[0] for r in rewards)


def trainable_prefix(
    token_ids: Sequence[int], logprobs: Sequence[float] | None, forbidden: frozenset[int]
) -> tuple[tuple[int, ...], tuple[float, ...] | None]:
    """The completion up to its first ``forbidden`` token (and the matching log-probs).

    A sampled ``<|image_pad|>`` or ``<|vision_start|>`` cannot be fed back to the model:
    the processor would take it for an image. The tokens after it were conditioned on
    it, so they are not trained either; the reward still judges the whole text."""
    cut = next((i for i, t in enumerate(token_ids) if t in forbidden), len(token_ids))
    kept = None if logprobs is None else tuple(logprobs[:cut])
    return tuple(token_ids[:cut]), kept


def scored_sample(
    item: PromptItem,
    spec: RewardSpec,
    *,
    text: str,
    token_ids: Sequence[int],
    logprobs: Sequence[float] | None,
    version: int,
    finish_reason: str | None = None,
    replaced: Replacement = "",
    forbidden: frozenset[int] = frozenset(),
) -> Sample:
    """Score ``text``; keep the trainable prefix of its tokens (:func:`trainable_prefix`)."""
    breakdown, verdict = score(text, item, spec)
    token_ids, logprobs = trainable_prefix(token_ids, logprobs, forbidden)
    return Sample(
        token_ids=tuple(token_ids),
        text=text,
        reward=breakdown.total,
        components=dict(breakdown.components),
        decision_right=verdict.decision is bool(item.record["is_anomalous"]),
        sampling_logprobs=None if logprobs is None else tuple(logprobs),
        version=version,
        finish_reason=finish_reason,
        replaced=replaced,
    )


# -- contrastive sampling ---------------------------------------------------------------


def ground_truth_answer(
    item: PromptItem, reasoning: bool, fallback_reasoning: str, answer_unit: int = 1
) -> str:
    """The record's answer as the model should write it: boxes on the model grid (in
    ``answer_unit`` grid pixels per coordinate), the record's reasoning (or
    ``fallback_reasoning``) in the think block."""
    record = item.record
    boxes = to_answer_boxes(as_boxes(record["boxes"]), item.size, item.grid, answer_unit)
    labels = [str(label) for label in record["labels"] or []]
    think = (record.get("reasoning") or fallback_reasoning) if reasoning else None
    return format_answer(bool(record["is_anomalous"]), boxes, labels, think)


def adversarial_hint(item: PromptItem) -> str:
    """A hint that asks for the verdict opposite to the record's."""
    return ADVERSARIAL_HINT.format(word="No" if item.record["is_anomalous"] else "Yes")


def repair_group(
    group: Group, positive: Sample, negatives: Sequence[Sample]
) -> tuple[Group, Replacement]:
    """Contrastive sampling for a zero-variance group: when its (equal) reward is below
    the ground truth's, its last sample becomes ``positive``; otherwise the last sample
    becomes the first of ``negatives`` that scores below the group (an adversarial
    sample, then a constructed one). Returns the group unchanged and ``""`` when it
    has variance already or nothing scores differently."""
    if group.has_variance:
        return group, ""
    level = group.samples[0].reward
    if positive.reward > level:
        chosen = replace(positive, replaced="positive")
    else:
        lower = [n for n in negatives if n.reward < level]
        if not lower:
            return group, ""
        chosen = replace(lower[0], replaced="negative")
    return Group(group.item, (*group.samples[:-1], chosen)), chosen.replaced


# -- dynamic sampling -------------------------------------------------------------------


def fill_batch(
    groups: Sequence[Group], wanted: int, dynamic: bool
) -> tuple[list[Group], list[Group]]:
    """``(kept, left out)``: without dynamic sampling the first ``wanted`` groups; with
    it the groups that have variance, in draw order, topped up with zero-variance
    groups (which add no policy gradient) only when too few have variance."""
    if not dynamic:
        return list(groups[:wanted]), list(groups[wanted:])
    useful = [g for g in groups if g.has_variance]
    flat = [g for g in groups if not g.has_variance]
    kept = (useful + flat)[:wanted]
    chosen = {id(g) for g in kept}
    order = {id(g): i for i, g in enumerate(groups)}
    kept.sort(key=lambda g: order[id(g)])
    return kept, [g for g in groups if id(g) not in chosen]


def needs_more(groups: Sequence[Group], wanted: int, dynamic: bool) -> int:
    """How many more prompts to draw: groups still missing (only useful ones count with
    dynamic sampling)."""
    have = sum(g.has_variance for g in groups) if dynamic else len(groups)
    return max(0, wanted - have)


# -- the batch --------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSample:
    """What a learner trains on: a prompt (index into the shard's ``prompts``), the
    completion's tokens and advantage, vLLM's sampling log-probs (or ``None``) and the
    weight version that generated it."""

    prompt: int
    token_ids: tuple[int, ...]
    advantage: float
    sampling_logprobs: tuple[float, ...] | None
    version: int


@dataclass(frozen=True)
class Probe:
    """A fixed prompt and completion whose log-probs the learner and the engines compare
    after a weight sync."""

    item: PromptItem
    token_ids: tuple[int, ...]


@dataclass
class LearnerShard:
    """One learner's part of batch ``step``. Rank 0's also carries the batch's metrics,
    its sample table and the prompt ids drawn and used (the resume ledger)."""

    step: int
    prompts: list[PromptItem]
    samples: list[TrainSample]
    probe: Probe | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    table: list[dict[str, Any]] = field(default_factory=list)
    drawn: list[str] = field(default_factory=list)
    used: list[str] = field(default_factory=list)


@dataclass
class TrainBatch:
    step: int
    groups: list[Group]
    advantages: list[float]
    metrics: dict[str, float] = field(default_factory=dict)
    table: list[dict[str, Any]] = field(default_factory=list)
    drawn: list[str] = field(default_factory=list)
    probe: Probe | None = None

    @property
    def size(self) -> int:
        return len(self.advantages)

    def shard(self, rank: int, world: int) -> LearnerShard:
        """Contiguous, equal parts (whole groups stay together when G divides them)."""
        if self.size % world:
            raise ValueError(f"{self.size} samples do not split over {world} learners")
        per = self.size // world
        lo, hi = rank * per, (rank + 1) * per
        flat = [(g, s) for g in self.groups for s in g.samples]
        prompts: list[PromptItem] = []
        index: dict[str, int] = {}
        samples = []
        for (group, sample), advantage in zip(flat[lo:hi], self.advantages[lo:hi], strict=True):
            key = group.item.prompt_id
            if key not in index:
                index[key] = len(prompts)
                prompts.append(group.item)
            samples.append(
                TrainSample(index[key], sample.token_ids, advantage, sample.sampling_logprobs,
                            sample.version)
            )  # fmt: skip
        shard = LearnerShard(self.step, prompts, samples, probe=self.probe)
        if rank == 0:
            shard.metrics, shard.table = dict(self.metrics), list(self.table)
            shard.drawn, shard.used = list(self.drawn), [g.item.prompt_id for g in self.groups]
        return shard


def build_batch(step: int, groups: Sequence[Group], group_size: int, scale: str) -> TrainBatch:
    """Group advantages of the kept groups (``mmrad.rl.grpo.group_advantages``)."""
    import torch

    from mmrad.rl.grpo import group_advantages

    for group in groups:
        if len(group.samples) != group_size:
            raise ValueError(
                f"prompt {group.item.prompt_id}: {len(group.samples)} samples, expected "
                f"{group_size}"
            )
    rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float64)
    advantages = group_advantages(rewards, group_size, scale).tolist()
    return TrainBatch(step, list(groups), advantages)


def choose_probe(groups: Sequence[Group]) -> Probe | None:
    """The first sampled (not replaced) non-empty completion of the batch."""
    for group in groups:
        for sample in group.samples:
            if not sample.replaced and sample.token_ids:
                return Probe(group.item, sample.token_ids)
    return None


def sample_rows(
    step: int, groups: Sequence[Group], advantages: Sequence[float], limit: int
) -> list[dict[str, Any]]:
    """The sample table: the first ``limit`` samples with their per-component rewards."""
    rows = []
    flat = [(g, s) for g in groups for s in g.samples]
    for (group, sample), advantage in zip(flat, advantages, strict=True):
        if len(rows) >= limit:
            break
        rows.append({
            "step": step,
            "prompt_id": group.item.prompt_id,
            "category": group.item.record.get("category"),
            "is_anomalous": bool(group.item.record["is_anomalous"]),
            "completion": sample.text,
            "reward": sample.reward,
            **{f"reward/{name}": value for name, value in sample.components.items()},
            "advantage": advantage,
            "replaced": sample.replaced,
            "version": sample.version,
        })  # fmt: skip
    return rows


def ids(groups: Sequence[Group]) -> list[str]:
    return [g.item.prompt_id for g in groups]


def mapping_of(rewards: Mapping[str, float]) -> dict[str, float]:
    return dict(rewards)
