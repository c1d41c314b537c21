"""Reward components, their combination and their bounds (hand-worked values)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmrad.task.answer import Verdict, parse_answer
from mmrad.task.rewards import (
    REWARDS,
    RewardBreakdown,
    compute_reward,
    labels_agree,
    normalise_label,
    reward_bounds,
    reward_log_metrics,
)

A, B, C = [0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]
B_SHIFTED = [25, 20, 35, 30]  # IoU with B: 50 / 150 = 1/3
FAR = [80, 80, 90, 90]


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
    assert set(REWARDS) == {"format", "detection", "localization", "label"}
    assert all((c.lower, c.upper) == (0.0, 1.0) for c in REWARDS.values())
    assert dict(REWARDS["localization"].defaults) == {
        "variant": "anomaly_r1",
        "threshold": 0.5,
        "miss_penalty": 0.2,
        "false_penalty": 0.1,
    }


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
    # threshold 0.5: only A matches -> 2 missed, 2 false -> 1 - 0.4 - 0.2
    assert value("localization", verdict, rec) == pytest.approx(0.4)
    # threshold 0.3 also matches B (IoU 1/3) -> 1 missed, 1 false -> 1 - 0.2 - 0.1
    assert value("localization", verdict, rec, threshold=0.3) == pytest.approx(0.7)
    assert value(
        "localization", verdict, rec, miss_penalty=0.25, false_penalty=0.05
    ) == pytest.approx(1 - 0.5 - 0.1)


def test_localization_perfect_and_floored_at_zero():
    assert value("localization", yes(A, B), record([B, A])) == 1.0
    # 1 missed and 11 false boxes: 1 - 0.2 - 1.1 < 0
    assert value("localization", yes(*[FAR] * 11), record([A])) == 0.0


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
    # B_SHIFTED matches B only below the default threshold
    verdict = yes(B_SHIFTED, labels=["dent"])
    assert value("label", verdict, rec) == 0.0
    assert value("label", verdict, rec, threshold=0.3) == pytest.approx(1 / 2)


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
    breakdown = compute_reward(verdict, rec, {"format": 0.5, "detection": 1.0, "localization": 2.0})
    assert breakdown.components == {
        "format": 1.0,
        "detection": 1.0,
        "localization": pytest.approx(0.4),
        "label": pytest.approx(1 / 3),  # weight 0 (absent), still computed
    }
    assert breakdown.total == pytest.approx(0.5 + 1.0 + 0.8)


def test_compute_reward_passes_params():
    rec = record([A, B, C])
    verdict = yes(A, B_SHIFTED, FAR)
    weights = {"localization": 1.0}
    params = {"localization": {"threshold": 0.3}}
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
    with pytest.raises(ValueError, match="unknown reward component.*known: \\['detection'"):
        compute_reward(NO, NORMAL, weights, params)


def test_reward_bounds():
    assert reward_bounds({"format": 1.0, "detection": -0.5, "label": 0.0}) == (-0.5, 1.0)
    assert reward_bounds({}) == (0.0, 0.0)


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
