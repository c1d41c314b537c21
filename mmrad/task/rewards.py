"""Verifiable rewards for GRPO: named components, combined as a weighted sum.

Each component takes the parsed :class:`~mmrad.task.answer.Verdict`, the record and its
parameters (thresholds included, so Ray Tune can sweep them); it declares the bounds its
value stays in. :func:`compute_reward` computes every registered component and weighs
them with the config's weights (what Tune sweeps); components weighted 0 are still
reported, so logs show ``reward/<component>/mean`` for all of them.

Some components are 0 for a whole class of images (``localization``, ``label`` and
``missed_boxes`` on normal images). That is deliberate: GRPO compares samples of the same
image, so a constant per image does not move the advantages.

Boxes are matched with :func:`~mmrad.task.geometry.match_boxes` in original pixels. Every
IoU threshold defaults to the evaluation's, :data:`~mmrad.task.metrics.LOC_IOU_THRESHOLD`
(0.1): a box the report counts as found is a box the reward counts as found.

A preset (:data:`REWARD_PRESETS`) names a whole reward, weights and parameters:

- ``paper`` (the default): MMR-AD's Anomaly-R1 as far as its protocol is known. The
  result reward is +1 for the right decision and -0.2 per missed ground-truth box:
  ``detection`` at weight 1 plus ``missed_boxes`` (a count) at weight -0.2, a box found
  at the metric's IoU threshold; no penalty for false boxes (the paper describes none).
  Anomaly-R1 also has a format reward: ``format`` at weight 1, added unweighted as R1
  recipes do (the paper's weight for it is not known to us).
- ``legacy``: this repository's reward before ``paper``: ``format`` 0.5, ``detection`` 1
  and ``localization`` 1 with the ``anomaly_r1`` variant at IoU 0.5, 0.2 per missed and
  0.1 per false box (``label``, weight 0, at IoU 0.5).
- ``none``: nothing preset, the weights given alone.

:func:`resolve_rewards` puts a config's own weights and parameters on top of its preset:
a weight given replaces the preset's weight of that component and the preset's other
weights stay (weight 0 switches a component off); parameters merge per component, key by
key, over the preset's and then the component's defaults.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from mmrad.task.answer import Verdict
from mmrad.task.geometry import Box, as_boxes, match_boxes
from mmrad.task.metrics import LOC_IOU_THRESHOLD

RewardFn = Callable[..., float]


@dataclass(frozen=True)
class RewardComponent:
    """A registered reward: ``fn(verdict, record, **params)`` within ``[lower, upper]``."""

    name: str
    fn: RewardFn
    lower: float
    upper: float
    defaults: Mapping[str, Any]

    def __call__(self, verdict: Verdict, record: Mapping[str, Any], **params: Any) -> float:
        self.check_params(params)
        return float(self.fn(verdict, record, **{**self.defaults, **params}))

    def check_params(self, params: Mapping[str, Any]) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {unknown} for reward {self.name!r}; "
                f"it takes {sorted(self.defaults)}"
            )


@dataclass(frozen=True)
class RewardBreakdown:
    total: float
    components: dict[str, float]


REWARDS: dict[str, RewardComponent] = {}


def reward(name: str, *, lower: float = 0.0, upper: float = 1.0, **defaults: Any):
    """Register a reward component under ``name`` with its bounds and default parameters."""

    def register(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = RewardComponent(name, fn, lower, upper, MappingProxyType(defaults))
        return fn

    return register


def compute_reward(
    verdict: Verdict,
    record: Mapping[str, Any],
    weights: Mapping[str, float],
    params: Mapping[str, Mapping[str, Any]] | None = None,
) -> RewardBreakdown:
    """Every component's value and ``total = sum(weight * value)``."""
    params = params or {}
    _check_names(weights, "weights")
    _check_names(params, "params")
    components = {
        name: component(verdict, record, **params.get(name, {}))
        for name, component in REWARDS.items()
    }
    total = sum(weight * components[name] for name, weight in weights.items())
    return RewardBreakdown(total=float(total), components=components)


def reward_bounds(weights: Mapping[str, float]) -> tuple[float, float]:
    """The bounds the total stays in, from the components' declared bounds; a component
    without an upper bound (``missed_boxes``) makes the total unbounded on its side."""
    _check_names(weights, "weights")
    low = high = 0.0
    for name, weight in weights.items():
        if weight == 0:
            continue  # adds nothing, even to an infinite bound
        ends = (weight * REWARDS[name].lower, weight * REWARDS[name].upper)
        low += min(ends)
        high += max(ends)
    return low, high


def reward_log_metrics(breakdowns: Sequence[RewardBreakdown]) -> dict[str, float]:
    """``reward/total/mean`` and ``reward/<component>/mean`` over a batch."""
    if not breakdowns:
        return {}
    count = len(breakdowns)
    metrics = {"reward/total/mean": sum(b.total for b in breakdowns) / count}
    for name in breakdowns[0].components:
        metrics[f"reward/{name}/mean"] = sum(b.components[name] for b in breakdowns) / count
    return metrics


def _check_names(given: Mapping[str, Any], what: str) -> None:
    unknown = sorted(set(given) - set(REWARDS))
    if unknown:
        raise ValueError(f"{what}: unknown component(s) {unknown}; known: {sorted(REWARDS)}")


# --------------------------------------------------------------------------- components


@reward("format")
def format_reward(verdict: Verdict, record: Mapping[str, Any]) -> float:
    """1 when the answer has the required shape (``Verdict.format_ok``)."""
    return 1.0 if verdict.format_ok else 0.0


@reward("detection")
def detection_reward(verdict: Verdict, record: Mapping[str, Any]) -> float:
    """1 when the decision matches the label; no decision is 0."""
    return 1.0 if verdict.decision is bool(record["is_anomalous"]) else 0.0


@reward(
    "localization",
    variant="anomaly_r1",
    threshold=LOC_IOU_THRESHOLD,
    miss_penalty=0.2,
    false_penalty=0.0,  # the paper describes no false-box penalty; ``legacy`` has 0.1
)
def localization_reward(
    verdict: Verdict,
    record: Mapping[str, Any],
    *,
    variant: str,
    threshold: float,
    miss_penalty: float,
    false_penalty: float,
) -> float:
    """Anomalous images only: 0 unless the answer is Yes with boxes, then the variant's
    score of the predicted boxes against the ground truth. 0 on normal images."""
    if variant not in LOCALIZATION_VARIANTS:
        raise ValueError(
            f"unknown localization variant {variant!r}; known: {sorted(LOCALIZATION_VARIANTS)}"
        )
    _check_unit_interval("threshold", threshold)
    if miss_penalty < 0 or false_penalty < 0:
        raise ValueError(f"penalties must be >= 0, got {miss_penalty}, {false_penalty}")
    if not record["is_anomalous"] or verdict.decision is not True or not verdict.boxes:
        return 0.0
    score = LOCALIZATION_VARIANTS[variant]
    return score(
        as_boxes(record["boxes"]),
        as_boxes(verdict.boxes),
        threshold=threshold,
        miss_penalty=miss_penalty,
        false_penalty=false_penalty,
    )


def anomaly_r1_localization(
    gt: Sequence[Box],
    pred: Sequence[Box],
    *,
    threshold: float,
    miss_penalty: float,
    false_penalty: float,
) -> float:
    """``max(0, 1 - miss_penalty * missed - false_penalty * false)``: ``missed`` ground-truth
    and ``false`` predicted boxes left unmatched at ``threshold`` (Anomaly-R1)."""
    matched = len(match_boxes(gt, pred, threshold))
    missed, false = len(gt) - matched, len(pred) - matched
    return max(0.0, 1.0 - miss_penalty * missed - false_penalty * false)


def iou_localization(gt: Sequence[Box], pred: Sequence[Box], **_: Any) -> float:
    """Sum of matched IoUs over ``max(#gt, #pred)``; pairs match at any overlap, so the
    threshold and penalties do not apply."""
    denominator = max(len(gt), len(pred))
    if denominator == 0:
        return 0.0
    return sum(overlap for _, _, overlap in match_boxes(gt, pred, 0.0)) / denominator


LOCALIZATION_VARIANTS: dict[str, Callable[..., float]] = {
    "anomaly_r1": anomaly_r1_localization,
    "iou": iou_localization,
}


@reward("missed_boxes", upper=math.inf, threshold=LOC_IOU_THRESHOLD)
def missed_boxes_reward(verdict: Verdict, record: Mapping[str, Any], *, threshold: float) -> float:
    """The ground-truth boxes no predicted box matches at ``threshold``, counted as the
    metric's recall counts them: boxes count only after Yes, so No on an anomalous image
    misses them all. 0 on normal images. A penalty: weigh it below 0 (the paper's -0.2
    per missed box is weight -0.2)."""
    _check_unit_interval("threshold", threshold)
    gt = as_boxes(record["boxes"])
    return float(len(gt) - len(match_boxes(gt, counted_boxes(verdict), threshold)))


def counted_boxes(verdict: Verdict) -> list[Box]:
    """The boxes an answer stands by: those after Yes (as the metrics count them)."""
    return as_boxes(verdict.boxes) if verdict.decision is True else []


@reward("label", threshold=LOC_IOU_THRESHOLD)
def label_reward(verdict: Verdict, record: Mapping[str, Any], *, threshold: float) -> float:
    """Anomalous images only: the fraction of ground-truth boxes matched (at ``threshold``)
    by a predicted box whose label names the ground-truth label; boxes count only after
    Yes. 0 on normal images and on anomalous images without ground-truth boxes."""
    _check_unit_interval("threshold", threshold)
    gt = as_boxes(record["boxes"])
    if not record["is_anomalous"] or verdict.decision is not True or not gt:
        return 0.0
    gt_labels = list(record["labels"])
    matches = match_boxes(gt, as_boxes(verdict.boxes), threshold)
    named = sum(labels_agree(verdict.labels[pi], gt_labels[gi]) for gi, pi, _ in matches)
    return named / len(gt)


def normalise_label(label: str) -> str:
    """Lower case, ``_`` and ``-`` as spaces, single spaces: ``Broken_Large`` → ``broken large``."""
    return " ".join(str(label).lower().replace("_", " ").replace("-", " ").split())


def labels_agree(predicted: str, truth: str) -> bool:
    """The predicted label names the true one: equal or one containing the other, after
    :func:`normalise_label`; an empty label names nothing."""
    a, b = normalise_label(predicted), normalise_label(truth)
    return bool(a and b) and (a in b or b in a)


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


# ------------------------------------------------------------------------------ presets


@dataclass(frozen=True)
class RewardPreset:
    """A named reward: weights and per-component parameters (see the module docstring)."""

    weights: Mapping[str, float]
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


REWARD_PRESETS: dict[str, RewardPreset] = {
    "paper": RewardPreset(
        weights={"format": 1.0, "detection": 1.0, "missed_boxes": -0.2},
        params={"missed_boxes": {"threshold": LOC_IOU_THRESHOLD}},
    ),
    "legacy": RewardPreset(
        weights={"format": 0.5, "detection": 1.0, "localization": 1.0},
        params={
            "localization": {
                "variant": "anomaly_r1",
                "threshold": 0.5,
                "miss_penalty": 0.2,
                "false_penalty": 0.1,
            },
            "label": {"threshold": 0.5},
        },
    ),
    "none": RewardPreset(weights={}),
}
DEFAULT_PRESET = "paper"


def resolve_rewards(
    preset: str,
    weights: Mapping[str, float] | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """The weights and parameters of ``preset`` with ``weights`` and ``params`` on top
    (merged as the module docstring says). The parameters come out complete: every
    parameter of every component that has any, so a resolved config names them all."""
    if preset not in REWARD_PRESETS:
        raise ValueError(f"unknown reward preset {preset!r}; known: {sorted(REWARD_PRESETS)}")
    chosen, weights, params = REWARD_PRESETS[preset], weights or {}, params or {}
    _check_names(weights, "weights")
    _check_names(params, "params")
    for name, given in params.items():
        REWARDS[name].check_params(given)
    merged = {
        name: {**component.defaults, **chosen.params.get(name, {}), **params.get(name, {})}
        for name, component in REWARDS.items()
        if component.defaults
    }
    return {**chosen.weights, **weights}, merged
