"""The MMR-AD metrics on a hand-worked set, and agreement with brute-force references and
SciPy's Mann-Whitney U (scikit-learn is not a dependency: importing it costs every
transformers process a second; average precision is checked against hand-worked cases and
a threshold-by-threshold reference of its formula instead)."""

import random

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from mmrad.task.answer import Verdict
from mmrad.task.metrics import (
    RATE_KEYS,
    SCORE_KEYS,
    auroc,
    average_precision,
    average_ranks,
    best_f1_threshold,
    boxes_hit,
    evaluate,
    f1,
    fixed_box_hit_rate,
    roc_curve,
)

A, B, C = [0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]
FAR = [80, 80, 90, 90]
TALL_A = [0, 0, 10, 50]  # IoU with A: 100 / 500 = 0.2, above the 0.1 threshold
A_RIGHT = [10, 0, 20, 10]  # A's neighbour
A_WIDE = [0, 0, 20, 10]  # IoU 0.5 with A and with A_RIGHT
UNSCORED = dict.fromkeys(SCORE_KEYS)


def record(i, source, category, boxes=()):
    return {
        "id": f"img{i}",
        "source": source,
        "category": category,
        "is_anomalous": bool(boxes),
        "boxes": [list(b) for b in boxes],
        "labels": ["defect"] * len(boxes),
        "width": 100,
        "height": 100,
    }


def answer(decision, *boxes, score=None):
    return Verdict(
        decision, [list(map(float, b)) for b in boxes], [""] * len(boxes), "r", True, score
    )


# Hand-worked set: 3 (source, category) groups.
# mvtec/bottle: r1 Yes with one right and one false box; r2 missed (No); r3 right No;
#               r4 unparseable on a normal image (counts as a false positive).
# mvtec/screw:  all normal; r5 right No, r6 Yes with a box.
# visa/pcb1:    r7 Yes with a box at IoU 0.2 (matched); r8 Yes without boxes.
RECORDS = [
    record(1, "mvtec", "bottle", [A, B]),
    record(2, "mvtec", "bottle", [C]),
    record(3, "mvtec", "bottle"),
    record(4, "mvtec", "bottle"),
    record(5, "mvtec", "screw"),
    record(6, "mvtec", "screw"),
    record(7, "visa", "pcb1", [A]),
    record(8, "visa", "pcb1", [A]),
]
PREDICTIONS = [
    answer(True, A, FAR),
    answer(False),
    answer(False),
    Verdict(None),
    answer(False),
    answer(True, B),
    answer(True, TALL_A),
    answer(True),
]

BOTTLE = {
    # TP r1, FN r2, TN r3, FP r4
    "det_accuracy": 0.5,
    "det_precision": 0.5,
    "det_recall": 0.5,
    "det_f1": 0.5,
    # only r3 is fully right; 1 of 2 predicted boxes matched; 1 of 3 ground-truth boxes
    "loc_accuracy": 0.25,
    "loc_precision": 0.5,
    "loc_recall": 1 / 3,
    "loc_f1": 0.4,  # 2 * 0.5 * 1/3 / (0.5 + 1/3)
    "loc_accuracy_anomalous": 0.0,  # neither r1 nor r2 fully right
    "box_hit_rate": 1 / 3,  # A hit, B and C not
    "fixed_box_hit_rate": 1 / 3,  # one box on the 1/8 grid hits one of A, B, C
    "n_images": 4,
    "n_anomalous": 2,
    **UNSCORED,
}
SCREW = {
    # TN r5, FP r6; no anomalous image: recall and F1 undefined
    "det_accuracy": 0.5,
    "det_precision": 0.0,
    "det_recall": None,
    "det_f1": None,
    # one box predicted, none matched; no ground-truth boxes
    "loc_accuracy": 0.5,
    "loc_precision": 0.0,
    "loc_recall": None,
    "loc_f1": None,
    "loc_accuracy_anomalous": None,
    "box_hit_rate": None,
    "fixed_box_hit_rate": None,  # no boxes
    "n_images": 2,
    "n_anomalous": 0,
    **UNSCORED,
}
PCB1 = {
    "det_accuracy": 1.0,
    "det_precision": 1.0,
    "det_recall": 1.0,
    "det_f1": 1.0,
    # r7 fully right; r8 said Yes but located nothing
    "loc_accuracy": 0.5,
    "loc_precision": 1.0,
    "loc_recall": 0.5,
    "loc_f1": 2 / 3,
    "loc_accuracy_anomalous": 0.5,
    "box_hit_rate": 0.5,
    "fixed_box_hit_rate": 1.0,  # both boxes at A
    "n_images": 2,
    "n_anomalous": 2,
    **UNSCORED,
}


def test_per_category():
    result = evaluate(PREDICTIONS, RECORDS)
    assert list(result["per_category"]) == ["mvtec/bottle", "mvtec/screw", "visa/pcb1"]
    assert result["per_category"]["mvtec/bottle"] == pytest.approx(BOTTLE)
    assert result["per_category"]["mvtec/screw"] == pytest.approx(SCREW)
    assert result["per_category"]["visa/pcb1"] == pytest.approx(PCB1)


def test_per_source_is_the_mean_over_its_categories():
    mvtec = evaluate(PREDICTIONS, RECORDS)["per_source"]["mvtec"]
    assert mvtec == pytest.approx(
        {
            "det_accuracy": 0.5,
            "det_precision": 0.25,
            "det_recall": 0.5,  # screw's undefined recall is left out
            "det_f1": 0.5,
            "loc_accuracy": 0.375,
            "loc_precision": 0.25,
            "loc_recall": 1 / 3,
            "loc_f1": 0.4,
            "loc_accuracy_anomalous": 0.0,  # screw's undefined one left out
            "box_hit_rate": 1 / 3,
            "fixed_box_hit_rate": 1 / 3,  # screw's undefined one left out
            "n_images": 6,
            "n_anomalous": 2,
            **UNSCORED,
        }
    )


def test_overall_is_the_mean_over_all_groups_not_over_sources():
    result = evaluate(PREDICTIONS, RECORDS)
    assert result["fixed_box_hit_rate"] == pytest.approx(2 / 3)  # (1/3 + 1) / 2, screw out
    overall = {key: result[key] for key in (*RATE_KEYS, "n_images", "n_anomalous", *SCORE_KEYS)}
    assert overall == pytest.approx(
        {
            "det_accuracy": 2 / 3,  # (0.5 + 0.5 + 1) / 3, not (0.5 + 1) / 2
            "det_precision": 0.5,
            "det_recall": 0.75,
            "det_f1": 0.75,
            "loc_accuracy": 1.25 / 3,
            "loc_precision": 0.5,
            "loc_recall": 5 / 12,
            "loc_f1": (0.4 + 2 / 3) / 2,
            "loc_accuracy_anomalous": 0.25,  # (0 + 0.5) / 2, screw left out
            "box_hit_rate": 5 / 12,  # (1/3 + 1/2) / 2
            "n_images": 8,
            "n_anomalous": 4,
            **UNSCORED,
        }
    )


def test_source_mean_weights_every_source_equally():
    # mvtec is the mean of bottle and screw (test above), visa is pcb1; the source mean
    # is their mean, where the category mean weights mvtec twice
    source_mean = evaluate(PREDICTIONS, RECORDS)["source_mean"]
    assert source_mean == pytest.approx(
        {
            "det_accuracy": 0.75,  # (0.5 + 1) / 2; the category mean is 2/3
            "det_precision": 0.625,  # (0.25 + 1) / 2; the category mean is 0.5
            "det_recall": 0.75,
            "det_f1": 0.75,
            "loc_accuracy": 0.4375,  # (0.375 + 0.5) / 2
            "loc_precision": 0.625,
            "loc_recall": 5 / 12,
            "loc_f1": (0.4 + 2 / 3) / 2,
            "loc_accuracy_anomalous": 0.25,
            "box_hit_rate": 5 / 12,
            "fixed_box_hit_rate": 2 / 3,  # (1/3 + 1) / 2
            "n_images": 8,
            "n_anomalous": 4,
            **UNSCORED,
        }
    )


def test_issue_example_normal_images_count_in_loc_accuracy_only():
    # 3 normal images answered No, 1 anomalous answered Yes with a box elsewhere
    recs = [record(i, "s", "c") for i in range(3)] + [record(3, "s", "c", [A])]
    preds = [answer(False)] * 3 + [answer(True, FAR)]
    result = evaluate(preds, recs)
    assert result["loc_accuracy"] == 0.75
    assert result["loc_accuracy_anomalous"] == 0.0
    assert result["loc_recall"] == 0.0
    assert result["box_hit_rate"] == 0.0


def test_one_box_over_two_defects_hits_both_but_matches_one():
    result = evaluate([answer(True, A_WIDE)], [record(1, "s", "c", [A, A_RIGHT])])
    assert result["box_hit_rate"] == 1.0
    assert result["loc_recall"] == 0.5  # one-to-one
    assert result["loc_accuracy"] == result["loc_accuracy_anomalous"] == 0.0


def test_boxes_hit():
    assert boxes_hit([A, A_RIGHT], [A_WIDE], 0.1) == 2
    assert boxes_hit([A, A_RIGHT], [A_WIDE], 0.6) == 0  # IoU 0.5 each
    assert boxes_hit([A, A_RIGHT], [A, FAR], 0.1) == 1
    assert boxes_hit([A], [A_RIGHT], 0.0) == 0  # touching is no overlap
    assert boxes_hit([A], [], 0.1) == boxes_hit([], [A], 0.1) == 0


def test_loc_accuracy_splits_into_its_anomalous_and_normal_parts():
    rng = random.Random(3)
    recs = [record(i, "s", "c", rng.choice([[], [A], [A, C]])) for i in range(200)]
    preds = [answer(rng.choice([True, False, None]), *rng.choice([[], [A], [TALL_A, FAR]]))
             for _ in recs]  # fmt: skip
    result = evaluate(preds, recs)
    normal_right = sum(not r["is_anomalous"] and p.decision is False
                       for p, r in zip(preds, recs, strict=True))  # fmt: skip
    n, n_anomalous = result["n_images"], result["n_anomalous"]
    assert result["loc_accuracy"] * n == pytest.approx(
        result["loc_accuracy_anomalous"] * n_anomalous + normal_right
    )
    assert result["box_hit_rate"] >= result["loc_recall"]


def test_boxes_after_no_do_not_count():
    rec = [record(1, "s", "c", [A])]
    result = evaluate([answer(False, A)], rec)
    assert result["loc_precision"] is None  # nothing predicted
    assert result["loc_recall"] == result["box_hit_rate"] == 0.0
    assert result["loc_accuracy"] == 0.0


def test_extra_boxes_do_not_spoil_accuracy():
    result = evaluate([answer(True, A, FAR, FAR)], [record(1, "s", "c", [A])])
    assert result["loc_accuracy"] == 1.0
    assert result["loc_precision"] == pytest.approx(1 / 3)


def test_all_unparseable():
    recs = [record(1, "s", "c", [A]), record(2, "s", "c")]
    result = evaluate([Verdict(None), Verdict(None)], recs)
    assert result["det_accuracy"] == 0.0
    assert result["det_precision"] == 0.0  # the normal image counts as a false positive
    assert result["det_recall"] == 0.0
    assert result["det_f1"] == 0.0
    assert result["loc_precision"] is None


# ---------------------------------------------------------------- reference implementations


def reference_auroc(labels, scores) -> float:
    """AUROC as the Mann-Whitney U of the positives over the negatives (ties count 1/2)."""
    positives = [s for s, label in zip(scores, labels, strict=True) if label]
    negatives = [s for s, label in zip(scores, labels, strict=True) if not label]
    return mannwhitneyu(positives, negatives).statistic / (len(positives) * len(negatives))


def reference_roc_curve(labels, scores) -> tuple[list[float], list[float]]:
    """False and true positive rates at +inf and then at every distinct score, highest
    first, counted one threshold at a time."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, float)
    thresholds = [np.inf, *sorted(set(scores.tolist()), reverse=True)]
    fpr = [np.sum((scores >= t) & ~labels) / np.sum(~labels) for t in thresholds]
    tpr = [np.sum((scores >= t) & labels) / np.sum(labels) for t in thresholds]
    return fpr, tpr


def reference_rates(truth, guess) -> dict[str, float]:
    """Accuracy, precision, recall and F1 from the confusion counts (0 where undefined)."""
    pairs = list(zip(truth, guess, strict=True))
    tp = sum(t and g for t, g in pairs)
    fp = sum(g and not t for t, g in pairs)
    fn = sum(t and not g for t, g in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": sum(t == g for t, g in pairs) / len(pairs),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
    }


def test_empty_and_misaligned_input():
    empty = evaluate([], [])
    assert all(empty[key] is None for key in (*RATE_KEYS, *SCORE_KEYS))
    assert all(empty["source_mean"][key] is None for key in (*RATE_KEYS, *SCORE_KEYS))
    assert empty["per_source"] == {} and empty["per_category"] == {}
    with pytest.raises(ValueError, match="1 predictions for 2 records"):
        evaluate([Verdict(None)], RECORDS[:2])


SCORED = [
    Verdict(v.decision, v.boxes, v.labels, v.reasoning, v.format_ok, score)
    for v, score in zip(PREDICTIONS, [0.9, 0.2, 0.1, 0.5, 0.3, 0.8, 0.7, 0.6], strict=True)
]


def test_score_metrics_need_every_score():
    labels = [r["is_anomalous"] for r in RECORDS]
    result = evaluate(SCORED, RECORDS)
    assert result["auroc"] == pytest.approx(reference_auroc(labels, [v.score for v in SCORED]))
    assert result["per_source"]["mvtec"]["auroc"] == pytest.approx(
        reference_auroc(labels[:6], [v.score for v in SCORED[:6]])
    )
    for part in (result["per_source"]["visa"], result["per_category"]["mvtec/screw"]):
        assert all(
            part[key] is None for key in SCORE_KEYS
        )  # visa: anomalous only; screw: normal only
    unscored = evaluate([*SCORED[:-1], PREDICTIONS[-1]], RECORDS)
    assert {key: unscored[key] for key in SCORE_KEYS} == UNSCORED


def test_score_metrics_pooled_per_part_and_averaged_over_sources():
    result = evaluate(SCORED, RECORDS)
    # all images, by descending score: .9+ .8- .7+ .6+ .5- .3- .2+ .1-
    assert {key: result[key] for key in SCORE_KEYS} == pytest.approx(
        {
            "auroc": 11 / 16,  # positives beat 4 + 3 + 3 + 1 of the 4 negatives each
            # recall steps of 1/4 at .9, .7, .6, .2 with precision 1, 2/3, 3/4, 4/7
            "average_precision": (1 + 2 / 3 + 3 / 4 + 4 / 7) / 4,
            "best_f1": 0.75,  # at .6: tp 3, fp 1, fn 1
        }
    )
    # mvtec: .9+ .8- .5- .3- .2+ .1-
    mvtec = {"auroc": 5 / 8, "average_precision": 0.5 * 1 + 0.5 * 0.4, "best_f1": 2 / 3}
    assert {key: result["per_source"]["mvtec"][key] for key in SCORE_KEYS} == pytest.approx(mvtec)
    # bottle: .9+ .5- .2+ .1-
    assert result["per_category"]["mvtec/bottle"]["average_precision"] == pytest.approx(5 / 6)
    # visa has one class only and is left out of the mean over sources
    assert {key: result["source_mean"][key] for key in SCORE_KEYS} == pytest.approx(mvtec)


def test_detection_agrees_with_the_confusion_counts():
    rng = random.Random(7)
    recs = [record(i, "s", f"c{i % 3}", [A] if rng.random() < 0.5 else []) for i in range(300)]
    preds = [answer(rng.choice([True, False, None])) for _ in recs]
    result = evaluate(preds, recs)
    for category in ("c0", "c1", "c2"):
        chosen = [i for i, r in enumerate(recs) if r["category"] == category]
        truth = [recs[i]["is_anomalous"] for i in chosen]
        # a missing decision is the wrong answer
        guess = [
            not truth[k] if preds[i].decision is None else preds[i].decision
            for k, i in enumerate(chosen)
        ]
        got = result["per_category"][f"s/{category}"]
        expected = reference_rates(truth, guess)
        for rate in ("accuracy", "precision", "recall", "f1"):
            assert got[f"det_{rate}"] == pytest.approx(expected[rate]), rate


# ------------------------------------------------------------------------ score metrics


def test_average_ranks_share_ties():
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_auroc_hand_worked():
    # positives 0.8, 0.4; negatives 0.6, 0.4: pairs won 1 + 0 + 1 + 0.5 (tie) of 4
    assert auroc([0.8, 0.4, 0.6, 0.4], [True, True, False, False]) == pytest.approx(2.5 / 4)
    assert auroc([0.1, 0.2], [True, True]) is None
    assert auroc([], []) is None


@pytest.mark.parametrize("seed", range(5))
def test_auroc_and_roc_curve_agree_with_the_references(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(200) < 0.4
    scores = np.round(rng.random(200) + 0.3 * labels, 1)  # rounding makes many ties
    assert auroc(scores, labels) == pytest.approx(reference_auroc(labels, scores))
    fpr, tpr = roc_curve(scores, labels)
    ref_fpr, ref_tpr = reference_roc_curve(labels, scores)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)


def test_roc_curve_needs_both_classes():
    with pytest.raises(ValueError):
        roc_curve([0.1, 0.2], [False, False])


@pytest.mark.parametrize(
    ("scores", "labels", "expected"),
    [
        # at 0.7: tp 2, fp 1, fn 0 -> F1 4/5, better than 2/3 at 0.9 and 4/6 at 0.6
        ([0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 1, 0, 0], (0.7, 0.8)),
        # F1 2/3 at 4 and at 1: the higher threshold wins
        ([4, 3, 2, 1], [1, 0, 0, 1], (4, 2 / 3)),
        # tied scores move together: at 0.5 tp 1, fp 1, fn 1 -> 1/2; at 0.2 -> 4/5
        ([0.5, 0.5, 0.2], [1, 0, 1], (0.2, 0.8)),
        # no anomalous image: every F1 is 0, the highest threshold
        ([0.3, 0.6], [0, 0], (0.6, 0.0)),
    ],
)
def test_best_f1_threshold(scores, labels, expected):
    threshold, best = best_f1_threshold(scores, labels)
    assert (threshold, best) == pytest.approx(expected)
    predicted = [s >= threshold for s in scores]
    assert best == pytest.approx(reference_rates(labels, predicted)["f1"])


@pytest.mark.parametrize(
    ("scores", "labels", "expected"),
    [
        # precision 1 at recall 1/2 (0.9), then 2/3 at recall 1 (0.7)
        ([0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 1, 0, 0], 0.5 * 1 + 0.5 * 2 / 3),
        # tied scores are one step: precision 1/2 at recall 1/2, then 2/3 at 1
        ([0.5, 0.5, 0.2], [1, 0, 1], 0.5 * 0.5 + 0.5 * 2 / 3),
        ([0.9, 0.8, 0.1], [1, 1, 0], 1.0),  # positives first
        ([0.1, 0.9], [1, 0], 0.5),  # the positive last: precision 1/2 at recall 1
        ([0.3, 0.3, 0.3, 0.3], [1, 0, 0, 1], 0.5),  # one threshold: the positive share
    ],
)
def test_average_precision_hand_worked(scores, labels, expected):
    assert average_precision(scores, labels) == pytest.approx(expected)


def reference_average_precision(labels, scores) -> float:
    """``sum_n (R_n - R_{n-1}) P_n``, counted one distinct threshold at a time."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, float)
    total, previous_recall = 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        chosen = scores >= t
        recall = np.sum(chosen & labels) / np.sum(labels)
        total += (recall - previous_recall) * np.sum(chosen & labels) / np.sum(chosen)
        previous_recall = recall
    return total


@pytest.mark.parametrize("seed", range(5))
def test_average_precision_agrees_with_the_reference(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(200) < 0.3
    scores = np.round(rng.random(200) + 0.3 * labels, 1)
    expected = reference_average_precision(labels, scores)
    assert average_precision(scores, labels) == pytest.approx(expected)


def test_average_precision_needs_both_classes():
    assert average_precision([0.1, 0.2], [True, True]) is None
    assert average_precision([0.1, 0.2], [False, False]) is None
    assert average_precision([], []) is None


def test_best_f1_threshold_needs_scores():
    with pytest.raises(ValueError):
        best_f1_threshold([], [])


def test_f1():
    assert f1(0.5, 1 / 3) == pytest.approx(0.4)
    assert f1(0.0, 0.0) == 0.0
    assert f1(None, 1.0) is None


def test_a_fixed_box_scores_what_localisation_gets_without_looking():
    """The chance baseline of box hits: the best box drawn at one place on every image."""
    corner = [record(i, "s", "c", [[0, 0, 30, 30]]) for i in range(3)]
    assert fixed_box_hit_rate(corner) == 1.0  # one box in the corner hits them all
    spread = [record(i, "s", "c", [box]) for i, box in enumerate(
        ([0, 0, 10, 10], [90, 0, 100, 10], [0, 90, 10, 100], [90, 90, 100, 100]))]  # fmt: skip
    assert fixed_box_hit_rate(spread) == 0.25  # small, in four corners: one at a time
    large = [record(i, "s", "c", [box]) for i, box in enumerate(
        ([0, 0, 50, 50], [50, 0, 100, 50], [0, 50, 50, 100], [50, 50, 100, 100]))]  # fmt: skip
    assert fixed_box_hit_rate(large) == 1.0  # large: the middle box hits every one
    # relative to each image's size: the same defect region on a 200 x 50 image
    wide = {**record(9, "s", "c", [[0, 0, 60, 15]]), "width": 200, "height": 50}
    assert fixed_box_hit_rate([*corner, wide]) == 1.0
    assert fixed_box_hit_rate([record(0, "s", "c")]) is None


def test_the_best_fixed_box_beats_every_box_of_its_grid():
    """Brute force over the grid with the scalar IoU: the vectorised search agrees."""
    rng = random.Random(3)
    records = []
    for i in range(12):
        x, y = rng.uniform(0, 80), rng.uniform(0, 80)
        records.append(
            record(i, "s", "c", [[x, y, x + rng.uniform(5, 20), y + rng.uniform(5, 20)]])
        )
    edges = [k / 8 * 100 for k in range(9)]
    best = max(
        sum(boxes_hit(r["boxes"], [[x1, y1, x2, y2]], 0.1) for r in records)
        for x1 in edges for x2 in edges if x2 > x1 for y1 in edges for y2 in edges if y2 > y1
    )  # fmt: skip
    assert fixed_box_hit_rate(records) == best / 12
