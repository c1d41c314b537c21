"""The MMR-AD evaluation protocol: detection and localisation rates, and score metrics.

What is known of the paper's protocol (its full text is not at hand): a reference and a
query image per question; detection and localisation accuracy, precision and recall; a
box is a hit at IoU >= 0.1; rates per category, averaged, with an average column over
the source data sets. Where a definition is uncertain, both readings are computed.

Definitions:

- **Detection.** Positive = anomalous. A missing decision counts as the wrong answer: a
  false negative on an anomalous image, a false positive on a normal one.
- **Localisation.** An answer's boxes count only when its decision is Yes. Boxes are
  matched one-to-one with :func:`~mmrad.task.geometry.match_boxes` at IoU >= 0.1
  (:data:`LOC_IOU_THRESHOLD`). Within a category, precision = matched predicted boxes /
  predicted boxes and recall = matched ground-truth boxes / ground-truth boxes, both
  summed over the category's images. An answer is *fully right* when it says No on a
  normal image, or Yes with every ground-truth box matched on an anomalous one (extra
  boxes are precision's business).
- **Localisation accuracy, two readings.** The paper names a localisation accuracy
  beside the detection accuracy and does not say (as far as we know) over which images.

  - ``loc_accuracy`` (our main reading: "accuracy" over all images, as detection
    accuracy is): fully right images / all images. A normal image answered No counts as
    correctly localised, so a model that says No to everything scores the category's
    share of normal images.
  - ``loc_accuracy_anomalous`` (the other reading: localisation is judged only where
    there is something to localise): fully right images / anomalous images; undefined
    in a category without anomalous images.

  The report's det/loc table shows ``loc_accuracy``: the paper puts the two accuracies
  side by side under one name, which suggests one denominator (all query images), but
  nothing at hand confirms it.

- **Box hits, two readings.** ``loc_recall`` counts one-to-one matches, so one predicted
  box covering two defects finds one of them. ``box_hit_rate`` reads "a box hit at IoU
  >= 0.1" per ground-truth box: hit ground-truth boxes / ground-truth boxes, a box being
  hit when any counted predicted box overlaps it at IoU >= 0.1 (:func:`boxes_hit`). It
  is computed per category (pooled over the category's boxes) and averaged like every
  other rate; it differs from ``loc_recall`` only where one predicted box hits several
  ground-truth boxes.
- **Chance localisation** (``fixed_box_hit_rate``, ours, not the paper's): the
  ``box_hit_rate`` of the best single box drawn at the same place on every image (its
  corners on a :data:`FIXED_BOX_GRID` x :data:`FIXED_BOX_GRID` grid of the image, relative
  to its size), chosen on the category's own boxes: what localisation at IoU >= 0.1
  scores without looking at the image. Large defects make it high (a quarter of the
  image hits most of them), so a box hit rate means learning only above it. Averaged like
  the rates; ``None`` in a category without boxes.
- **F1** per category from that category's precision and recall.
- **Undefined ratios.** A ratio whose denominator is zero in a category (recall in an
  all-normal category, precision when nothing was predicted) is ``None`` there, and
  left out of that metric's averages; an F1 with an undefined part is undefined too.
- **Averages, two readings.** Per source = mean over its categories. The top-level keys
  (the "overall" of the report) are the mean over all (source, category) groups, which
  weights a source by its number of categories. ``source_mean`` is the mean over the
  sources of their per-source means, every source weighted equally. The paper's average
  column is, as far as we know, over sources, so ``source_mean`` is the number to set
  beside it; the category mean stays at the top level for the existing consumers.
  ``n_images`` and ``n_anomalous`` are sums in both.
- **Score metrics** (:data:`SCORE_KEYS`: ``auroc``, ``average_precision``, ``best_f1``),
  from the score P(Yes) of the first answer token
  (:func:`~mmrad.task.answer.yes_probability`). Each is pooled over the images of the
  set (top level), of each source and of each category, and is ``None`` when a score is
  missing there or only one class is present. ``source_mean`` holds the mean of the
  sources' pooled values (a source where one is undefined left out), matching its
  rates. ``best_f1`` is the F1 at the best threshold chosen on the same images: an
  upper bound on what one fixed threshold gets, not a held-out number.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmrad.task.answer import Verdict
from mmrad.task.geometry import as_boxes, iou, iou_matrix, match_boxes

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
    "loc_accuracy_anomalous",
    "box_hit_rate",
)
SCORE_KEYS = ("auroc", "average_precision", "best_f1")
BASELINE_KEYS = ("fixed_box_hit_rate",)
FIXED_BOX_GRID = 8


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
    hit: int  # ground-truth boxes some counted box overlaps at LOC_IOU_THRESHOLD
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
        hit=boxes_hit(gt, pred, LOC_IOU_THRESHOLD),
        gt_boxes=len(gt),
    )


def boxes_hit(
    gt: Sequence[Sequence[float]], pred: Sequence[Sequence[float]], threshold: float
) -> int:
    """How many ground-truth boxes some predicted box overlaps at ``IoU >= threshold``
    (and at all), one predicted box free to hit several: the per-box reading of "a hit at
    IoU >= 0.1", where :func:`~mmrad.task.geometry.match_boxes` pairs boxes one-to-one."""
    return sum(any(_is_hit(iou(g, p), threshold) for p in pred) for g in gt)


def _is_hit(overlap: float, threshold: float) -> bool:
    return overlap > 0 and overlap >= threshold  # as match_boxes: threshold 0 needs overlap


def evaluate(predictions: Sequence[Verdict], records: Sequence[Mapping[str, Any]]) -> dict:
    """Category-mean rates (the :data:`RATE_KEYS`), the pooled :data:`SCORE_KEYS`,
    ``n_images`` and ``n_anomalous`` at the top level; ``source_mean`` (the same keys as
    means over sources), ``per_source`` and ``per_category`` (keyed ``"source/category"``)
    dicts holding the same keys."""
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    outcomes = [image_outcome(v, r) for v, r in zip(predictions, records, strict=True)]
    scores = [v.score for v in predictions]
    groups: dict[tuple[str, str], list[int]] = {}
    for index, record in enumerate(records):
        groups.setdefault((str(record["source"]), str(record["category"])), []).append(index)

    def pooled_scores(indices: Iterable[int]) -> dict[str, float | None]:
        chosen = list(indices)
        return score_metrics([scores[i] for i in chosen], [outcomes[i].anomalous for i in chosen])

    per_category = {
        f"{source}/{category}": {
            **category_metrics([outcomes[i] for i in indices]),
            "fixed_box_hit_rate": fixed_box_hit_rate([records[i] for i in indices]),
            **pooled_scores(indices),
        }
        for (source, category), indices in groups.items()
    }
    averaged = (*RATE_KEYS, *BASELINE_KEYS)
    per_source = {}
    for source in dict.fromkeys(source for source, _ in groups):
        keys = [f"{s}/{c}" for s, c in groups if s == source]
        indices = [i for (s, _), idx in groups.items() if s == source for i in idx]
        per_source[source] = {
            **average_metrics([per_category[key] for key in keys], averaged),
            **pooled_scores(indices),
        }
    overall = {
        **average_metrics(list(per_category.values()), averaged),
        **pooled_scores(range(len(records))),
    }
    source_mean = average_metrics(list(per_source.values()), (*averaged, *SCORE_KEYS))
    return {
        **overall,
        "source_mean": source_mean,
        "per_source": per_source,
        "per_category": per_category,
    }


def category_metrics(outcomes: Sequence[ImageOutcome]) -> dict[str, Any]:
    """The rates of one category from its images' outcomes."""
    tp = sum(o.anomalous and o.predicted_yes for o in outcomes)
    fp = sum(not o.anomalous and not o.detection_correct for o in outcomes)
    fn = sum(o.anomalous and not o.predicted_yes for o in outcomes)
    n = len(outcomes)
    anomalous = [o for o in outcomes if o.anomalous]
    det_precision = ratio(tp, tp + fp)
    det_recall = ratio(tp, tp + fn)
    matched = sum(o.matched for o in outcomes)
    gt_boxes = sum(o.gt_boxes for o in outcomes)
    loc_precision = ratio(matched, sum(o.pred_boxes for o in outcomes))
    loc_recall = ratio(matched, gt_boxes)
    return {
        "det_accuracy": ratio(sum(o.detection_correct for o in outcomes), n),
        "det_precision": det_precision,
        "det_recall": det_recall,
        "det_f1": f1(det_precision, det_recall),
        "loc_accuracy": ratio(sum(o.fully_right for o in outcomes), n),
        "loc_precision": loc_precision,
        "loc_recall": loc_recall,
        "loc_f1": f1(loc_precision, loc_recall),
        "loc_accuracy_anomalous": ratio(sum(o.fully_right for o in anomalous), len(anomalous)),
        "box_hit_rate": ratio(sum(o.hit for o in outcomes), gt_boxes),
        "n_images": n,
        "n_anomalous": len(anomalous),
    }


def fixed_box_hit_rate(records: Sequence[Mapping[str, Any]]) -> float | None:
    """The ``box_hit_rate`` that the best fixed box (the same place on every image, its
    corners on a :data:`FIXED_BOX_GRID` grid) gets on ``records``; ``None`` without boxes."""
    relative = [
        [x1 / r["width"], y1 / r["height"], x2 / r["width"], y2 / r["height"]]
        for r in records
        for x1, y1, x2, y2 in as_boxes(r["boxes"])
    ]
    if not relative:
        return None
    edges = np.linspace(0.0, 1.0, FIXED_BOX_GRID + 1)
    spans = [(a, b) for i, a in enumerate(edges) for b in edges[i + 1 :]]
    fixed = [[x1, y1, x2, y2] for x1, x2 in spans for y1, y2 in spans]
    overlap = iou_matrix(np.asarray(relative), np.asarray(fixed))
    hits = (overlap > 0) & (overlap >= LOC_IOU_THRESHOLD)
    return float(hits.sum(axis=0).max() / len(relative))


def average_metrics(
    groups: Sequence[Mapping[str, Any]], keys: Sequence[str] = RATE_KEYS
) -> dict[str, Any]:
    """Mean of each of ``keys`` over the groups where it is defined; counts summed."""
    averaged: dict[str, Any] = {key: mean_defined([g[key] for g in groups]) for key in keys}
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


# ------------------------------------------------------------------------ score metrics


def score_metrics(
    scores: Sequence[float | None], labels: Sequence[bool]
) -> dict[str, float | None]:
    """The :data:`SCORE_KEYS` of a set of images; all ``None`` when a score is missing
    or only one class is present."""
    if any(s is None for s in scores) or not has_both_classes(labels):
        return dict.fromkeys(SCORE_KEYS)
    return {
        "auroc": auroc(scores, labels),
        "average_precision": average_precision(scores, labels),
        "best_f1": best_f1_threshold(scores, labels)[1],
    }


def has_both_classes(labels: Sequence[bool]) -> bool:
    """Whether ``labels`` hold an anomalous and a normal image (what every score metric
    needs)."""
    return len({bool(label) for label in labels}) == 2


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


def average_precision(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Average precision, step-wise as scikit-learn's ``average_precision_score``:
    ``sum_n (R_n - R_{n-1}) * P_n`` over the distinct scores ``t_n`` in descending order,
    where ``P_n`` and ``R_n`` are the precision and recall of ``score >= t_n`` and
    ``R_0 = 0`` (no interpolation; tied scores form one step). ``None`` when only one
    class is present."""
    if not has_both_classes(labels):
        return None
    _, tp, fp = _threshold_counts(scores, labels)
    precision = tp / (tp + fp)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


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
