"""Box and image-grid geometry: the one place that knows how pixels are counted.

Conventions (docs/architecture.md, "Records and boxes"):
- A box is ``[x1, y1, x2, y2]`` in pixel-edge coordinates: x2 and y2 are exclusive, so a
  mask component covering columns 10..19 has ``x1 = 10, x2 = 20`` and area
  ``(x2 - x1) * (y2 - y1)``.
- Records keep boxes in original pixels. The model sees the image resized to the *model
  grid*: Qwen2.5-VL's smart resize to the pixel budget, sides multiples of
  ``patch_size * merge_size`` (28). Answers carry boxes in that grid, rounded to integers,
  or (``prompt.box_units: cells``) in *cells*: the grid's ``factor``-pixel squares, one
  per merged vision token, each box written as the cells it overlaps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

Box = list[float]
Size = tuple[int, int]  # (width, height)

GRID_FACTOR = 28  # Qwen2.5-VL: patch 14 x spatial merge 2
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int,
    width: int,
    factor: int = GRID_FACTOR,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """Qwen2.5-VL's resize rule: ``(height, width)`` with both sides multiples of
    ``factor``, the area within ``[min_pixels, max_pixels]`` and the aspect ratio kept
    as closely as that allows."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"aspect ratio of {width}x{height} exceeds {MAX_ASPECT_RATIO}, "
            "which Qwen2.5-VL processors refuse"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def model_grid(
    size: Size,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    factor: int = GRID_FACTOR,
) -> Size:
    """The ``(width, height)`` the model sees for an image of ``size = (width, height)``."""
    width, height = size
    grid_h, grid_w = smart_resize(height, width, factor, min_pixels, max_pixels)
    return grid_w, grid_h


def grid_scale(size: Size, grid: Size) -> tuple[float, float]:
    """Factors ``(sx, sy)`` that take model-grid coordinates back to original pixels."""
    return size[0] / grid[0], size[1] / grid[1]


def to_model_grid(boxes: Sequence[Sequence[float]], size: Size, grid: Size) -> list[list[int]]:
    """Original-pixel boxes → integer model-grid boxes (as they appear in answers)."""
    sx, sy = grid_scale(size, grid)
    return [
        [round(x1 / sx), round(y1 / sy), round(x2 / sx), round(y2 / sy)] for x1, y1, x2, y2 in boxes
    ]


def from_model_grid(boxes: Sequence[Sequence[float]], size: Size, grid: Size) -> list[Box]:
    """Model-grid boxes → original-pixel float boxes."""
    sx, sy = grid_scale(size, grid)
    return [[x1 * sx, y1 * sy, x2 * sx, y2 * sy] for x1, y1, x2, y2 in boxes]


def answer_unit(box_units: str, factor: int = GRID_FACTOR) -> int:
    """Model-grid pixels per answer coordinate: 1 for ``pixels``, ``factor`` for ``cells``."""
    if box_units == "pixels":
        return 1
    if box_units == "cells":
        return factor
    raise ValueError(f"box units must be 'pixels' or 'cells', got {box_units!r}")


def to_answer_boxes(
    boxes: Sequence[Sequence[float]], size: Size, grid: Size, unit: int = 1
) -> list[list[int]]:
    """Original-pixel boxes as answers write them: model-grid pixels (``unit`` 1, rounded)
    or the cells of ``unit`` grid pixels each box overlaps (x2, y2 exclusive), so that a
    cell answer always covers its box."""
    if unit == 1:
        return to_model_grid(boxes, size, grid)
    sx, sy = grid_scale(size, grid)
    cells = []
    for x1, y1, x2, y2 in boxes:
        # rounded first: a box edge on a cell edge must not spill into the next cell
        gx1, gy1, gx2, gy2 = (round(v / (s * unit), 6) for v, s in
                              ((x1, sx), (y1, sy), (x2, sx), (y2, sy)))  # fmt: skip
        cells.append([math.floor(gx1), math.floor(gy1), math.ceil(gx2), math.ceil(gy2)])
    return cells


def defect_cells(
    boxes: Sequence[Sequence[float]], size: Size, grid: Size, factor: int = GRID_FACTOR
) -> np.ndarray:
    """``(rows, columns)`` float32 map of the grid's ``factor``-pixel cells: 1 where a box
    (original pixels) overlaps the cell, as a cell answer would write it."""
    cells = np.zeros((grid[1] // factor, grid[0] // factor), dtype=np.float32)
    for x1, y1, x2, y2 in to_answer_boxes(boxes, size, grid, factor):
        cells[y1:y2, x1:x2] = 1.0
    return cells


def answer_scale(size: Size, grid: Size, unit: int = 1) -> tuple[float, float]:
    """Factors ``(sx, sy)`` that take answer coordinates back to original pixels."""
    sx, sy = grid_scale(size, grid)
    return sx * unit, sy * unit


def box_area(box: Sequence[float]) -> float:
    x1, y1, x2, y2 = box
    return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes; 0 when either is empty."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """:func:`iou` of every box of ``a`` (n x 4) with every box of ``b`` (m x 4): n x m."""
    a, b = np.asarray(a, dtype=np.float64)[:, None, :], np.asarray(b, dtype=np.float64)[None]
    width = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    height = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = width * height

    def area(boxes: np.ndarray) -> np.ndarray:
        return np.clip(boxes[..., 2] - boxes[..., 0], 0, None) * np.clip(
            boxes[..., 3] - boxes[..., 1], 0, None
        )

    union = area(a) + area(b) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def clip_box(box: Sequence[float], size: Size) -> Box:
    width, height = size
    x1, y1, x2, y2 = box
    return [
        min(max(x1, 0.0), width),
        min(max(y1, 0.0), height),
        min(max(x2, 0.0), width),
        min(max(y2, 0.0), height),
    ]


def is_valid_box(box: Sequence[float], size: Size | None = None) -> bool:
    """``x1 < x2``, ``y1 < y2`` and, with a size, inside ``[0, width] x [0, height]``."""
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        return False
    x1, y1, x2, y2 = box
    if not (x1 < x2 and y1 < y2):
        return False
    if size is None:
        return True
    return x1 >= 0 and y1 >= 0 and x2 <= size[0] and y2 <= size[1]


def match_boxes(
    gt: Sequence[Sequence[float]], pred: Sequence[Sequence[float]], threshold: float
) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching by descending IoU.

    Ties are broken by lower gt index, then lower pred index; a pair is allowed only at
    ``IoU >= threshold`` (and, at threshold 0, only when the boxes overlap at all).
    Returns ``(gt_index, pred_index, iou)`` triples in the order they were chosen.
    """
    candidates = []
    for gi, g in enumerate(gt):
        for pi, p in enumerate(pred):
            overlap = iou(g, p)
            if overlap > 0 and overlap >= threshold:
                candidates.append((-overlap, gi, pi))
    candidates.sort()
    used_gt: set[int] = set()
    used_pred: set[int] = set()
    matches = []
    for neg_overlap, gi, pi in candidates:
        if gi in used_gt or pi in used_pred:
            continue
        used_gt.add(gi)
        used_pred.add(pi)
        matches.append((gi, pi, -neg_overlap))
    return matches


def mask_to_boxes(mask: np.ndarray) -> list[Box]:
    """One box per 8-connected component of the non-zero pixels, in row-major order of
    each component's first pixel."""
    from scipy import ndimage

    labelled, count = ndimage.label(np.asarray(mask) != 0, structure=np.ones((3, 3), dtype=int))
    boxes = []
    for rows_cols in ndimage.find_objects(labelled)[:count]:
        rows, cols = rows_cols
        boxes.append([float(cols.start), float(rows.start), float(cols.stop), float(rows.stop)])
    return boxes


def as_boxes(boxes: Iterable[Sequence[float]] | None) -> list[Box]:
    """Boxes as lists of 4 floats, whatever held them: lists, tuples, a numpy ``(N, 4)``
    array or an array of arrays (as pandas reads a manifest), or ``None`` for no boxes."""
    if boxes is None:
        return []
    return [[float(v) for v in box] for box in boxes]
