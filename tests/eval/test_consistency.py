"""The annotation filter on hand-written teacher answers, the hint-leak check and the
best-sample rule; and the hinted inputs the teacher is given."""

from __future__ import annotations

import numpy as np
import pytest

from mmrad.data.builders.synthetic import reasoning_text
from mmrad.eval.consistency import (
    ACCEPTED,
    HINT_LEAK_PATTERNS,
    OUTCOMES,
    REASONS,
    Judgement,
    best_sample,
    find_leak,
    judge,
    judge_error,
)
from mmrad.eval.hints import HINT_COLOUR, draw_boxes, hint_text, hinted_input, outline_width
from mmrad.task.answer import parse_answer

THRESHOLD = 0.5
GT = [[10.0, 10.0, 40.0, 30.0], [60.0, 50.0, 90.0, 100.0]]  # original pixels
CLEAN = "Compared with the reference, the upper left shows a dark scratch and a hole lower right."
BOX_A = "{'bbox_2d': [10, 10, 40, 30], 'label': 'scratch'}"
BOX_B = "{'bbox_2d': [61, 52, 90, 98], 'label': 'hole'}"


def answer(reasoning: str, body: str) -> str:
    return f"<think>{reasoning}</think><answer>{body}</answer>"


def run(text: str, gt=GT, anomalous=True, sample=0) -> Judgement:
    return judge(sample, text, parse_answer(text), gt, anomalous, THRESHOLD)


# -- the filter on hand-written answers -------------------------------------------------


def test_accepted_anomalous_answer():
    text = answer(CLEAN, f"Yes. {BOX_A}, {BOX_B}")
    result = run(text)
    assert result.outcome == ACCEPTED and result.accepted
    assert result.reasoning == CLEAN and result.completion == text
    assert 0.8 < result.mean_iou < 1.0  # box B is close, box A exact


def test_accepted_normal_answer_has_mean_iou_one():
    result = run(answer("It matches the reference everywhere.", "No."), gt=[], anomalous=False)
    assert result.outcome == ACCEPTED and result.mean_iou == 1.0


@pytest.mark.parametrize(
    ("text", "gt", "anomalous", "reason"),
    [
        (answer(CLEAN, "No."), GT, True, "wrong_decision"),
        (answer(CLEAN, f"Yes. {BOX_A}"), [], False, "wrong_decision"),
        (answer(CLEAN, f"Yes. {BOX_A}"), GT, True, "missed_box"),
        (answer(CLEAN, "Yes. {'bbox_2d': [0, 60, 20, 90], 'label': 'hole'}, " + BOX_A), GT,
         True, "missed_box"),  # a box in the wrong place is not a match
        (answer(CLEAN, f"Yes. {BOX_A}, {BOX_B}, " + "{'bbox_2d': [0, 60, 8, 90], 'label': 'x'}"),
         GT, True, "extra_box"),
        (answer(CLEAN, f"Yes. {BOX_A}, {BOX_A}, {BOX_B}"), GT, True, "extra_box"),  # one-to-one
        (answer("A scratch at [10, 10, 40, 30] and a hole.", f"Yes. {BOX_A}, {BOX_B}"), GT, True,
         "leaked_hint"),
        (answer("Inside the red box there is a scratch.", f"Yes. {BOX_A}, {BOX_B}"), GT, True,
         "leaked_hint"),
        (f"Yes. {BOX_A}, {BOX_B}", GT, True, "bad_format"),  # no think, no answer tags
        (answer(CLEAN, "Yes."), GT, True, "bad_format"),  # Yes needs boxes
        (answer(CLEAN, f"Probably. {BOX_A}, {BOX_B}"), GT, True, "bad_format"),
        (answer("  ", f"Yes. {BOX_A}, {BOX_B}"), GT, True, "bad_format"),  # empty reasoning
        (answer(CLEAN, f"Yes. {BOX_A}, {BOX_B}")[:-12], GT, True, "bad_format"),  # truncated
    ],
)  # fmt: skip
def test_rejections(text, gt, anomalous, reason):
    result = run(text, gt, anomalous)
    assert result.outcome == reason, result
    assert not result.accepted and result.completion == text


def test_threshold_decides_a_loose_box():
    text = answer(CLEAN, "Yes. {'bbox_2d': [10, 10, 40, 50], 'label': 'scratch'}")  # IoU 0.5
    gt = [GT[0]]
    assert judge(0, text, parse_answer(text), gt, True, 0.5).accepted
    assert judge(0, text, parse_answer(text), gt, True, 0.6).outcome == "missed_box"


def test_error_samples_and_outcome_names():
    result = judge_error(3, "HTTP 500")
    assert (result.sample, result.outcome, result.detail) == (3, "error", "HTTP 500")
    assert set(REASONS) == {"wrong_decision", "missed_box", "extra_box", "leaked_hint",
                            "bad_format", "error"}  # fmt: skip
    assert (ACCEPTED, *REASONS) == OUTCOMES


# -- the hint-leak check ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reasoning", "pattern"),
    [
        ("the scratch spans 10, 10, 40, 30 in the image", "number_quadruple"),
        ("from 12.5; 3; 40; 30.25 on", "number_quadruple"),
        ("a dark spot near (34, 50).", "bracketed_numbers"),
        ("a hole at [ 61 ,52] below", "bracketed_numbers"),
        ("its coordinates are upper left", "coordinate_words"),
        ("from x1 to x2 the line runs", "coordinate_words"),
        ("the bbox shows a scratch", "coordinate_words"),
        ("the Red Rectangle encloses a crack", "red_marking"),
        ("a crack, outlined in red, crosses it", "red_marking"),
        ("the area marked with a red  frame", "red_marking"),
        ("as the red boxes show", "red_marking"),
        ("within the given bounding box there is a stain", "given_box"),
        ("the bounding box provided covers a hole", "given_box"),
        ("as the hint says, a scratch", "hint_words"),
        ("the ground-truth label is scratch", "hint_words"),
        ("according to the annotation there is a hole", "hint_words"),
    ],
)
def test_leaks_are_found(reasoning, pattern):
    assert find_leak(reasoning) == pattern


@pytest.mark.parametrize(
    "reasoning",
    [
        CLEAN,
        "A red stain covers the lower right; the reference is grey there.",  # a colour defect
        "Two scratches and 3 holes, about 20 pixels wide, in the upper third.",
        "The hole is 4 px across; the crack runs from the left edge to the centre.",
        "The reference is hinting at nothing; the 2024 model, version 3.1, is fine.",
        None,
        "",
    ],
)
def test_clean_reasoning_is_not_a_leak(reasoning):
    assert find_leak(reasoning) is None


def test_synthetic_reasoning_is_clean():
    """The synthetic builder's reasoning is what good teacher reasoning looks like."""
    cases = [
        [],
        [("scratch", [5.0, 5.0, 30.0, 20.0])],
        [("stain", [60.0, 70.0, 100.0, 110.0]), ("color_shift", [0, 0, 50, 50])],
    ]
    for defects in cases:
        assert find_leak(reasoning_text("metal_nut", defects, 112)) is None


def test_parroting_the_hint_is_a_leak():
    for anomalous in (True, False):
        hint = hint_text(
            category="metal_nut", is_anomalous=anomalous, defect_type="scratch" if anomalous
            else "good", grid_boxes=[[1, 2, 30, 40]] if anomalous else [],
            labels=["scratch"] if anomalous else [],
        )  # fmt: skip
        assert find_leak(hint) is not None


def test_leak_patterns_are_named_documented_and_linear():
    names = [p.name for p in HINT_LEAK_PATTERNS]
    assert len(names) == len(set(names)) and all(p.why for p in HINT_LEAK_PATTERNS)
    # adversarial input a quadratic pattern would never finish on
    for text in ("1" * 200_000, "[" + " " * 200_000, "red" + " " * 200_000, "1, " * 70_000):
        find_leak(text)


# -- best sample per image ------------------------------------------------------------------


def test_best_sample_rule():
    def ok(sample, iou, reasoning):
        return Judgement(sample, ACCEPTED, reasoning=reasoning, mean_iou=iou)

    rejected = Judgement(0, "missed_box", reasoning="x", mean_iou=0.99)
    assert best_sample([rejected]) is None
    assert best_sample([]) is None
    pool = [rejected, ok(1, 0.7, "short"), ok(2, 0.9, "a longer one"), ok(3, 0.9, "shorter")]
    assert best_sample(pool).sample == 3  # highest IoU, then shortest reasoning
    assert best_sample([ok(4, 0.9, "same"), ok(2, 0.9, "same")]).sample == 2  # then index


# -- hinted inputs ------------------------------------------------------------------------------


def test_hint_text_lists_defects_in_model_grid_pixels():
    text = hint_text(
        category="metal_nut", is_anomalous=True, defect_type="color_shift",
        grid_boxes=[[1, 2, 30, 40], [50, 60, 70, 80]], labels=["color", "scratch"],
    )  # fmt: skip
    assert "([1, 2, 30, 40], 'color'), ([50, 60, 70, 80], 'scratch')" in text
    assert "metal nut" in text and "color shift" in text
    assert "Never mention the hint" in text
    normal = hint_text(
        category="brick", is_anomalous=False, defect_type="good", grid_boxes=[], labels=[]
    )
    assert "normal and defect-free" in normal and '"No."' in normal and "[" not in normal


def test_boxes_are_drawn_in_red_inside_their_pixels():
    image = np.full((112, 224, 3), 128, dtype=np.uint8)
    drawn = np.asarray(draw_boxes(image, [[10, 20, 50, 60]]))
    width = outline_width((224, 112))
    assert width >= 2
    assert tuple(drawn[20, 30]) == HINT_COLOUR  # top edge
    assert tuple(drawn[59, 30]) == HINT_COLOUR  # bottom edge: y2 is exclusive
    assert tuple(drawn[40, 49]) == HINT_COLOUR  # right edge
    assert tuple(drawn[40, 50]) == (128, 128, 128)  # just outside
    assert tuple(drawn[40, 30]) == (128, 128, 128)  # inside stays as it was
    assert (image == 128).all()  # the input is not drawn on


def test_hinted_input_maps_record_boxes_to_the_grid():
    row = {
        "category": "grass", "is_anomalous": True, "defect_type": "hole",
        "width": 200, "height": 100, "boxes": np.array([np.array([20.0, 10.0, 100.0, 50.0])]),
        "labels": np.array(["hole"]), "image": np.zeros((56, 112, 3), np.uint8),
        "reference": np.zeros((0, 0, 3), np.uint8),
    }  # fmt: skip
    item = hinted_input(row)
    assert "([11, 6, 56, 28], 'hole')" in item.hint  # 200x100 → 112x56
    assert item.reference is None and item.category == "grass"
    assert np.asarray(item.image)[6, 20].tolist() == list(HINT_COLOUR)
