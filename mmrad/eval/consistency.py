"""The annotation filter: a teacher's sample is kept only if it agrees with the truth and
does not give the hint away.

Stricter on purpose than the metrics (which give partial credit): a sample is accepted
only when all of these hold, checked in this order, and otherwise rejected with the first
reason that applies (one reason per sample, so counts add up):

1. ``error``: there is no completion (the image could not be read, the teacher failed,
   or it returned fewer than the ``n`` completions asked for).
2. ``bad_format``: the answer is not in the task format (``Verdict.format_ok``), or the
   think block is empty (nothing to learn from).
3. ``wrong_decision``: Yes for a normal image or No for an anomalous one.
4. ``missed_box``: some ground-truth box has no predicted box at IoU >= the threshold
   (one-to-one, :func:`mmrad.task.geometry.match_boxes`, as rewards and metrics match).
5. ``extra_box``: a predicted box matches no ground-truth box.
6. ``leaked_hint``: the reasoning mentions the hint (:data:`HINT_LEAK_PATTERNS`).

Labels are not compared: the new manifest's answer is made from the record, only the
reasoning is taken from the teacher.

Of an image's accepted samples the best one is kept (:func:`best_sample`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from mmrad.task.answer import Verdict
from mmrad.task.geometry import match_boxes

ACCEPTED = "accepted"
REASONS = ("error", "bad_format", "wrong_decision", "missed_box", "extra_box", "leaked_hint")
"""Rejection reasons, in the order they are checked."""
OUTCOMES = (ACCEPTED, *REASONS)
REASON_MEANING = {
    "error": "no completion: unreadable image, teacher or request failed",
    "bad_format": "not in the task format, or empty reasoning",
    "wrong_decision": "Yes for a normal image or No for an anomalous one",
    "missed_box": "a ground-truth box without a predicted box at the IoU threshold",
    "extra_box": "a predicted box that matches no ground-truth box",
    "leaked_hint": "the reasoning gives the hint away (coordinates, red boxes, 'hint')",
}
"""One line per rejection reason, for reports."""


@dataclass(frozen=True)
class LeakPattern:
    """A way reasoning can give the hint away: ``name`` (reported), the regular
    expression (case-insensitive, searched in the reasoning) and why it is a leak."""

    name: str
    regex: re.Pattern[str]
    why: str


def _leak(name: str, pattern: str, why: str) -> LeakPattern:
    return LeakPattern(name, re.compile(pattern, re.IGNORECASE), why)


_NUMBER = r"-?\d++(?:\.\d++)?"
"""Possessive quantifiers and a look-behind where a match starts keep every search linear
in the text's length: reasoning comes from a model, or from the network."""

HINT_LEAK_PATTERNS: tuple[LeakPattern, ...] = (
    _leak(
        "number_quadruple",
        rf"(?<![\d.]){_NUMBER}(?:\s*+[,;]\s*+{_NUMBER}){{3}}",
        "four numbers in a row read like a box copied from the hint",
    ),
    _leak(
        "bracketed_numbers",
        rf"[\[(]\s*+{_NUMBER}\s*+,\s*+{_NUMBER}",
        "a bracketed point or box, such as (34, 50) or [34, 50, ...]",
    ),
    _leak(
        "coordinate_words",
        r"\b(?:coordinates?|bbox(?:_2d)?|x[12]|y[12])\b",
        "talks about coordinates instead of what the image shows",
    ),
    _leak(
        "red_marking",
        r"\bred\s++(?:box(?:es)?|rectangles?|outlines?|outlined|frames?|borders?|squares?"
        r"|bounding|annotations?)\b"
        r"|\b(?:marked|outlined|boxed|highlighted|framed|enclosed|circled|drawn|indicated"
        r"|surrounded)\s++(?:in|with|by)\s++(?:an?\s++|the\s++)?red\b",
        "mentions the red outlines drawn on the query for the teacher",
    ),
    _leak(
        "given_box",
        r"\b(?:given|provided|marked|drawn|annotated|supplied)\s++(?:bounding\s++)?box(?:es)?\b"
        r"|\bbounding\s++box(?:es)?\s++(?:given|provided|shown|drawn|marked|supplied)\b",
        "refers to boxes that were given rather than found",
    ),
    _leak(
        "hint_words",
        r"\bhint(?:s|ed)?\b|\bground[\s-]?truth\b|\bannotations?\b|\bannotated\b",
        "mentions the hint or the annotation itself",
    ),
)
"""Everything :func:`find_leak` looks for in the reasoning, in order. The answer block is
not searched (it must hold the boxes). A colour named alone ("a red stain") is not a leak:
colour defects exist; only red *markings* are."""


def find_leak(reasoning: str | None) -> str | None:
    """The name of the first :data:`HINT_LEAK_PATTERNS` entry found in ``reasoning``."""
    if not reasoning:
        return None
    for pattern in HINT_LEAK_PATTERNS:
        if pattern.regex.search(reasoning):
            return pattern.name
    return None


@dataclass(frozen=True)
class Judgement:
    """One sample's fate. ``outcome`` is :data:`ACCEPTED` or one of :data:`REASONS`;
    ``detail`` says more (which leak pattern, how many boxes matched, the error);
    ``mean_iou`` is the mean IoU of the matched boxes (1.0 for a right "No")."""

    sample: int
    outcome: str
    detail: str = ""
    completion: str = ""
    reasoning: str | None = None
    mean_iou: float = 0.0

    @property
    def accepted(self) -> bool:
        return self.outcome == ACCEPTED


def judge_error(sample: int, message: str) -> Judgement:
    """A sample that never came back."""
    return Judgement(sample, "error", detail=message)


def judge(
    sample: int,
    completion: str,
    verdict: Verdict,
    gt_boxes: Sequence[Sequence[float]],
    is_anomalous: bool,
    threshold: float,
) -> Judgement:
    """Judge one parsed completion against the record's truth (boxes in the same pixels
    as ``verdict.boxes``, i.e. original pixels as the evaluation core parses them)."""

    def reject(reason: str, detail: str = "") -> Judgement:
        return Judgement(sample, reason, detail, completion, verdict.reasoning)

    if not verdict.format_ok:
        return reject("bad_format", "not in the task format")
    if not (verdict.reasoning or "").strip():
        return reject("bad_format", "empty reasoning")
    if verdict.decision is not bool(is_anomalous):
        return reject("wrong_decision", f"answered {'Yes' if verdict.decision else 'No'}")
    matches = match_boxes(gt_boxes, verdict.boxes, threshold)
    if len(matches) < len(gt_boxes):
        return reject("missed_box", f"{len(matches)} of {len(gt_boxes)} boxes matched")
    if len(verdict.boxes) > len(matches):
        return reject("extra_box", f"{len(verdict.boxes) - len(matches)} unmatched boxes")
    leak = find_leak(verdict.reasoning)
    if leak is not None:
        return reject("leaked_hint", leak)
    mean_iou = sum(m[2] for m in matches) / len(matches) if matches else 1.0
    return Judgement(sample, ACCEPTED, "", completion, verdict.reasoning, mean_iou)


def best_sample(judgements: Sequence[Judgement]) -> Judgement | None:
    """The accepted sample to keep: the highest mean IoU (the boxes the teacher drew best
    agree with its reasoning's account of where the defects are), then the shortest
    reasoning (fewer words, less to go wrong), then the lowest sample index (so the choice
    is deterministic). ``None`` when none was accepted."""
    accepted = [j for j in judgements if j.accepted]
    if not accepted:
        return None
    return min(accepted, key=lambda j: (-j.mean_iou, len(j.reasoning or ""), j.sample))
