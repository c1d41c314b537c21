"""The Anomaly-R1 inspection prompt, as chat messages for Qwen2.5-VL-style processors.

A user turn holds a normal reference image of the category, the query image and the
text: the query's size in model-grid pixels (so the answer's boxes are in that grid),
the category, optionally the category's known anomaly types, the task and the answer
format. :class:`PromptVariant` holds the switches the paper's variants and ablations use.
Each piece of wording is one constant below.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from mmrad.task.geometry import GRID_FACTOR, Size, answer_unit
from mmrad.task.knowledge import CategoryKnowledge

IMAGE_PLACEHOLDER = "<image>"
"""Stands in for an image in messages whose images the caller hands to the processor
separately (chat templates only need to know where an image goes)."""

CATEGORY_SUBJECT = 'an industrial product of the category "{category}"'
GENERIC_SUBJECT = "an industrial product"
REFERENCE_INTRO = "The first image shows a normal, defect-free sample of {subject}."
QUERY_AFTER_REFERENCE = (
    "The second image is the query image, a sample of the same product, {extent}."
)
QUERY_ALONE = "The image is the query image, a sample of {subject}, {extent}."
EXTENT_IN_PIXELS = "{width} pixels wide and {height} pixels high"
EXTENT_IN_CELLS = "{width} cells wide and {height} cells high, a cell being {cell} by {cell} pixels"
DOMAIN_KNOWLEDGE = "In {category} samples, the following anomaly types may occur: {types}."
CATEGORY_DESCRIPTION = "About {category}: {description}"
TASK = "Inspect the query image: does it show any anomaly or defect?"
REASONING_INSTRUCTION = (
    "First reason step by step inside <think> </think> tags, "
    "then give the final answer inside <answer> </answer> tags."
)
DIRECT_INSTRUCTION = "Give only the final answer, inside <answer> </answer> tags."
ANSWER_FORMAT = (
    'If the query image is anomalous, answer "Yes." followed by one '
    "{'bbox_2d': [x1, y1, x2, y2], 'label': '<anomaly type>'} per anomaly, separated by "
    'commas, with coordinates in COORDINATES. If it is normal, answer "No."'
)
COORDINATES_IN_PIXELS = "pixels of the query image"
COORDINATES_IN_CELLS = (
    "cells of the query image: x1 and y1 the first column and row of cells the anomaly "
    "covers, counted from 0, x2 and y2 one past its last"
)
NORMAL_DEFECT_TYPE = "good"  # the defect_type of normal records, not an anomaly type


@dataclass(frozen=True)
class PromptVariant:
    """Switches for the paper's variants and ablations.

    - ``use_reference``: show a normal reference image before the query.
    - ``domain_knowledge``: describe the category and name its known anomaly types
      (:mod:`mmrad.task.knowledge`).
    - ``reasoning``: ask for ``<think>`` before ``<answer>``; without it the model answers
      directly and the ``format`` reward checks the answer block alone.
    - ``box_units``: answer boxes in model-grid ``pixels`` or in ``cells``
      (:func:`mmrad.task.geometry.answer_unit`).
    """

    use_reference: bool = True
    domain_knowledge: bool = False
    reasoning: bool = True
    box_units: str = "pixels"

    def answer_unit(self, factor: int = GRID_FACTOR) -> int:
        """Model-grid pixels per answer coordinate on a grid of ``factor``-pixel cells."""
        return answer_unit(self.box_units, factor)


def prompt_text(
    *,
    category: str | None,
    grid_size: Size,
    variant: PromptVariant,
    knowledge: CategoryKnowledge | None = None,
    hint: str | None = None,
    cell: int = GRID_FACTOR,
) -> str:
    """The prompt's text; ``grid_size = (width, height)`` of the query in the model grid,
    whose cells are ``cell`` pixels square.

    An unknown category (``None`` or empty) gets the generic wording and no domain
    knowledge; a category without knowledge gets none either. ``hint`` (the annotation
    job's ground-truth hint for a teacher model, :mod:`mmrad.eval.hints`) is appended
    last; without one the text is exactly the inspection prompt.
    """
    width, height = grid_size
    name = readable(category) if category else None
    subject = CATEGORY_SUBJECT.format(category=name) if name else GENERIC_SUBJECT
    sentences = []
    unit = variant.answer_unit(cell)
    if unit == 1:
        extent = EXTENT_IN_PIXELS.format(width=width, height=height)
    else:
        extent = EXTENT_IN_CELLS.format(width=width // unit, height=height // unit, cell=unit)
    if variant.use_reference:
        sentences.append(REFERENCE_INTRO.format(subject=subject))
        sentences.append(QUERY_AFTER_REFERENCE.format(extent=extent))
    else:
        sentences.append(QUERY_ALONE.format(subject=subject, extent=extent))
    if variant.domain_knowledge and name and knowledge is not None:
        sentences.extend(knowledge_sentences(name, knowledge))
    sentences.append(TASK)
    sentences.append(REASONING_INSTRUCTION if variant.reasoning else DIRECT_INSTRUCTION)
    coordinates = COORDINATES_IN_PIXELS if unit == 1 else COORDINATES_IN_CELLS
    sentences.append(ANSWER_FORMAT.replace("COORDINATES", coordinates))
    if hint:
        sentences.append(hint)
    return " ".join(sentences)


def build_messages(
    *,
    category: str | None,
    grid_size: Size,
    variant: PromptVariant,
    knowledge: CategoryKnowledge | None = None,
    query_image: Any = IMAGE_PLACEHOLDER,
    reference_image: Any = None,
    hint: str | None = None,
    cell: int = GRID_FACTOR,
) -> list[dict[str, Any]]:
    """One user turn: ``[reference image,] query image, text``.

    The reference comes first when the variant uses one and it is given; without one the
    text does not mention it (as for ``use_reference=False``). ``hint`` and ``cell``: see
    :func:`prompt_text`.
    """
    with_reference = variant.use_reference and reference_image is not None
    variant = replace(variant, use_reference=with_reference)
    images = [reference_image, query_image] if with_reference else [query_image]
    text = prompt_text(
        category=category,
        grid_size=grid_size,
        variant=variant,
        knowledge=knowledge,
        hint=hint,
        cell=cell,
    )
    content = [{"type": "image", "image": image} for image in images]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def knowledge_sentences(name: str, knowledge: CategoryKnowledge) -> list[str]:
    """The category's description and its known anomaly types, each when there is one."""
    sentences = []
    if knowledge.description:
        sentences.append(
            CATEGORY_DESCRIPTION.format(category=name, description=knowledge.description)
        )
    types = anomaly_types(knowledge.defect_types)
    if types:
        sentences.append(DOMAIN_KNOWLEDGE.format(category=name, types=", ".join(types)))
    return sentences


def readable(name: str) -> str:
    """``metal_nut`` → ``metal nut``: data set identifiers as words."""
    return " ".join(name.replace("_", " ").split())


def anomaly_types(defect_types: Sequence[str]) -> list[str]:
    """Readable anomaly types in first-seen order, without the normal type; types that
    differ only in case are one type."""
    types: dict[str, str] = {}
    for defect_type in defect_types:
        words = readable(defect_type)
        if words and words.lower() != NORMAL_DEFECT_TYPE:
            types.setdefault(words.lower(), words)
    return list(types.values())
