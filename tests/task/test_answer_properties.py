"""Properties of the answer parser over arbitrary and adversarial text."""

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmrad.task.answer import Verdict, format_answer, parse_answer
from mmrad.task.geometry import from_model_grid, grid_scale, model_grid, to_model_grid

# pieces of answers, and pieces that make naive parsers slow or crash
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
WORDS = ["Yes", "No", "yes", "bbox_2d", "bbox", "label", "\u0120", "é"]
PUNCTUATION = [*"{}[]:'\"\\ \n\x00", ". ", ", "]
PIECES = [
    "'bbox_2d': ",
    "'label': 'scratch'",
    "{'bbox_2d': [1, 2, 30, 40], 'label': 'x'}",
    "[1, 2, 3, 4]",
    "[10, 20, 5, 1]",
    "-3",
    "0.5",
    "1e999",
    "1" * 40,
]
FRAGMENTS = TAGS + WORDS + PUNCTUATION + PIECES
adversarial = st.lists(st.sampled_from(FRAGMENTS), max_size=60).map("".join)
any_text = st.one_of(st.text(max_size=300), adversarial)
sizes = st.one_of(st.none(), st.tuples(st.integers(1, 2000), st.integers(1, 2000)))
scales = st.tuples(st.floats(0.01, 100), st.floats(0.01, 100))


@settings(max_examples=400)
@given(text=any_text, scale=scales, size=sizes, require_think=st.booleans())
def test_parse_never_raises_and_returns_consistent_boxes(text, scale, size, require_think):
    verdict = parse_answer(text, scale=scale, size=size, require_think=require_think)
    assert isinstance(verdict, Verdict)
    assert verdict.decision in (True, False, None)
    assert len(verdict.boxes) == len(verdict.labels)
    for x1, y1, x2, y2 in verdict.boxes:
        assert x1 < x2 and y1 < y2
        if size is not None:
            assert x1 >= 0 and y1 >= 0 and x2 <= size[0] and y2 <= size[1]
    assert all(isinstance(label, str) for label in verdict.labels)
    if verdict.format_ok:
        assert verdict.decision is not None
        assert (len(verdict.boxes) > 0) is verdict.decision


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pattern=st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=6).map("".join),
    prefix=st.sampled_from(["", "<think>", "<think>x</think><answer>Yes. ", "<answer>"]),
)
def test_one_megabyte_input_parses_fast(pattern, prefix):
    text = prefix + pattern * (1_000_000 // len(pattern) + 1)
    start = time.perf_counter()
    parse_answer(text, size=(100, 100))
    assert time.perf_counter() - start < 2.0  # generous: linear parsing takes ~0.1 s


labels = st.text(max_size=20).filter(lambda s: s == s.strip() and "<" not in s)
reasonings = st.one_of(st.none(), st.text(max_size=80).filter(lambda s: "<" not in s))
int_boxes = st.builds(
    lambda x, y, w, h: [x, y, x + w, y + h],
    st.integers(0, 5000),
    st.integers(0, 5000),
    st.integers(1, 500),
    st.integers(1, 500),
)


@settings(max_examples=300)
@given(
    is_anomalous=st.booleans(),
    items=st.lists(st.tuples(int_boxes, labels), max_size=5),
    reasoning=reasonings,
)
def test_parse_inverts_format(is_anomalous, items, reasoning):
    boxes = [box for box, _ in items] if is_anomalous else []
    box_labels = [label for _, label in items] if is_anomalous else []
    text = format_answer(is_anomalous, boxes, box_labels, reasoning)
    verdict = parse_answer(text, require_think=reasoning is not None)
    assert verdict.decision is is_anomalous
    assert verdict.boxes == [[float(v) for v in box] for box in boxes]
    assert verdict.labels == box_labels
    assert verdict.reasoning == (None if reasoning is None else reasoning.strip())
    assert verdict.format_ok is (not is_anomalous or bool(boxes))


@settings(max_examples=200)
@given(
    size=st.tuples(st.integers(28, 4000), st.integers(28, 4000)).filter(
        lambda s: max(s) / min(s) < 100
    ),
    corners=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=2, max_size=2),
)
def test_answer_through_the_model_grid_lands_within_half_a_grid_pixel(size, corners):
    (ax, ay), (bx, by) = corners
    width, height = size
    box = [min(ax, bx) * width, min(ay, by) * height, max(ax, bx) * width, max(ay, by) * height]
    grid = model_grid(size)
    grid_box = to_model_grid([box], size, grid)[0]
    if not (grid_box[0] < grid_box[2] and grid_box[1] < grid_box[3]):
        return  # too thin to survive rounding to the grid
    text = format_answer(True, [grid_box], ["x"], "r")
    verdict = parse_answer(text, scale=grid_scale(size, grid), size=size)
    sx, sy = grid_scale(size, grid)
    # the clip to the image may shave off float noise of the scaling
    assert verdict.boxes == [pytest.approx(from_model_grid([grid_box], size, grid)[0])]
    for got, want, step in zip(verdict.boxes[0], box, (sx, sy, sx, sy), strict=True):
        assert abs(got - want) <= step / 2 + 1e-9
