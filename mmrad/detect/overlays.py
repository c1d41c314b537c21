"""Overlay PNGs: each inspected image with its predicted boxes drawn (Serve's
:func:`~mmrad.serve.overlay.draw_boxes`), at most ``overlay.max_side`` pixels on its
longest side, named after the image's path below the input.

Downscaled because a folder of 12-megapixel photos would otherwise give gigabytes of
PNGs and a contact sheet no browser scrolls; the boxes are scaled with the image, and
the table keeps them in the image's own pixels.

A name may be longer in bytes than the output's filesystem allows (``NAME_MAX``, 255
bytes on most) once ``.png`` and the atomic write's temp prefix and suffix are added:
80 CJK characters are 240 bytes, and an S3 key's parts may be longer still. Each part
over :data:`MAX_PART_BYTES` keeps a prefix and gains a hash of the whole part.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence

from PIL import Image

from mmrad.serve.overlay import draw_boxes

OVERLAY_FOLDER = "overlays"
MAX_PART_BYTES = 150
"""Longest path part kept as it is (UTF-8 bytes): with ``.png`` and the temp file's
``.`` + ``.XXXXXXXX.tmp`` a shortened part stays well under 255 bytes."""
HASH_CHARS = 16


def overlay_name(relative: str) -> str:
    """``overlays/<path below the input>.png``: the image's own name kept whole
    (``a.jpg`` and ``a.png`` in one folder get two overlays), its folders kept, each
    part shortened when too long (:func:`short_part`)."""
    parts = "/".join(short_part(part) for part in relative.split("/"))
    return f"{OVERLAY_FOLDER}/{parts}.png"


def short_part(part: str) -> str:
    """``part`` when at most :data:`MAX_PART_BYTES` long in UTF-8, else its longest
    prefix within that (whole characters) + ``~`` + a hash of the whole part. Unique:
    a shortened part is always longer than any part kept, and the hash tells apart two
    long names sharing the prefix; deterministic, so a rerun names the same overlay."""
    data = part.encode("utf-8", errors="surrogateescape")  # a local name's own bytes
    if len(data) <= MAX_PART_BYTES:
        return part
    prefix = data[:MAX_PART_BYTES].decode("utf-8", errors="ignore")
    return f"{prefix}~{hashlib.sha256(data).hexdigest()[:HASH_CHARS]}"


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
