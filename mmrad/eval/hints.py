"""Hinted inputs for a teacher model: MMR-AD's way of getting reasoning that fits the truth.

The teacher sees what the student will see (a normal reference image and the query, on
the model grid) plus the ground truth: every defect box drawn in red on the query, and a
text hint naming each defect as ``([x1, y1, x2, y2], 'label')`` in model-grid pixels,
with the category and defect type. Normal images get a hint that the part is defect-free.
The hint asks for reasoning written as if the teacher had found the defects itself, and
for the answer in the task format; :mod:`mmrad.eval.consistency` then throws away what
does not agree with the truth or gives the hint away.

The hint goes last in the ordinary inspection prompt (``InspectionInput.hint``), so the
teacher is asked exactly what the student will be asked, plus the hint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mmrad.engine.requests import InspectionInput
from mmrad.task.geometry import Size, as_boxes, to_model_grid
from mmrad.task.prompt import readable

HINT_COLOUR = (255, 0, 0)
OUTLINE_PER_PIXELS = 160
"""One pixel of outline per this many pixels of the grid's longer side (at least 2), so
the red boxes are as visible on a 112 px grid as on a 1,000 px one."""

HINT_ANOMALOUS = (
    "Annotation hint, for you only: this {category} sample is anomalous; its defect type "
    "is {defect_type}. Each defect is outlined in red in the query image, as "
    "([x1, y1, x2, y2], 'label') in pixels of the query image: {items}."
)
HINT_NORMAL = (
    "Annotation hint, for you only: this {category} sample is normal and defect-free; "
    "nothing is outlined in the query image."
)
HINT_INSTRUCTION = (
    "Write the reasoning as an inspector who found this by comparing the query image "
    "with the reference: describe what differs or matches, and where, in words. Never "
    "mention the hint, the red outlines, boxes or any coordinates in the reasoning. "
    "Then give the final answer in the required format{answer}"
)
ANSWER_ANOMALOUS = ", with exactly these boxes and labels."
ANSWER_NORMAL = ': "No."'


def hint_items(boxes: Sequence[Sequence[int]], labels: Sequence[str]) -> str:
    """``([x1, y1, x2, y2], 'label')`` per defect, comma-separated."""
    return ", ".join(
        f"([{', '.join(str(int(v)) for v in box)}], {str(label)!r})"
        for box, label in zip(boxes, labels, strict=True)
    )


def hint_text(
    *,
    category: str,
    is_anomalous: bool,
    defect_type: str,
    grid_boxes: Sequence[Sequence[int]],
    labels: Sequence[str],
) -> str:
    """The hint appended to the inspection prompt; ``grid_boxes`` in model-grid pixels."""
    name = readable(category) or "industrial product"
    if is_anomalous:
        facts = HINT_ANOMALOUS.format(
            category=name,
            defect_type=readable(defect_type),
            items=hint_items(grid_boxes, labels),
        )
        answer = ANSWER_ANOMALOUS
    else:
        facts, answer = HINT_NORMAL.format(category=name), ANSWER_NORMAL
    return f"{facts} {HINT_INSTRUCTION.format(answer=answer)}"


def outline_width(grid: Size) -> int:
    """The red outline's width in pixels for a grid of ``(width, height)``."""
    return max(2, round(max(grid) / OUTLINE_PER_PIXELS))


def draw_boxes(image: Image.Image | np.ndarray, boxes: Sequence[Sequence[int]]) -> Image.Image:
    """A copy of ``image`` with each box outlined in red, inside the box's own pixels
    (``x2``, ``y2`` are exclusive, so the outline's outer edge is the box's edge)."""
    pil = Image.fromarray(np.asarray(image)) if isinstance(image, np.ndarray) else image
    out = pil.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = outline_width(out.size)
    for x1, y1, x2, y2 in boxes:
        right, bottom = max(x1, x2 - 1), max(y1, y2 - 1)
        draw.rectangle((x1, y1, right, bottom), outline=HINT_COLOUR, width=width)
    return out


def record_grid_boxes(row: Mapping[str, Any], grid: Size) -> list[list[int]]:
    """The record's boxes (original pixels) on the model ``grid``, as the answer has them."""
    size = (int(row["width"]), int(row["height"]))
    return to_model_grid(as_boxes(row["boxes"]), size, grid)


def row_labels(row: Mapping[str, Any]) -> list[str]:
    labels = row.get("labels")
    return [] if labels is None else [str(label) for label in labels]


def hinted_input(row: Mapping[str, Any]) -> InspectionInput:
    """The evaluation core's ``to_input`` hook for annotation: a decoded row (record
    fields plus ``image``/``reference`` on the model grid) → the teacher's inspection,
    with the ground truth drawn on the query and stated in the hint."""
    image = np.asarray(row["image"])
    grid = (int(image.shape[1]), int(image.shape[0]))
    boxes = record_grid_boxes(row, grid)
    reference = row.get("reference")
    has_reference = reference is not None and np.asarray(reference).size > 0
    hint = hint_text(
        category=str(row["category"]),
        is_anomalous=bool(row["is_anomalous"]),
        defect_type=str(row["defect_type"]),
        grid_boxes=boxes,
        labels=row_labels(row),
    )
    return InspectionInput(
        image=draw_boxes(image, boxes),
        reference=np.asarray(reference) if has_reference else None,
        category=str(row["category"]),
        hint=hint,
    )
