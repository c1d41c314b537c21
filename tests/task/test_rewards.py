"""Reward components, their combination, their bounds and the presets (hand-worked values)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmrad.task.answer import Verdict, parse_answer
from mmrad.task.metrics import LOC_IOU_THRESHOLD, evaluate
from mmrad.task.rewards import (
    REWARD_PRESETS,
    REWARDS,
    RewardBreakdown,
    compute_reward,
    labels_agree,
    normalise_label,
    resolve_rewards,
    reward_bounds,
    reward_log_metrics,
)

A, B, C = [0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]
B_SHIFTED = [25, 20, 35, 30]  # IoU with B: 50 / 150 = 1/3
B_NUDGED = [27, 20, 37, 30]  # IoU with B: 30 / 170 = 0.18, a hit for the metric (>= 0.1)
FAR = [80, 80, 90, 90]
LEGACY = REWARD_PRESETS["legacy"].params


def record(boxes=(), labels=None, anomalous=None):
    boxes = [list(b) for b in boxes]
    return {
        "id": "r",
        "source": "mvtec",
        "category": "bottle",
        "is_anomalous": bool(boxes) if anomalous is None else anomalous,
        "boxes": boxes,
        "labels": list(labels) if labels is not None else ["defect"] * len(boxes),
        "width": 100,
        "height": 100,
    }


def yes(*boxes, labels=None, format_ok=True):
    labels = list(labels) if labels is not None else [""] * len(boxes)
    return Verdict(True, [list(map(float, b)) for b in boxes], labels, "r", format_ok)


NO = Verdict(False, [], [], "r", True)
NONE = Verdict(None, [], [], None, False)
NORMAL = record()


def value(name, verdict, rec, **params):
    return REWARDS[name](verdict, rec, **params)


def test_registry_names_and_bounds():
    assert set(REWARDS) == {"format", "detection", "localization", "label", "missed_boxes"}
    bounded = {name: c for name, c in REWARDS.items() if name != "missed_boxes"}
    assert all((c.lower, c.upper) == (0.0, 1.0) for c in bounded.values())
    assert (REWARDS["missed_boxes"].lower, REWARDS["missed_boxes"].upper) == (0.0, math.inf)
    assert dict(REWARDS["localization"].defaults) == {
        "variant": "anomaly_r1",
        "threshold": LOC_IOU_THRESHOLD,
        "miss_penalty": 0.2,
        "false_penalty": 0.0,
    }


def test_every_threshold_defaults_to_the_metrics():
    thresholds = {name: c.defaults["threshold"] for name, c in REWARDS.items() if c.defaults}
    assert thresholds == dict.fromkeys(["localization", "label", "missed_boxes"], 0.1)


# -------------------------------------------------------------------------------- format


def test_format_follows_format_ok():
    assert value("format", yes(A), NORMAL) == 1.0
    assert value("format", yes(A, format_ok=False), NORMAL) == 0.0
    assert value("format", NONE, NORMAL) == 0.0


# ----------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("verdict", "rec", "expected"),
    [
        (yes(A), record([A]), 1.0),
        (NO, record([A]), 0.0),
        (NONE, record([A]), 0.0),
        (NO, NORMAL, 1.0),
        (yes(A), NORMAL, 0.0),
        (NONE, NORMAL, 0.0),
    ],
)
def test_detection(verdict, rec, expected):
    assert value("detection", verdict, rec) == expected


# -------------------------------------------------------------------------- localization


def test_localization_anomaly_r1_counts_misses_and_false_boxes():
    rec = record([A, B, C])
    verdict = yes(A, B_SHIFTED, FAR)
    legacy = LEGACY["localization"]
    # threshold 0.5: only A matches -> 2 missed, 2 false -> 1 - 0.4 - 0.2
    assert value("localization", verdict, rec, **legacy) == pytest.approx(0.4)
    # threshold 0.3 also matches B (IoU 1/3) -> 1 missed, 1 false -> 1 - 0.2 - 0.1
    assert value("localization", verdict, rec, **{**legacy, "threshold": 0.3}) == (
        pytest.approx(0.7)
    )
    assert value(
        "localization", verdict, rec, threshold=0.5, miss_penalty=0.25, false_penalty=0.05
    ) == pytest.approx(1 - 0.5 - 0.1)


def test_localization_defaults_find_boxes_as_the_metric_does_and_ignore_false_ones():
    # IoU 0.18 is a hit for the metric; the default threshold (0.1) agrees, 0.5 did not
    assert value("localization", yes(B_NUDGED, FAR, FAR), record([B])) == 1.0
    # at 0.5 the same box is one missed and one false box: 1 - 0.2 - 0.1
    assert value("localization", yes(B_NUDGED), record([B]), **LEGACY["localization"]) == (
        pytest.approx(0.7)
    )


def test_localization_perfect_and_floored_at_zero():
    assert value("localization", yes(A, B), record([B, A])) == 1.0
    # 1 missed and 11 false boxes: 1 - 0.2 - 1.1 < 0
    assert value("localization", yes(*[FAR] * 11), record([A]), false_penalty=0.1) == 0.0


@pytest.mark.parametrize(
    ("verdict", "rec"),
    [
        (NO, record([A])),  # no Yes
        (Verdict(False, [A], [""], "r", False), record([A])),  # boxes after No
        (yes(), record([A])),  # Yes without boxes
        (NONE, record([A])),
        (yes(A), NORMAL),  # normal image: always 0
        (NO, NORMAL),
    ],
)
def test_localization_zero_cases(verdict, rec):
    assert value("localization", verdict, rec) == 0.0
    assert value("localization", verdict, rec, variant="iou") == 0.0


def test_localization_iou_variant():
    # matched at any overlap: A (IoU 1) and B (IoU 1/3); FAR unmatched; max(#gt, #pred) = 3
    assert value("localization", yes(A, B_SHIFTED, FAR), record([A, B]), variant="iou") == (
        pytest.approx((1 + 1 / 3) / 3)
    )
    assert value("localization", yes(A), record([A, B, C]), variant="iou") == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "params",
    [{"variant": "giou"}, {"threshold": 1.5}, {"threshold": -0.1}, {"miss_penalty": -1}],
)
def test_localization_rejects_bad_params(params):
    with pytest.raises(ValueError):
        value("localization", yes(A), record([A]), **params)


def test_component_rejects_unknown_params():
    with pytest.raises(ValueError, match="unknown parameter.*'thresh'.*'localization'"):
        value("localization", yes(A), record([A]), thresh=0.3)


# -------------------------------------------------------------------------- missed boxes


@pytest.mark.parametrize(
    ("verdict", "rec", "missed"),
    [
        (yes(A, B_NUDGED, FAR), record([A, B, C]), 1),  # B hit at IoU 0.18; FAR costs nothing
        (yes(FAR), record([A, B]), 2),
        (NO, record([A, B, C]), 3),  # boxes count only after Yes: No misses them all
        (Verdict(False, [A], [""], "r", False), record([A]), 1),  # a box after No
        (NONE, record([A]), 1),
        (yes(A), record([A, A]), 1),  # one predicted box finds one ground-truth box
        (yes(A), NORMAL, 0),  # normal images have nothing to miss
        (NO, NORMAL, 0),
        (yes(A), record([], [], anomalous=True), 0),  # anomalous without boxes
    ],
)
def test_missed_boxes_counts_the_ground_truth_boxes_not_found(verdict, rec, missed):
    assert value("missed_boxes", verdict, rec) == missed


def test_missed_boxes_threshold():
    verdict, rec = yes(B_SHIFTED), record([B])  # IoU 1/3
    assert value("missed_boxes", verdict, rec, threshold=0.3) == 0.0
    assert value("missed_boxes", verdict, rec, threshold=0.5) == 1.0
    with pytest.raises(ValueError, match="threshold"):
        value("missed_boxes", verdict, rec, threshold=1.5)


@pytest.mark.parametrize(
    ("verdict", "rec"),
    [
        (yes(A, B_NUDGED, FAR), record([A, B, C])),
        (yes(B_NUDGED), record([B])),
        (NO, record([A, B])),
        (yes(A), NORMAL),
        (NONE, record([A])),
    ],
)
def test_missed_boxes_agree_with_the_metrics_recall(verdict, rec):
    """The reward's default threshold is the metric's: its misses are recall's misses."""
    metrics = evaluate([verdict], [rec])
    recall, boxes = metrics["loc_recall"], len(rec["boxes"])
    missed = 0 if recall is None else round((1 - recall) * boxes)
    assert value("missed_boxes", verdict, rec) == missed


# --------------------------------------------------------------------------------- label


def test_label_fraction_of_ground_truth_named():
    rec = record([A, B, C], labels=["scratch", "broken_large", "color"])
    verdict = yes(A, B, C, labels=["Scratch", "large broken", "color-stain"])
    # A: equal after lower-casing; B: neither contains the other; C: "color stain" ⊃ "color"
    assert value("label", verdict, rec) == pytest.approx(2 / 3)


def test_label_needs_a_matched_box():
    rec = record([A, B], labels=["scratch", "dent"])
    # the right word on a box that matches nothing (FAR) does not count
    assert value("label", yes(A, FAR, labels=["scratch", "dent"]), rec) == pytest.approx(1 / 2)
    # B_SHIFTED (IoU 1/3) matches B at the default threshold (0.1), not at 0.5
    verdict = yes(B_SHIFTED, labels=["dent"])
    assert value("label", verdict, rec) == pytest.approx(1 / 2)
    assert value("label", verdict, rec, threshold=0.5) == 0.0


@pytest.mark.parametrize(
    ("verdict", "rec"),
    [
        (yes(A, labels=["scratch"]), record(labels=[], anomalous=False)),  # normal
        (Verdict(False, [A], ["scratch"], "r", False), record([A], ["scratch"])),  # No
        (yes(A, labels=["scratch"]), record([], [], anomalous=True)),  # no ground truth
    ],
)
def test_label_zero_cases(verdict, rec):
    assert value("label", verdict, rec) == 0.0


@pytest.mark.parametrize(
    ("predicted", "truth", "agree"),
    [
        ("Broken_Large", "broken-large", True),
        ("crack", "cracked surface", True),
        ("faulty imprint", "imprint", True),
        ("scratch", "dent", False),
        ("", "scratch", False),
        ("  ", "", False),
    ],
)
def test_labels_agree(predicted, truth, agree):
    assert labels_agree(predicted, truth) is agree


def test_normalise_label():
    assert normalise_label(" Broken_Large--cap ") == "broken large cap"


# ------------------------------------------------------------------------------ combined


def test_compute_reward_weighs_components_and_reports_all():
    rec = record([A, B, C])
    verdict = yes(A, B_SHIFTED, FAR, labels=["defect", "defect", "x"])
    weights = {"format": 0.5, "detection": 1.0, "localization": 2.0}
    breakdown = compute_reward(verdict, rec, weights, LEGACY)
    assert breakdown.components == {
        "format": 1.0,
        "detection": 1.0,
        "localization": pytest.approx(0.4),
        "label": pytest.approx(1 / 3),  # weight 0 (absent), still computed
        "missed_boxes": 1.0,  # at its default threshold 0.1, B_SHIFTED finds B
    }
    assert breakdown.total == pytest.approx(0.5 + 1.0 + 0.8)


def test_compute_reward_passes_params():
    rec = record([A, B, C])
    verdict = yes(A, B_SHIFTED, FAR)
    weights = {"localization": 1.0}
    params = {"localization": {"threshold": 0.3, "false_penalty": 0.1}}
    assert compute_reward(verdict, rec, weights, params).total == pytest.approx(0.7)
    params = {"localization": {"variant": "iou"}}
    assert compute_reward(verdict, rec, weights, params).total == pytest.approx((1 + 1 / 3) / 3)


def test_compute_reward_reads_numpy_boxes():
    rec = {**record([A]), "boxes": np.array([A], dtype=np.float32), "labels": np.array(["x"])}
    breakdown = compute_reward(yes(A, labels=["x"]), rec, {"localization": 1.0, "label": 1.0})
    assert breakdown.total == 2.0


@pytest.mark.parametrize(
    ("weights", "params"),
    [({"fromat": 1.0}, None), ({"format": 1.0}, {"lokalization": {"threshold": 0.3}})],
)
def test_compute_reward_rejects_unknown_components(weights, params):
    with pytest.raises(ValueError, match="unknown component.*known: \\['detection'"):
        compute_reward(NO, NORMAL, weights, params)


def test_reward_bounds():
    assert reward_bounds({"format": 1.0, "detection": -0.5, "label": 0.0}) == (-0.5, 1.0)
    assert reward_bounds({}) == (0.0, 0.0)
    # a count has no upper bound: a penalty on it none below (weight 0 adds nothing)
    assert reward_bounds({"detection": 1.0, "missed_boxes": -0.2}) == (-math.inf, 1.0)
    assert reward_bounds({"missed_boxes": 0.5}) == (0.0, math.inf)
    assert reward_bounds({"format": 1.0, "missed_boxes": 0.0}) == (0.0, 1.0)


# ------------------------------------------------------------------------------- presets


def paper_total(verdict, rec):
    weights, params = resolve_rewards("paper")
    return compute_reward(verdict, rec, weights, params).total


@pytest.mark.parametrize(
    ("verdict", "rec", "result"),
    [
        (yes(A, B), record([A, B]), 1.0),  # right, every box found
        (yes(A, FAR, FAR, FAR), record([A, B]), 1.0 - 0.2),  # false boxes cost nothing
        (yes(B_NUDGED), record([B]), 1.0),  # IoU 0.18: found, as the metric counts it
        (yes(FAR), record([A, B, C]), 1.0 - 0.6),
        (NO, record([A, B]), 0.0 - 0.4),  # wrong, and both boxes missed
        (NO, NORMAL, 1.0),
        (yes(A), NORMAL, 0.0),
    ],
)
def test_paper_preset_is_one_for_the_right_decision_less_a_fifth_per_missed_box(
    verdict, rec, result
):
    """The paper's result reward; the format reward (1 here: every verdict is well-formed)
    comes on top."""
    assert paper_total(verdict, rec) == pytest.approx(1.0 + result)


def test_paper_preset_weighs_the_right_decision_above_any_boxes():
    """Yes without a single box found still beats No on an anomalous image."""
    rec = record([A, B, C, [60, 60, 70, 70], [0, 60, 10, 70], [60, 0, 70, 10]])
    assert paper_total(yes(FAR), rec) - paper_total(NO, rec) == pytest.approx(1.0)


def test_legacy_preset_is_the_reward_before_the_paper_preset():
    weights, params = resolve_rewards("legacy")
    assert weights == {"format": 0.5, "detection": 1.0, "localization": 1.0}
    assert params["localization"] == {
        "variant": "anomaly_r1", "threshold": 0.5, "miss_penalty": 0.2, "false_penalty": 0.1
    }  # fmt: skip
    assert params["label"] == {"threshold": 0.5}
    verdict, rec = yes(A, B_SHIFTED, FAR), record([A, B, C])  # 2 missed, 2 false at 0.5
    assert compute_reward(verdict, rec, weights, params).total == pytest.approx(0.5 + 1 + 0.4)


def test_resolve_puts_given_weights_and_params_on_the_preset():
    weights, params = resolve_rewards(
        "paper",
        {"missed_boxes": -0.3, "label": 0.5, "format": 0.0},
        {"missed_boxes": {"threshold": 0.3}, "localization": {"variant": "iou"}},
    )
    assert weights == {"format": 0.0, "detection": 1.0, "missed_boxes": -0.3, "label": 0.5}
    assert params == {  # complete: every parameter of every component that has any
        "localization": {"variant": "iou", "threshold": 0.1, "miss_penalty": 0.2,
                         "false_penalty": 0.0},
        "label": {"threshold": 0.1},
        "missed_boxes": {"threshold": 0.3},
    }  # fmt: skip
    legacy = resolve_rewards("legacy", params={"localization": {"threshold": 0.1}})[1]
    assert legacy["localization"] == {**LEGACY["localization"], "threshold": 0.1}
    assert resolve_rewards("none", {"format": 1.0})[0] == {"format": 1.0}


def test_resolving_twice_changes_nothing():
    for name in REWARD_PRESETS:
        once = resolve_rewards(name, {"label": 0.3}, {"label": {"threshold": 0.2}})
        assert resolve_rewards(name, *once) == once


@pytest.mark.parametrize(
    ("preset", "weights", "params", "match"),
    [
        ("pape", None, None, "unknown reward preset 'pape'"),
        ("paper", {"speed": 1.0}, None, r"weights: unknown component.*'speed'"),
        ("paper", None, {"lokalization": {}}, r"params: unknown component.*'lokalization'"),
        ("paper", None, {"label": {"tresh": 0.3}}, r"unknown parameter.*'tresh'.*'label'"),
    ],
)
def test_resolve_rejects_unknown_names(preset, weights, params, match):
    with pytest.raises(ValueError, match=match):
        resolve_rewards(preset, weights, params)


def test_presets_name_registered_components_and_parameters():
    for name, preset in REWARD_PRESETS.items():
        resolve_rewards(name, preset.weights, preset.params)  # raises on an unknown name


def test_reward_log_metrics():
    breakdowns = [
        RewardBreakdown(1.0, {"format": 1.0, "detection": 0.0}),
        RewardBreakdown(2.0, {"format": 0.0, "detection": 1.0}),
    ]
    assert reward_log_metrics(breakdowns) == {
        "reward/total/mean": 1.5,
        "reward/format/mean": 0.5,
        "reward/detection/mean": 0.5,
    }
    assert reward_log_metrics([]) == {}


# ------------------------------------------------------------------------------ property

coordinates = st.integers(-20, 120)
boxes = st.lists(st.lists(coordinates, min_size=4, max_size=4), max_size=6)
words = st.sampled_from(["scratch", "Broken_large", "dent", "", "large"])


@st.composite
def verdicts(draw):
    """Parsed answers, from well-formed to garbage."""
    if draw(st.booleans()):
        items = [f"{{'bbox_2d': {box}, 'label': '{draw(words)}'}}" for box in draw(boxes)]
        decision = draw(st.sampled_from(["Yes.", "No.", "yes", ""]))
        text = f"<think>r</think><answer>{decision} {', '.join(items)}</answer>"
    else:
        text = draw(st.text(max_size=200))
    return parse_answer(text, size=(100, 100))


@st.composite
def records(draw):
    gt = [b for b in draw(boxes) if b[0] < b[2] and b[1] < b[3]]
    anomalous = draw(st.booleans()) or bool(gt)
    return record(gt, [draw(words) for _ in gt], anomalous=anomalous)


params = st.fixed_dictionaries(
    {
        "localization": st.fixed_dictionaries(
            {
                "variant": st.sampled_from(["anomaly_r1", "iou"]),
                "threshold": st.floats(0, 1),
                "miss_penalty": st.floats(0, 2),
                "false_penalty": st.floats(0, 2),
            }
        ),
        "label": st.fixed_dictionaries({"threshold": st.floats(0, 1)}),
        "missed_boxes": st.fixed_dictionaries({"threshold": st.floats(0, 1)}),
    }
)
weights = st.dictionaries(st.sampled_from(sorted(REWARDS)), st.floats(-3, 3))


@settings(max_examples=300)
@given(verdict=verdicts(), rec=records(), params=params, weights=weights)
def test_rewards_stay_within_declared_bounds(verdict, rec, params, weights):
    breakdown = compute_reward(verdict, rec, weights, params)
    for name, component in REWARDS.items():
        assert component.lower <= breakdown.components[name] <= component.upper
    low, high = reward_bounds(weights)
    assert low - 1e-9 <= breakdown.total <= high + 1e-9
