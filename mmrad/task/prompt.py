"""The Anomaly-R1 inspection prompt, as chat messages for Qwen2.5-VL-style processors.

A user turn holds a normal reference image of the category, the query image and the
text: the query's size in model-grid pixels (so the answer's boxes are in that grid),
the category, optionally the category's known anomaly types, the task and the answer
format. :class:`PromptVariant` holds the switches the paper's variants and ablations use.
Each wording (the paper's whole sentences, a terse one for small models) is one
:class:`Wording` of sentence templates below.
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


@dataclass(frozen=True)
class Wording:
    """The sentences of one prompt wording, as templates.

    ``COORDINATES`` in ``answer_format`` stands for ``coordinates_in_pixels`` or
    ``coordinates_in_cells``."""

    category_subject: str
    generic_subject: str
    reference_intro: str
    query_after_reference: str
    query_alone: str
    extent_in_pixels: str
    extent_in_cells: str
    domain_knowledge: str
    category_description: str
    task: str
    reasoning_instruction: str
    direct_instruction: str
    answer_format: str
    coordinates_in_pixels: str
    coordinates_in_cells: str


FULL = Wording(
    category_subject='an industrial product of the category "{category}"',
    generic_subject="an industrial product",
    reference_intro="The first image shows a normal, defect-free sample of {subject}.",
    query_after_reference=(
        "The second image is the query image, a sample of the same product, {extent}."
    ),
    query_alone="The image is the query image, a sample of {subject}, {extent}.",
    extent_in_pixels="{width} pixels wide and {height} pixels high",
    extent_in_cells=(
        "{width} cells wide and {height} cells high, a cell being {cell} by {cell} pixels"
    ),
    domain_knowledge="In {category} samples, the following anomaly types may occur: {types}.",
    category_description="About {category}: {description}",
    task="Inspect the query image: does it show any anomaly or defect?",
    reasoning_instruction=(
        "First reason step by step inside <think> </think> tags, "
        "then give the final answer inside <answer> </answer> tags."
    ),
    direct_instruction="Give only the final answer, inside <answer> </answer> tags.",
    answer_format=(
        'If the query image is anomalous, answer "Yes." followed by one '
        "{'bbox_2d': [x1, y1, x2, y2], 'label': '<anomaly type>'} per anomaly, separated by "
        'commas, with coordinates in COORDINATES. If it is normal, answer "No."'
    ),
    coordinates_in_pixels="pixels of the query image",
    coordinates_in_cells=(
        "cells of the query image: x1 and y1 the first column and row of cells the anomaly "
        "covers, counted from 0, x2 and y2 one past its last"
    ),
)
"""The paper's wording: whole sentences, 100 to 130 words with the answer format."""

TERSE = Wording(
    category_subject='"{category}"',
    generic_subject="product",
    reference_intro="Image 1: normal {subject}.",
    query_after_reference="Image 2: query, {extent}.",
    query_alone="Image: query {subject}, {extent}.",
    extent_in_pixels="{width}x{height} px",
    extent_in_cells="{width}x{height} cells of {cell} px",
    domain_knowledge="{category} anomaly types: {types}.",
    category_description="{category}: {description}",
    task="Any defect?",
    reasoning_instruction="Reason in <think> </think>, then answer in <answer> </answer>.",
    direct_instruction="Answer in <answer> </answer>.",
    answer_format=(
        "\"Yes.\" then {'bbox_2d': [x1, y1, x2, y2], 'label': '<type>'} per defect, in "
        'COORDINATES; else "No."'
    ),
    coordinates_in_pixels="px",
    coordinates_in_cells="cells from 0, x2 and y2 exclusive",
)
"""A third of the words, for small models whose step time the prompt's tokens set (the
tiny learning recipe's): the same facts, images and answer format."""

WORDINGS = {"full": FULL, "terse": TERSE}

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
    - ``wording``: the paper's ``full`` sentences or the ``terse`` ones (:data:`WORDINGS`).
    """

    use_reference: bool = True
    domain_knowledge: bool = False
    reasoning: bool = True
    box_units: str = "pixels"
    wording: str = "full"

    def answer_unit(self, factor: int = GRID_FACTOR) -> int:
        """Model-grid pixels per answer coordinate on a grid of ``factor``-pixel cells."""
        return answer_unit(self.box_units, factor)

    def sentences(self) -> Wording:
        """The sentence templates of this variant's wording."""
        if self.wording not in WORDINGS:
            raise ValueError(
                f"prompt wording must be one of {sorted(WORDINGS)}, got {self.wording!r}"
            )
        return WORDINGS[self.wording]


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
    words = variant.sentences()
    name = readable(category) if category else None
    subject = words.category_subject.format(category=name) if name else words.generic_subject
    sentences = []
    unit = variant.answer_unit(cell)
    if unit == 1:
        extent = words.extent_in_pixels.format(width=width, height=height)
    else:
        extent = words.extent_in_cells.format(width=width // unit, height=height // unit, cell=unit)
    if variant.use_reference:
        sentences.append(words.reference_intro.format(subject=subject))
        sentences.append(words.query_after_reference.format(extent=extent))
    else:
        sentences.append(words.query_alone.format(subject=subject, extent=extent))
    if variant.domain_knowledge and name and knowledge is not None:
        sentences.extend(knowledge_sentences(name, knowledge, words))
    sentences.append(words.task)
    sentences.append(words.reasoning_instruction if variant.reasoning else words.direct_instruction)
    coordinates = words.coordinates_in_pixels if unit == 1 else words.coordinates_in_cells
    sentences.append(words.answer_format.replace("COORDINATES", coordinates))
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


def knowledge_sentences(name: str, knowledge: CategoryKnowledge, words: Wording) -> list[str]:
    """The category's description and its known anomaly types, each when there is one."""
    sentences = []
    if knowledge.description:
        sentences.append(
            words.category_description.format(category=name, description=knowledge.description)
        )
    types = anomaly_types(knowledge.defect_types)
    if types:
        sentences.append(words.domain_knowledge.format(category=name, types=", ".join(types)))
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
