"""What to sample and what came back: :class:`Sampling` in, :class:`Completion` out.

Log-probs are vLLM's default ``raw_logprobs``: the model's distribution before
temperature, top-p or any other processing, for sampled and prompt tokens alike. That is
what a GRPO learner recomputes (at temperature 1), and it is why
:meth:`~mmrad.engine.engine.Engine.prompt_logprobs` reproduces a completion's sampling
log-probs exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mmrad.task.answer import answer_token_index, yes_probability


@dataclass(frozen=True)
class Sampling:
    """How to sample: ``n`` completions per prompt; ``temperature=0`` is greedy.

    ``logprobs=None`` returns no log-probs and no score; ``logprobs=k`` returns the
    sampled token's log-prob at every position and scores the answer from the top ``k``
    alternatives there (``k >= 5`` or so, so that both "Yes" and "No" are among them;
    vLLM caps ``k`` at 20). ``seed`` makes sampling reproducible (vLLM gives the ``n``
    completions seeds ``seed, seed + 1, ...``).
    """

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 512
    logprobs: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def to_vllm(self) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_tokens,
            logprobs=self.logprobs,
            seed=self.seed,
            stop=list(self.stop) or None,
        )


@dataclass(frozen=True)
class Completion:
    """One sampled completion.

    ``logprobs[i]`` is the log-prob of ``token_ids[i]`` (``None`` unless the
    :class:`Sampling` asked for log-probs). ``score`` is P(Yes) from the first token of
    the answer block (see :func:`answer_score`); ``None`` without log-probs or without an
    answer. ``finish_reason`` is vLLM's: ``"stop"`` (end of sequence or a stop string) or
    ``"length"`` (``max_tokens`` reached).
    """

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None = None
    score: float | None = None
    finish_reason: str | None = None


def completion_from_output(output: Any) -> Completion:
    """A :class:`Completion` from one vLLM ``CompletionOutput``."""
    token_ids = tuple(output.token_ids)
    steps = token_logprobs(output)
    if steps is None:
        return Completion(output.text, token_ids, finish_reason=output.finish_reason)
    return Completion(
        text=output.text,
        token_ids=token_ids,
        logprobs=steps.logprobs,
        score=answer_score(steps.tokens, steps.top),
        finish_reason=output.finish_reason,
    )


@dataclass(frozen=True)
class TokenLogprobs:
    """Per generated token: its text, its log-prob, and the top alternatives there
    (text → log-prob, see :func:`top_by_text`); the OpenAI ``logprobs`` shape in parts."""

    tokens: tuple[str, ...]
    logprobs: tuple[float, ...]
    top: tuple[dict[str, float], ...]


def token_logprobs(output: Any) -> TokenLogprobs | None:
    """The log-probs of a vLLM ``CompletionOutput`` (a whole one, or a streamed delta),
    ``None`` when none were asked for."""
    steps = output.logprobs
    if steps is None:
        return None
    chosen = [step[token] for step, token in zip(steps, output.token_ids, strict=True)]
    return TokenLogprobs(
        tokens=tuple(entry.decoded_token or "" for entry in chosen),
        logprobs=tuple(float(entry.logprob) for entry in chosen),
        top=tuple(top_by_text(step) for step in steps),
    )


def top_by_text(step: Mapping[int, Any]) -> dict[str, float]:
    """One position's ``{token_id: Logprob}`` as ``{decoded text: log-prob}``; ids that
    decode to the same text (rare) have their probabilities added."""
    by_text: dict[str, float] = {}
    for entry in step.values():
        text = entry.decoded_token or ""
        logprob = float(entry.logprob)
        previous = by_text.get(text)
        by_text[text] = logprob if previous is None else _logaddexp(previous, logprob)
    return by_text


def answer_score(
    tokens: Sequence[str], top_logprobs: Sequence[Mapping[str, float]]
) -> float | None:
    """P(Yes) at the answer's first token: ``tokens`` are the generated tokens' texts,
    ``top_logprobs[i]`` the alternatives (text → log-prob) at position ``i``. ``None``
    when there is no answer block or neither word is among the alternatives."""
    index = answer_token_index(tokens)
    if index is None or index >= len(top_logprobs):
        return None
    return yes_probability(top_logprobs[index])


def _logaddexp(a: float, b: float) -> float:
    top = max(a, b)
    if top == -math.inf:
        return top
    return top + math.log(math.exp(a - top) + math.exp(b - top))
