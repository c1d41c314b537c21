"""Answers: formatting, parsing, format checks and first-token scores (worked examples)."""

import math

import pytest

from mmrad.task.answer import (
    Verdict,
    answer_token_index,
    format_answer,
    parse_answer,
    read_decision,
    yes_probability,
)

CANONICAL = (
    "<think>A scratch runs across the cap.</think><answer>Yes. "
    "{'bbox_2d': [10, 20, 30, 40], 'label': 'scratch'}, "
    "{'bbox_2d': [50, 60, 70, 80], 'label': 'dent'}</answer>"
)

# -------------------------------------------------------------------------------- format


def test_format_answer_anomalous():
    text = format_answer(
        True,
        [[10, 20, 30, 40], [50, 60, 70, 80]],
        ["scratch", "dent"],
        "A scratch runs across the cap.",
    )
    assert text == CANONICAL


def test_format_answer_normal_and_without_reasoning():
    assert (
        format_answer(False, [], [], "All fine.") == "<think>All fine.</think><answer>No.</answer>"
    )
    assert format_answer(False, [], [], None) == "<answer>No.</answer>"


def test_format_answer_number_printing():
    text = format_answer(True, [[1.0, 2, 3.5, 4]], ["hole"], None)
    assert text == "<answer>Yes. {'bbox_2d': [1, 2, 3.5, 4], 'label': 'hole'}</answer>"


def test_format_answer_anomalous_without_boxes():
    assert format_answer(True, [], [], None) == "<answer>Yes.</answer>"


def test_format_answer_rejects_inconsistent_input():
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        format_answer(True, [[0, 0, 1, 1], [1, 1, 2, 2]], ["x"], None)
    with pytest.raises(ValueError, match="normal image has no boxes"):
        format_answer(False, [[0, 0, 1, 1]], ["x"], None)


# ------------------------------------------------------------------------------- parsing


def test_parse_canonical_answer():
    verdict = parse_answer(CANONICAL)
    assert verdict == Verdict(
        decision=True,
        boxes=[[10.0, 20.0, 30.0, 40.0], [50.0, 60.0, 70.0, 80.0]],
        labels=["scratch", "dent"],
        reasoning="A scratch runs across the cap.",
        format_ok=True,
        score=None,
    )


def test_parse_normal_answer():
    verdict = parse_answer("<think>\nNothing odd.\n</think>\n<answer>No.</answer>\n")
    assert verdict == Verdict(False, [], [], "Nothing odd.", True, None)


def test_scale_maps_grid_to_original_pixels_and_size_clips():
    text = "<think>t</think><answer>Yes. {'bbox_2d': [10, 20, 300, 40], 'label': 'crack'}</answer>"
    verdict = parse_answer(text, scale=(2.0, 0.5), size=(500, 100))
    assert verdict.boxes == [[20.0, 10.0, 500.0, 20.0]]  # x2 = 600 clipped to 500
    assert verdict.format_ok


def test_json_double_quotes_and_bbox_key():
    text = (
        '<think>t</think><answer>Yes. [{"bbox_2d": [1, 2, 3, 4], "label": "hole"}, '
        '{"label": "cut", "bbox": [5.5, 6, 7, 8]}]</answer>'
    )
    verdict = parse_answer(text)
    assert verdict.boxes == [[1.0, 2.0, 3.0, 4.0], [5.5, 6.0, 7.0, 8.0]]
    assert verdict.labels == ["hole", "cut"]


def test_bare_lists_are_read_without_labels():
    verdict = parse_answer("<answer>Yes, [1, 2, 3, 4] and [5,6,7,8]</answer>")
    assert verdict.decision is True
    assert verdict.boxes == [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]
    assert verdict.labels == ["", ""]
    assert not verdict.format_ok  # a well-formed box is a dict with a label


def test_swapped_corners_are_reordered():
    verdict = parse_answer("<answer>Yes. {'bbox_2d': [30, 40, 10, 20], 'label': 'x'}</answer>")
    assert verdict.boxes == [[10.0, 20.0, 30.0, 40.0]]


def test_degenerate_and_outside_boxes_are_dropped():
    text = (
        "<answer>Yes. {'bbox_2d': [5, 5, 5, 9], 'label': 'line'}, "
        "{'bbox_2d': [200, 10, 250, 20], 'label': 'outside'}, "
        "{'bbox_2d': [1, 1, 4, 4], 'label': 'kept'}</answer>"
    )
    verdict = parse_answer(text, size=(100, 100))
    assert verdict.boxes == [[1.0, 1.0, 4.0, 4.0]]
    assert verdict.labels == ["kept"]


def test_truncated_output_keeps_complete_boxes():
    text = (
        "<think>t</think><answer>Yes. {'bbox_2d': [1, 2, 3, 4], 'label': 'a'}, "
        "{'bbox_2d': [5, 6, 7, 8], 'label': 'b'}, {'bbox_2d': [9, 10, 1"
    )
    verdict = parse_answer(text)
    assert verdict.decision is True
    assert verdict.boxes == [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]
    assert verdict.labels == ["a", "b"]
    assert not verdict.format_ok


def test_box_whose_label_is_cut_off_is_dropped():
    verdict = parse_answer("<answer>Yes. {'bbox_2d': [1, 2, 3, 4], 'label': 'scr")
    assert verdict.boxes == []


def test_truncated_reasoning():
    verdict = parse_answer("<think>The cap has a long scr")
    assert verdict == Verdict(None, [], [], "The cap has a long scr", False, None)


def test_unclosed_think_ends_at_the_answer():
    verdict = parse_answer("<think>looks fine<answer>No.</answer>")
    assert verdict.reasoning == "looks fine"
    assert verdict.decision is False
    assert not verdict.format_ok


def test_untagged_answer_is_read_but_not_well_formed():
    verdict = parse_answer("Yes. {'bbox_2d': [1, 2, 3, 4], 'label': 'x'}")
    assert verdict.decision is True and verdict.boxes == [[1.0, 2.0, 3.0, 4.0]]
    assert verdict.reasoning is None and not verdict.format_ok


def test_escaped_quotes_in_labels():
    text = """<answer>Yes. {'bbox_2d': [1, 2, 3, 4], 'label': 'it\\'s "bent"'}</answer>"""
    assert parse_answer(text).labels == ['it\'s "bent"']


def test_other_keys_are_ignored():
    text = "<answer>Yes. {'score': 0.9, 'bbox_2d': [1, 2, 3, 4], 'label': 'x', 'n': [1]}</answer>"
    assert parse_answer(text).boxes == [[1.0, 2.0, 3.0, 4.0]]


@pytest.mark.parametrize(
    ("content", "decision"),
    [
        ("Yes.", True),
        ("yes", True),
        ("YES!", True),
        ("Yes, there is a crack", True),
        ("  **Yes**", True),
        ('"no"', False),
        ("No.", False),
        ("NO", False),
        ("Yesterday", None),
        ("None", None),
        ("Nothing", None),
        ("Maybe", None),
        ("", None),
        ("[1, 2, 3, 4]", None),
    ],
)
def test_decision_words(content, decision):
    assert read_decision(content) is decision
    assert parse_answer(f"<think>t</think><answer>{content}</answer>").decision is decision


@pytest.mark.parametrize("bad", [None, 42, b"<answer>Yes</answer>"])
def test_non_text_gives_no_decision(bad):
    assert parse_answer(bad) == Verdict(decision=None)


# ---------------------------------------------------------------------------- format_ok


WELL_FORMED_YES = "<answer>Yes. {'bbox_2d': [1, 2, 3, 4], 'label': 'x'}</answer>"


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        (f"<think>t</think>{WELL_FORMED_YES}", True),
        (f"  <think>t</think>\n\n{WELL_FORMED_YES}\n", True),
        ("<think>t</think><answer>No.</answer>", True),
        ("<think>t</think><answer>No. The surface is clean.</answer>", True),
        (f"<think>a</think><think>b</think>{WELL_FORMED_YES}", False),  # two think blocks
        (f"Sure! <think>t</think>{WELL_FORMED_YES}", False),  # text before
        (f"<think>t</think>{WELL_FORMED_YES} Done.", False),  # text after
        (f"<think>t</think>{WELL_FORMED_YES}{WELL_FORMED_YES}", False),  # two answers
        (WELL_FORMED_YES, False),  # no think block
        ("<think>t</think><answer>yes. {'bbox_2d': [1, 2, 3, 4], 'label': 'x'}</answer>", False),
        ("<think>t</think><answer>Yes.</answer>", False),  # Yes without a box
        ("<think>t</think><answer>Yes. [1, 2, 3, 4]</answer>", False),  # bare list
        ("<think>t</think><answer>Yes. {'bbox_2d': [1, 2, 3, 4]}</answer>", False),  # no label
        ("<think>t</think><answer>Yes. {'bbox_2d': [1, 2, 3], 'label': 'x'}</answer>", False),
        (f"<think>t</think>{WELL_FORMED_YES[:-9]}, {{'bbox_2d': [5]}}</answer>", False),
        ("<think>t</think><answer>No. {'bbox_2d': [1, 2, 3, 4], 'label': 'x'}</answer>", False),
        ("<think>t</think><answer>Maybe.</answer>", False),
        ("<think>t</think><answer>Yes. {'bbox_2d': [1, 2, 3, 4], 'label': 'x'}", False),
    ],
)
def test_format_ok(text, ok):
    assert parse_answer(text).format_ok is ok


def test_format_ok_without_required_think():
    assert parse_answer(WELL_FORMED_YES, require_think=False).format_ok
    assert parse_answer(f"<think>t</think>{WELL_FORMED_YES}", require_think=False).format_ok
    assert not parse_answer(f"{WELL_FORMED_YES}</think>", require_think=False).format_ok
    assert not parse_answer(f"x {WELL_FORMED_YES}", require_think=False).format_ok


def test_box_clipped_away_breaks_the_format():
    text = "<think>t</think><answer>Yes. {'bbox_2d': [200, 0, 300, 10], 'label': 'x'}</answer>"
    assert parse_answer(text).format_ok
    assert not parse_answer(text, size=(100, 100)).format_ok


# ------------------------------------------------------------------- first-token scores


def test_yes_probability_normalises_over_yes_and_no():
    assert yes_probability({"Yes": math.log(0.6), "No": math.log(0.2)}) == pytest.approx(0.75)


def test_yes_probability_sums_token_variants():
    logprobs = {
        "Yes": math.log(0.3),
        " yes": math.log(0.1),
        "\u0120YES": math.log(0.2),  # byte-level BPE "ĠYES"
        "No": math.log(0.1),
        "\u2581no": math.log(0.1),
        "Maybe": math.log(0.2),
    }
    assert yes_probability(logprobs) == pytest.approx(0.6 / 0.8)


def test_yes_probability_edge_cases():
    assert yes_probability({"Yes": -3.0}) == 1.0
    assert yes_probability({"no": -0.1, "maybe": -0.2}) == 0.0
    assert yes_probability({"Maybe": -0.1}) is None
    assert yes_probability({}) is None
    assert yes_probability({"Yes": -1000.0, "No": 0.0}) == pytest.approx(0.0, abs=1e-300)
    assert yes_probability({"Yes": 0.0, "No": -1000.0}) == pytest.approx(1.0)


def test_answer_token_index():
    tokens = ["<think>", "fine", "</think>", "<", "answer", ">", "No", ".", "</answer>"]
    assert answer_token_index(tokens) == 6


def test_answer_token_index_skips_blank_tokens_and_reads_merged_ones():
    assert answer_token_index(["<answer>", "\n", " Yes", "."]) == 2
    assert answer_token_index(["<answer", ">Yes", "."]) == 1
    # a tag mentioned inside the reasoning is not the answer
    tokens = ["<think>", "I will use <answer> tags", "</think>", "<answer>", "No"]
    assert answer_token_index(tokens) == 4


@pytest.mark.parametrize(
    "tokens", [[], ["<think>", "hmm"], ["<answer>"], ["<answer>", "  "], ["Yes", "."]]
)
def test_answer_token_index_without_answer(tokens):
    assert answer_token_index(tokens) is None
