"""Overlay PNGs: each inspected image with its predicted boxes drawn (Serve's
:func:`~mmrad.serve.overlay.draw_boxes`), at most ``overlay.max_side`` pixels on its
longest side, named after the image's path below the input.

Downscaled because a folder of 12-megapixel photos would otherwise give gigabytes of
PNGs and a contact sheet no browser scrolls; the boxes are scaled with the image, and
the table keeps them in the image's own pixels.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image

from mmrad.serve.overlay import draw_boxes

OVERLAY_FOLDER = "overlays"


def overlay_name(relative: str) -> str:
    """``overlays/<path below the input>.png``: the image's own name kept whole
    (``a.jpg`` and ``a.png`` in one folder get two overlays), its folders kept."""
    return f"{OVERLAY_FOLDER}/{relative}.png"


def overlay_png(
    data: bytes,
    boxes: Sequence[Sequence[float]],
    labels: Sequence[str],
    max_side: int | None,
) -> bytes:
    """The image in ``data`` with ``boxes`` (its own pixels) outlined and labelled, as
    PNG bytes, downscaled to ``max_side`` when larger."""
    with Image.open(io.BytesIO(data)) as opened:
        image = opened.convert("RGB")
    factor = 1.0
    if max_side and max(image.size) > max_side:
        factor = max_side / max(image.size)
        size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    scaled = [[float(value) * factor for value in box] for box in boxes]
    drawn = draw_boxes(image, scaled, list(labels))
    buffer = io.BytesIO()
    drawn.save(buffer, format="PNG")
    return buffer.getvalue()
