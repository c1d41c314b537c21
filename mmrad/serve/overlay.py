"""The query image with the predicted boxes drawn, for people looking at a detection."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

BOX_COLOUR = (255, 40, 40)
TEXT_COLOUR = (255, 255, 255)


def line_width(size: tuple[int, int]) -> int:
    """About 0.5 % of the shorter side, at least 2 pixels: visible on any image size."""
    return max(2, round(min(size) / 200))


def draw_boxes(
    image: Image.Image, boxes: Sequence[Sequence[float]], labels: Sequence[str]
) -> Image.Image:
    """A copy of ``image`` with each box (``[x1, y1, x2, y2]``, original pixels, x2/y2
    exclusive) outlined and its label written above it (inside when at the top edge)."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = line_width(out.size)
    for box, label in zip(boxes, labels, strict=True):
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=BOX_COLOUR, width=width)
        if label:
            left, top, right, bottom = draw.textbbox((0, 0), label)
            text_y = y1 - (bottom - top) - 2 * width
            text_y = text_y if text_y >= 0 else y1 + width
            draw.rectangle(
                [x1, text_y, x1 + (right - left) + 2 * width, text_y + (bottom - top) + width],
                fill=BOX_COLOUR,
            )
            draw.text((x1 + width, text_y), label, fill=TEXT_COLOUR)
    return out


def draw_on_preview(
    preview: Image.Image,
    size: tuple[int, int],
    boxes: Sequence[Sequence[float]],
    labels: Sequence[str],
) -> Image.Image:
    """:func:`draw_boxes` on a smaller ``preview`` of an image of ``size``, the boxes
    (in that image's pixels) scaled to it."""
    scale_x, scale_y = preview.width / size[0], preview.height / size[1]
    scaled = [[x1 * scale_x, y1 * scale_y, x2 * scale_x, y2 * scale_y]
              for x1, y1, x2, y2 in boxes]  # fmt: skip
    return draw_boxes(preview, scaled, labels)
