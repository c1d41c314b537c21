"""The inspection prompt and its variants."""

import dataclasses

import pytest

from mmrad.task.answer import format_answer, parse_answer
from mmrad.task.knowledge import CategoryKnowledge
from mmrad.task.prompt import (
    FULL,
    IMAGE_PLACEHOLDER,
    TERSE,
    PromptVariant,
    anomaly_types,
    build_messages,
    prompt_text,
)

DEFAULT = PromptVariant()
GENERIC_SUBJECT = FULL.generic_subject
REASONING_INSTRUCTION = FULL.reasoning_instruction
DIRECT_INSTRUCTION = FULL.direct_instruction


def _content(messages):
    assert [m["role"] for m in messages] == ["user"]
    return messages[0]["content"]


def test_reference_then_query_then_text():
    messages = build_messages(
        category="metal_nut",
        grid_size=(560, 280),
        variant=DEFAULT,
        query_image="QUERY",
        reference_image="REFERENCE",
    )
    content = _content(messages)
    assert [item["type"] for item in content] == ["image", "image", "text"]
    assert [content[0]["image"], content[1]["image"]] == ["REFERENCE", "QUERY"]
    text = content[2]["text"]
    assert text.startswith(
        "The first image shows a normal, defect-free sample of an industrial product of the "
        'category "metal nut". The second image is the query image, a sample of the same '
        "product, 560 pixels wide and 280 pixels high."
    )
    assert REASONING_INSTRUCTION in text
    assert text == prompt_text(category="metal_nut", grid_size=(560, 280), variant=DEFAULT)


def test_answer_format_in_prompt_is_what_format_answer_writes():
    text = prompt_text(category="bottle", grid_size=(448, 448), variant=DEFAULT)
    item = format_answer(True, [[1, 2, 3, 4]], ["crack"], None)
    assert "{'bbox_2d': [x1, y1, x2, y2], 'label': '" in text
    assert "{'bbox_2d': [1, 2, 3, 4], 'label': 'crack'}" in item
    assert '"Yes."' in text and '"No."' in text


def test_cell_variant_states_the_grid_and_the_coordinates_in_cells():
    cells = PromptVariant(box_units="cells")
    text = prompt_text(category="bottle", grid_size=(560, 280), variant=cells)
    assert "20 cells wide and 10 cells high, a cell being 28 by 28 pixels." in text
    assert "with coordinates in cells of the query image: x1 and y1 the first" in text
    assert "pixels wide" not in text and "coordinates in pixels" not in text
    # a grid of 32-pixel cells (another model's factor) counts its own cells
    other = prompt_text(category="bottle", grid_size=(640, 320), variant=cells, cell=32)
    assert "20 cells wide and 10 cells high, a cell being 32 by 32 pixels." in other
    # the pixel variant does not depend on the cell size
    assert prompt_text(category="bottle", grid_size=(640, 320), variant=DEFAULT, cell=32) == (
        prompt_text(category="bottle", grid_size=(640, 320), variant=DEFAULT)
    )


def test_unknown_box_units_are_refused():
    with pytest.raises(ValueError, match="box units must be 'pixels' or 'cells', got 'inches'"):
        prompt_text(category="bottle", grid_size=(56, 56),
                    variant=PromptVariant(box_units="inches"))  # fmt: skip


def test_without_reference_variant():
    variant = PromptVariant(use_reference=False)
    content = _content(
        build_messages(
            category="bottle", grid_size=(448, 336), variant=variant, reference_image="R"
        )
    )
    assert [item["type"] for item in content] == ["image", "text"]
    assert content[0]["image"] == IMAGE_PLACEHOLDER
    text = content[1]["text"]
    assert text.startswith(
        'The image is the query image, a sample of an industrial product of the category "bottle", '
        "448 pixels wide and 336 pixels high."
    )
    assert "first image" not in text and "second image" not in text


def test_missing_reference_image_drops_it_from_the_text():
    with_none = build_messages(category="bottle", grid_size=(448, 336), variant=DEFAULT)
    without = build_messages(
        category="bottle", grid_size=(448, 336), variant=PromptVariant(use_reference=False)
    )
    assert with_none == without


@pytest.mark.parametrize("category", [None, ""])
def test_unknown_category_uses_generic_wording(category):
    text = prompt_text(
        category=category,
        grid_size=(448, 448),
        variant=PromptVariant(domain_knowledge=True),
        knowledge=CategoryKnowledge(("crack",), "A part."),
    )
    assert f"sample of {GENERIC_SUBJECT}." in text
    assert "category" not in text
    assert "anomaly types may occur" not in text  # no category to name
    assert "A part." not in text


def test_domain_knowledge_lists_distinct_readable_types():
    text = prompt_text(
        category="metal_nut",
        grid_size=(448, 448),
        variant=PromptVariant(domain_knowledge=True),
        knowledge=CategoryKnowledge(("scratch", "good", "broken_large", "scratch", "color")),
    )
    assert (
        "In metal nut samples, the following anomaly types may occur: scratch, broken large, "
        "color." in text
    )


def test_domain_knowledge_describes_the_category_before_its_types():
    text = prompt_text(
        category="metal_nut",
        grid_size=(448, 448),
        variant=PromptVariant(domain_knowledge=True),
        knowledge=CategoryKnowledge(("scratch",), "A hexagonal nut, silver or gold."),
    )
    description = "About metal nut: A hexagonal nut, silver or gold."
    assert description in text
    assert text.index(description) < text.index("anomaly types may occur: scratch.")


@pytest.mark.parametrize(
    ("variant", "knowledge"),
    [
        (PromptVariant(), CategoryKnowledge(("scratch",), "A bottle.")),
        (PromptVariant(domain_knowledge=True), CategoryKnowledge(("good",))),
        (PromptVariant(domain_knowledge=True), None),
    ],
)
def test_no_domain_knowledge_when_off_or_unknown(variant, knowledge):
    text = prompt_text(
        category="bottle", grid_size=(448, 448), variant=variant, knowledge=knowledge
    )
    assert "anomaly types may occur" not in text
    assert "About bottle" not in text


def test_no_reasoning_variant_asks_for_the_answer_alone():
    text = prompt_text(
        category="bottle", grid_size=(448, 448), variant=PromptVariant(reasoning=False)
    )
    assert DIRECT_INSTRUCTION in text
    assert "<think>" not in text
    assert "<answer>" in text


def test_anomaly_types():
    assert anomaly_types(["good", "Broken_Large", "broken  large", ""]) == ["Broken Large"]


def test_variant_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT.reasoning = False  # type: ignore[misc]


def test_no_hint_is_todays_prompt_and_a_hint_goes_last():
    kwargs = dict(category="metal_nut", grid_size=(224, 112), variant=DEFAULT)
    plain = prompt_text(**kwargs)
    assert prompt_text(**kwargs, hint=None) == plain
    assert prompt_text(**kwargs, hint="") == plain
    hinted = prompt_text(**kwargs, hint="HINT: the part is defect-free.")
    assert hinted == plain + " HINT: the part is defect-free."
    messages = build_messages(**kwargs, reference_image="R", hint="HINT.")
    assert messages[0]["content"][-1]["text"] == plain + " HINT."
    assert build_messages(**kwargs, reference_image="R", hint=None) == build_messages(
        **kwargs, reference_image="R"
    )


def test_terse_wording_states_the_same_facts_in_a_third_of_the_words():
    kwargs = dict(category="metal_nut", grid_size=(112, 112), knowledge=CategoryKnowledge(
        ("scratch",), "A hexagonal nut."))  # fmt: skip
    for switches in ({}, {"box_units": "cells", "reasoning": False, "domain_knowledge": True}):
        full = prompt_text(**kwargs, variant=PromptVariant(**switches))
        terse = prompt_text(**kwargs, variant=PromptVariant(**switches, wording="terse"))
        assert len(terse.split()) <= 0.4 * len(full.split())
        assert '"metal nut"' in terse
    cells = prompt_text(**kwargs, variant=PromptVariant(box_units="cells", wording="terse",
                                                          domain_knowledge=True))  # fmt: skip
    assert "Image 1: normal" in cells and "4x4 cells of 28 px" in cells
    assert "scratch" in cells and "A hexagonal nut." in cells
    assert TERSE.direct_instruction not in cells and "<think>" in cells
    alone = prompt_text(category=None, grid_size=(448, 224),
                        variant=PromptVariant(use_reference=False, wording="terse"))  # fmt: skip
    assert alone.startswith("Image: query product, 448x224 px.")


def test_terse_wording_asks_for_what_the_answer_parser_reads():
    text = prompt_text(category="bottle", grid_size=(112, 112),
                       variant=PromptVariant(wording="terse", reasoning=False))  # fmt: skip
    shown = text[text.index("{") : text.index("}") + 1].replace("x1, y1, x2, y2", "0, 1, 2, 3")
    verdict = parse_answer(f"<answer>Yes. {shown.replace('<type>', 'crack')}</answer>",
                           require_think=False)  # fmt: skip
    assert verdict.decision is True and verdict.format_ok and verdict.labels == ["crack"]
    assert [list(box) for box in verdict.boxes] == [[0, 1, 2, 3]]


def test_an_unknown_wording_is_refused():
    with pytest.raises(ValueError, match="prompt wording must be one of \\['full', 'terse'\\]"):
        prompt_text(category="bottle", grid_size=(56, 56),
                    variant=PromptVariant(wording="short"))  # fmt: skip
