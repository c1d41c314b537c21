"""One detection: the inspection prompt as training used it, greedy decoding with
log-probs, the answer parsed back to the query's original pixels.

The same pieces evaluation uses (:func:`~mmrad.engine.requests.grid_of`,
:func:`~mmrad.task.answer.parse_answer`, the engine's P(Yes) score), so a served model
answers exactly as it was evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmrad.engine.requests import InspectionInput, QueryGrid
from mmrad.engine.sampling import Completion, Sampling
from mmrad.model.contract import Contract
from mmrad.task.answer import Verdict, parse_answer
from mmrad.task.geometry import answer_scale

DETECT_LOGPROBS = 10
"""Alternatives kept per generated token: enough for both Yes and No to be among them
at the answer's first token (the score needs both)."""


def detect_sampling(max_tokens: int) -> Sampling:
    """Greedy, as evaluation decodes by default, with the log-probs the score needs."""
    return Sampling(n=1, temperature=0.0, max_tokens=max_tokens, logprobs=DETECT_LOGPROBS)


def decide(decision: bool | None, score: float | None, threshold: float | None) -> bool | None:
    """``anomalous``: ``score >= threshold`` when both exist, else the answer's own
    Yes/No (``None`` when it has neither)."""
    if threshold is not None and score is not None:
        return score >= threshold
    return decision


@dataclass(frozen=True)
class Detection:
    verdict: Verdict
    anomalous: bool | None
    score: float | None
    threshold: float | None
    completion: str


def detection(
    completion: Completion,
    grid: QueryGrid,
    *,
    reasoning: bool,
    threshold: float | None,
    answer_unit: int = 1,
) -> Detection:
    """A completion read back: boxes (``answer_unit`` model-grid pixels per coordinate)
    in the query's original pixels, clipped to it."""
    scale = answer_scale(grid.size, grid.grid, answer_unit)
    verdict = parse_answer(completion.text, scale=scale, size=grid.size, require_think=reasoning)
    return Detection(
        verdict=verdict,
        anomalous=decide(verdict.decision, completion.score, threshold),
        score=completion.score,
        threshold=threshold,
        completion=completion.text,
    )


def inspection(image, reference, category: str | None, contract: Contract) -> InspectionInput:
    """The engine's input for a request (the reference is used when the model's prompt
    variant shows one; the category's knowledge when it asks for domain knowledge)."""
    category = category or None
    return InspectionInput(image=image, reference=reference, category=category,
                           knowledge=contract.knowledge_of(category))  # fmt: skip
