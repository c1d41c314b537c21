"""Making GRPO training batch ``t``: plain code, no Ray and no locks (the coordinator,
:mod:`mmrad.rl.coordinator`, decides when, and on which weights):

- draw ``prompts_per_step`` prompts from the stream, sample ``G`` completions each
  through ``generate`` (seeded per prompt and batch, :func:`~mmrad.rl.rollout.rollout_seed`)
  and score them (:func:`mmrad.rl.batch.score`);
- contrastive sampling (optional) gives zero-variance groups a ground-truth positive or
  an adversarial negative; dynamic sampling (optional) drops the groups that still have
  no variance and draws further prompts, at most ``max_sampling_tries`` draws per step;
- group advantages, metrics, the sample table and the sync-check probe.

:class:`BatchRecipe` holds what stays the same for a whole run; :func:`make_batch` makes
one batch with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from mmrad.engine.sampling import Sampling
from mmrad.model.loading import ModelSource
from mmrad.rl.batch import (
    Group,
    RewardSpec,
    Sample,
    TrainBatch,
    adversarial_hint,
    build_batch,
    choose_probe,
    fill_batch,
    ground_truth_answer,
    needs_more,
    repair_group,
    sample_rows,
    scored_sample,
)
from mmrad.rl.config import GRPOJobConfig
from mmrad.rl.metrics import advantage_metrics, rollout_metrics
from mmrad.rl.prompts import PromptItem, PromptStream
from mmrad.rl.rollout import Rollout, RolloutPrompt, rollout_seed
from mmrad.storage import Storage, is_remote, join
from mmrad.task.answer import GENERIC_REASONING
from mmrad.task.prompt import PromptVariant

if TYPE_CHECKING:
    from tokenizers import Tokenizer

END_OF_TURN_TOKEN = "<|im_end|>"
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                 "<|video_pad|>")  # fmt: skip

Generate = Callable[[list[RolloutPrompt], Sampling], list[list[Rollout]]]
"""Samples completions of prompts (:meth:`mmrad.rl.pool.RolloutPool.generate`)."""


def ids_tokenizer(model: ModelSource) -> Tokenizer:
    """The model's fast tokenizer through the ``tokenizers`` library alone: token ids are
    all batch making needs, and importing transformers for them cost the first step
    several seconds. From object storage only ``tokenizer.json`` is read: the coordinator's
    node need not hold the weights."""
    from tokenizers import Tokenizer

    if is_remote(model.path):
        storage = Storage.from_config(model.storage)
        return Tokenizer.from_str(storage.read_text(join(model.path, "tokenizer.json")))
    local = Path(model.path, "tokenizer.json")
    if local.is_file():
        return Tokenizer.from_file(str(local))
    return Tokenizer.from_pretrained(model.path)


def reward_spec(job: GRPOJobConfig, variant: PromptVariant) -> RewardSpec:
    """The run's rewards; a ``<think>`` block is required when the variant reasons, and
    boxes are read in the variant's units on the run's grid."""
    weights, params = job.rewards.resolved()
    unit = variant.answer_unit(job.model.pixels.factor)
    return RewardSpec(weights, params, variant.reasoning, unit)


@dataclass(frozen=True)
class BatchRecipe:
    """What every batch of a run is made with."""

    job: GRPOJobConfig
    rewards: RewardSpec
    sampling: Sampling  # of the rollouts: ``G`` completions per prompt
    reasoning: bool  # the prompt variant asks for ``<think>``
    tokenizer: Tokenizer  # ids of written answers (contrastive sampling)
    vision_tokens: frozenset[int]  # ids that stand for images, never fed back as text

    @classmethod
    def build(cls, job: GRPOJobConfig, variant: PromptVariant, model: ModelSource) -> BatchRecipe:
        """The recipe of ``job``; loads ``model``'s tokenizer (:func:`ids_tokenizer`)."""
        tokenizer = ids_tokenizer(model)
        return cls(
            job=job,
            rewards=reward_spec(job, variant),
            sampling=_rollout_sampling(job),
            reasoning=variant.reasoning,
            tokenizer=tokenizer,
            vision_tokens=_vision_token_ids(tokenizer),
        )


def make_batch(
    step: int,
    recipe: BatchRecipe,
    stream: PromptStream,
    generate: Generate,
    extra_metrics: Callable[[], Mapping[str, float]] = dict,
) -> TrainBatch:
    """Batch ``step`` from prompts drawn from ``stream``, sampled through ``generate``.
    ``extra_metrics`` gives the caller's own metrics; it is called once sampling is done,
    so that counts the sampling changes (replaced engines) are current."""
    job = recipe.job
    drawn = _draw(step, recipe, stream, generate)
    kept, _ = fill_batch(
        drawn.candidates, job.rollout.prompts_per_step, job.algorithm.dynamic_sampling
    )
    batch = build_batch(step, kept, job.rollout.group_size, job.algorithm.advantage_scale)
    batch.metrics = {
        **_sampling_metrics(drawn, kept, batch, recipe),
        **extra_metrics(),
        "data/epoch": float(stream.position.epoch),
    }
    batch.drawn = drawn.prompt_ids
    _add_table_and_probe(batch, kept, step, recipe)
    return batch


# -- drawing and sampling -------------------------------------------------------------------


@dataclass
class _Drawn:
    """One batch's groups as they were drawn, and what drawing them took."""

    sampled: list[Group] = field(default_factory=list)  # as the policy sampled them (metrics)
    candidates: list[Group] = field(default_factory=list)  # after contrastive repair
    prompt_ids: list[str] = field(default_factory=list)
    draws: int = 0
    timing: dict[str, float] = field(
        default_factory=lambda: {"time/rollout": 0.0, "time/reward": 0.0}
    )
    repaired: dict[str, int] = field(default_factory=lambda: {"positive": 0, "negative": 0})


def _draw(step: int, recipe: BatchRecipe, stream: PromptStream, generate: Generate) -> _Drawn:
    """Draw, sample and score prompts until the batch is full (dynamic sampling) or the
    tries run out; without dynamic sampling, one draw."""
    algorithm = recipe.job.algorithm
    wanted, dynamic = recipe.job.rollout.prompts_per_step, algorithm.dynamic_sampling
    drawn = _Drawn()
    while drawn.draws < algorithm.max_sampling_tries:
        count = needs_more(drawn.candidates, wanted, dynamic)
        if count == 0:
            break
        items = stream.take(count)
        drawn.draws += 1
        drawn.prompt_ids.extend(item.prompt_id for item in items)
        groups = _rollouts(items, step, recipe, generate, drawn.timing)
        drawn.sampled.extend(groups)
        if algorithm.contrastive_sampling:
            groups = _contrastive(groups, step, recipe, generate, drawn)
        drawn.candidates.extend(groups)
        if not dynamic:
            break
    return drawn


def _rollouts(
    items: list[PromptItem],
    step: int,
    recipe: BatchRecipe,
    generate: Generate,
    timing: dict[str, float],
) -> list[Group]:
    """``G`` samples of each item for batch ``step``, seeded per (prompt, batch)."""
    started = time.perf_counter()
    prompts = [
        RolloutPrompt(item.prompt_id, item.inputs(), seed=_seed(recipe, step, item.prompt_id))
        for item in items
    ]
    rollouts = generate(prompts, recipe.sampling)
    scored = time.perf_counter()
    groups = [
        Group(item, tuple(_sample(item, r, recipe) for r in group))
        for item, group in zip(items, rollouts, strict=True)
    ]
    timing["time/rollout"] += scored - started
    timing["time/reward"] += time.perf_counter() - scored
    return groups


def _sample(item: PromptItem, rollout: Rollout, recipe: BatchRecipe, replaced: str = "") -> Sample:
    return scored_sample(
        item,
        recipe.rewards,
        text=rollout.text,
        token_ids=rollout.token_ids,
        logprobs=None if replaced else rollout.logprobs,
        version=rollout.version,
        finish_reason=rollout.finish_reason,
        replaced=replaced,  # type: ignore[arg-type]
        forbidden=recipe.vision_tokens,
    )


def _seed(recipe: BatchRecipe, step: int, prompt_id: str) -> int:
    return rollout_seed(recipe.job.schedule.seed, step, prompt_id)


# -- contrastive sampling -------------------------------------------------------------------


def _contrastive(
    groups: list[Group], step: int, recipe: BatchRecipe, generate: Generate, drawn: _Drawn
) -> list[Group]:
    """``groups`` with each zero-variance one repaired (:func:`~mmrad.rl.batch.repair_group`):
    a written ground-truth positive, or a negative (adversarial first, then written)."""
    flat = [g for g in groups if not g.has_variance]
    if not flat:
        return groups
    started = time.perf_counter()
    positives = {id(g): _written(g, recipe, ground_truth=True) for g in flat}
    want_negative = [g for g in flat if positives[id(g)].reward <= g.samples[0].reward]
    adversarial = _adversarial(want_negative, step, recipe, generate, drawn.timing)
    repaired = {}
    for group in flat:
        negatives = [*adversarial.get(id(group), []), _written(group, recipe, ground_truth=False)]
        fixed, kind = repair_group(group, positives[id(group)], negatives)
        if kind:
            drawn.repaired[kind] += 1
        repaired[id(group)] = fixed
    drawn.timing["time/reward"] += time.perf_counter() - started
    return [repaired.get(id(g), g) for g in groups]


def _adversarial(
    groups: list[Group],
    step: int,
    recipe: BatchRecipe,
    generate: Generate,
    timing: dict[str, float],
) -> dict[int, list[Sample]]:
    """One sample per group from a prompt that asks for the opposite verdict, scored
    as an answer to the real prompt (it has no sampling log-probs of that prompt)."""
    if not groups:
        return {}
    started = time.perf_counter()
    prompts = []
    for g in groups:
        prompt_id = f"{g.item.prompt_id}#adversarial"
        inputs = g.item.inputs(adversarial_hint(g.item))
        prompts.append(RolloutPrompt(prompt_id, inputs, seed=_seed(recipe, step, prompt_id)))
    rollouts = generate(prompts, replace(recipe.sampling, n=1))
    timing["time/rollout"] += time.perf_counter() - started
    return {
        id(g): [_sample(g.item, r[0], recipe, replaced="negative")]
        for g, r in zip(groups, rollouts, strict=True)
    }


def _written(group: Group, recipe: BatchRecipe, ground_truth: bool) -> Sample:
    """The record's answer (``ground_truth``) or its opposite, as a sample."""
    item = group.item
    anomalous = bool(item.record["is_anomalous"])
    if ground_truth:
        text = ground_truth_answer(item, recipe.reasoning, GENERIC_REASONING[anomalous],
                                   recipe.rewards.answer_unit)  # fmt: skip
    else:
        flipped = {**item.record, "is_anomalous": not anomalous, "boxes": [], "labels": [],
                   "reasoning": None}  # fmt: skip
        text = ground_truth_answer(
            replace(item, record=flipped), recipe.reasoning, GENERIC_REASONING[not anomalous]
        )
    tokenizer = recipe.tokenizer
    token_ids = [*tokenizer.encode(text).ids, tokenizer.token_to_id(END_OF_TURN_TOKEN)]
    return scored_sample(
        item, recipe.rewards, text=text, token_ids=token_ids, logprobs=None,
        version=group.samples[0].version, finish_reason="stop",
        replaced="positive" if ground_truth else "negative",
    )  # fmt: skip


# -- the batch's metrics, table and probe ---------------------------------------------------


def _sampling_metrics(
    drawn: _Drawn, kept: list[Group], batch: TrainBatch, recipe: BatchRecipe
) -> dict[str, float]:
    rollout_seconds = drawn.timing["time/rollout"]
    tokens = sum(len(s.token_ids) for g in drawn.sampled for s in g.samples)
    return {
        **rollout_metrics(drawn.sampled, recipe.job.rollout.group_size),
        **advantage_metrics(batch.advantages),
        **drawn.timing,
        "rollout/tokens_per_s": tokens / rollout_seconds if rollout_seconds else 0.0,
        "groups/draws": float(drawn.draws),
        "groups/filled_zero_variance": float(sum(not g.has_variance for g in kept)),
        "groups/contrastive_positive": float(drawn.repaired["positive"]),
        "groups/contrastive_negative": float(drawn.repaired["negative"]),
    }


def _add_table_and_probe(
    batch: TrainBatch, kept: list[Group], step: int, recipe: BatchRecipe
) -> None:
    """The sample table and the sync-check probe, on the steps that log them."""
    schedule = recipe.job.schedule
    if (step + 1) % schedule.sample_table_every == 0:
        batch.table = sample_rows(step + 1, kept, batch.advantages, schedule.sample_table_rows)
    if schedule.sync_check_every and (step + 1) % schedule.sync_check_every == 0:
        batch.probe = choose_probe(kept)


# -- the recipe's parts ---------------------------------------------------------------------


def _rollout_sampling(job: GRPOJobConfig) -> Sampling:
    rollout = job.rollout
    return Sampling(
        n=rollout.group_size,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        max_tokens=rollout.max_tokens,
        logprobs=0,
    )


def _vision_token_ids(tokenizer: Tokenizer) -> frozenset[int]:
    ids = (tokenizer.token_to_id(token) for token in VISION_TOKENS)
    return frozenset(i for i in ids if i is not None)
