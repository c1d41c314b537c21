"""The MMR-AD evaluation protocol: detection and localisation metrics, AUROC.

Definitions (the paper leaves some of them open; these are ours):

- **Detection.** Positive = anomalous. A missing decision counts as the wrong answer: a
  false negative on an anomalous image, a false positive on a normal one.
- **Localisation.** An answer's boxes count only when its decision is Yes. Boxes are
  matched one-to-one with :func:`~mmrad.task.geometry.match_boxes` at IoU >= 0.1
  (:data:`LOC_IOU_THRESHOLD`). Within a category, precision = matched predicted boxes /
  predicted boxes and recall = matched ground-truth boxes / ground-truth boxes, both
  summed over the category's images. Accuracy = share of images whose answer is fully
  right: No on a normal image; Yes with every ground-truth box matched on an anomalous
  one (extra boxes are precision's business).
- **F1** per category from that category's precision and recall.
- **Undefined ratios.** A ratio whose denominator is zero in a category (recall in an
  all-normal category, precision when nothing was predicted) is ``None`` there, and
  left out of that metric's averages; an F1 with an undefined part is undefined too.
- **Averages.** Per source = mean over its categories; overall = mean over all
  (source, category) groups. ``n_images`` and ``n_anomalous`` are sums.
- **AUROC** (only when every verdict has a score): pooled over the images of the set, of
  each source and of each category; ``None`` when only one class is present. The score
  is P(Yes) from the first answer token (:func:`~mmrad.task.answer.yes_probability`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmrad.task.answer import Verdict
from mmrad.task.geometry import as_boxes, match_boxes

LOC_IOU_THRESHOLD = 0.1
RATE_KEYS = (
    "det_accuracy",
    "det_precision",
    "det_recall",
    "det_f1",
    "loc_accuracy",
    "loc_precision",
    "loc_recall",
    "loc_f1",
)


def check_rate_names(names: Sequence[str]) -> None:
    """Raise ``ValueError`` naming every entry of ``names`` that is not in :data:`RATE_KEYS`."""
    unknown = [name for name in names if name not in RATE_KEYS]
    if unknown:
        raise ValueError(f"objective terms {unknown} are not among {list(RATE_KEYS)}")


def objective_value(metrics: Mapping[str, Any], terms: Sequence[str]) -> float | None:
    """A sum of named rates (for example ``[loc_f1]`` or ``[det_accuracy, loc_accuracy]``):
    GRPO's ``val/objective``, the metric a sweep maximises. None when one is undefined."""
    values = [metrics.get(term) for term in terms]
    if any(v is None for v in values):
        return None
    return float(sum(values))


@dataclass(frozen=True)
class ImageOutcome:
    """What one answer scores on one image: the counts every metric is built from."""

    anomalous: bool
    predicted_yes: bool  # decision is Yes (``None`` is not Yes)
    detection_correct: bool
    pred_boxes: int  # boxes that count (decision Yes)
    matched: int  # one-to-one matches at LOC_IOU_THRESHOLD
    gt_boxes: int

    @property
    def fully_right(self) -> bool:
        """No on a normal image; Yes with every ground-truth box matched on an anomalous one."""
        if not self.anomalous:
            return self.detection_correct
        return self.predicted_yes and self.matched == self.gt_boxes


def image_outcome(verdict: Verdict, record: Mapping[str, Any]) -> ImageOutcome:
    anomalous = bool(record["is_anomalous"])
    gt = as_boxes(record["boxes"])
    pred = as_boxes(verdict.boxes) if verdict.decision is True else []
    return ImageOutcome(
        anomalous=anomalous,
        predicted_yes=verdict.decision is True,
        detection_correct=verdict.decision is not None and verdict.decision == anomalous,
        pred_boxes=len(pred),
        matched=len(match_boxes(gt, pred, LOC_IOU_THRESHOLD)),
        gt_boxes=len(gt),
    )


def evaluate(predictions: Sequence[Verdict], records: Sequence[Mapping[str, Any]]) -> dict:
    """Overall metrics (the :data:`RATE_KEYS`, ``auroc``, ``n_images``, ``n_anomalous``)
    with ``per_source`` and ``per_category`` (keyed ``"source/category"``) dicts holding
    the same keys."""
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    outcomes = [image_outcome(v, r) for v, r in zip(predictions, records, strict=True)]
    scores = [v.score for v in predictions]
    groups: dict[tuple[str, str], list[int]] = {}
    for index, record in enumerate(records):
        groups.setdefault((str(record["source"]), str(record["category"])), []).append(index)

    per_category = {
        f"{source}/{category}": {
            **category_metrics([outcomes[i] for i in indices]),
            "auroc": _auroc_of(indices, outcomes, scores),
        }
        for (source, category), indices in groups.items()
    }
    per_source = {}
    for source in dict.fromkeys(source for source, _ in groups):
        keys = [f"{s}/{c}" for s, c in groups if s == source]
        indices = [i for (s, _), idx in groups.items() if s == source for i in idx]
        per_source[source] = {
            **average_metrics([per_category[key] for key in keys]),
            "auroc": _auroc_of(indices, outcomes, scores),
        }
    overall = {
        **average_metrics(list(per_category.values())),
        "auroc": _auroc_of(range(len(records)), outcomes, scores),
    }
    return {**overall, "per_source": per_source, "per_category": per_category}


def category_metrics(outcomes: Sequence[ImageOutcome]) -> dict[str, Any]:
    """The rates of one category from its images' outcomes."""
    tp = sum(o.anomalous and o.predicted_yes for o in outcomes)
    fp = sum(not o.anomalous and not o.detection_correct for o in outcomes)
    fn = sum(o.anomalous and not o.predicted_yes for o in outcomes)
    n = len(outcomes)
    det_precision = ratio(tp, tp + fp)
    det_recall = ratio(tp, tp + fn)
    matched = sum(o.matched for o in outcomes)
    loc_precision = ratio(matched, sum(o.pred_boxes for o in outcomes))
    loc_recall = ratio(matched, sum(o.gt_boxes for o in outcomes))
    return {
        "det_accuracy": ratio(sum(o.detection_correct for o in outcomes), n),
        "det_precision": det_precision,
        "det_recall": det_recall,
        "det_f1": f1(det_precision, det_recall),
        "loc_accuracy": ratio(sum(o.fully_right for o in outcomes), n),
        "loc_precision": loc_precision,
        "loc_recall": loc_recall,
        "loc_f1": f1(loc_precision, loc_recall),
        "n_images": n,
        "n_anomalous": sum(o.anomalous for o in outcomes),
    }


def average_metrics(groups: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean of each rate over the groups where it is defined; counts summed."""
    averaged: dict[str, Any] = {key: mean_defined([g[key] for g in groups]) for key in RATE_KEYS}
    averaged["n_images"] = sum(g["n_images"] for g in groups)
    averaged["n_anomalous"] = sum(g["n_anomalous"] for g in groups)
    return averaged


def ratio(numerator: float, denominator: float) -> float | None:
    """``numerator / denominator``; ``None`` (undefined) when the denominator is 0."""
    return numerator / denominator if denominator else None


def f1(precision: float | None, recall: float | None) -> float | None:
    """Harmonic mean; undefined when either part is, 0 when both are 0."""
    if precision is None or recall is None:
        return None
    total = precision + recall
    return 2 * precision * recall / total if total else 0.0


def mean_defined(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are not ``None``; ``None`` when there are none."""
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def _auroc_of(
    indices: Sequence[int], outcomes: Sequence[ImageOutcome], scores: Sequence[float | None]
) -> float | None:
    chosen = [scores[i] for i in indices]
    if not chosen or any(s is None for s in chosen):
        return None
    return auroc(chosen, [outcomes[i].anomalous for i in indices])


# ------------------------------------------------------------------------ score metrics


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve as the Mann-Whitney U statistic over average ranks (ties
    count one half); ``None`` when only one class is present."""
    scores_arr = np.asarray(scores, dtype=float)
    positive = np.asarray(labels, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum = average_ranks(scores_arr)[positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.concatenate(([0], np.flatnonzero(np.diff(ordered)) + 1))
    ends = np.concatenate((starts[1:], [len(values)]))
    ranks = np.empty(len(values), dtype=float)
    ranks[order] = np.repeat((starts + 1 + ends) / 2, ends - starts)
    return ranks


def _threshold_counts(
    scores: Sequence[float], labels: Sequence[bool]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each distinct score, descending: true and false positives of ``score >= t``."""
    scores_arr = np.asarray(scores, dtype=float)
    positive = np.asarray(labels, dtype=bool)
    order = np.argsort(-scores_arr, kind="stable")
    ordered, hits = scores_arr[order], positive[order]
    last_of_each = np.concatenate((np.flatnonzero(np.diff(ordered)), [len(ordered) - 1]))
    tp = np.cumsum(hits)[last_of_each]
    fp = np.cumsum(~hits)[last_of_each]
    return ordered[last_of_each], tp, fp


def roc_curve(scores: Sequence[float], labels: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at each distinct threshold, from (0, 0) to (1, 1)."""
    _, tp, fp = _threshold_counts(scores, labels)
    n_pos, n_neg = tp[-1], fp[-1]
    if n_pos == 0 or n_neg == 0:
        raise ValueError("a ROC curve needs both anomalous and normal images")
    return np.concatenate(([0.0], fp / n_neg)), np.concatenate(([0.0], tp / n_pos))


def best_f1_threshold(scores: Sequence[float], labels: Sequence[bool]) -> tuple[float, float]:
    """The score threshold (predict anomalous at ``score >= threshold``) with the best
    detection F1, and that F1. The threshold is one of the scores; among equally good
    ones the highest wins. Without anomalous images every F1 is 0."""
    if len(scores) == 0:
        raise ValueError("best_f1_threshold needs at least one score")
    thresholds, tp, fp = _threshold_counts(scores, labels)
    fn = tp[-1] - tp
    f1_scores = 2 * tp / (2 * tp + fp + fn)
    best = int(np.argmax(f1_scores))
    return float(thresholds[best]), float(f1_scores[best])
