"""Decoding client images within a configured memory budget.

A decoded image costs up to :data:`DECODED_BYTES_PER_PIXEL` bytes per pixel (PIL holds
RGB as 4 bytes a pixel, and converting another mode briefly holds both copies). Every
decode runs in one of ``max_concurrent_decodes`` slots per replica, and the decoded image
is shrunk to its model grid (and to an overlay preview, when one was asked for) before
the slot is freed, so full-size pixels never outlive their slot. Peak decode memory per
replica is therefore :func:`decode_budget_bytes`, however many requests are in flight.
A chat image already on its model grid (what mmrad's own clients send) skips all this:
vLLM decodes it as sent, and the model's pixel budget bounds it.
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from PIL import Image

from mmrad.config import PixelBudget
from mmrad.engine.requests import to_grid_image
from mmrad.serve.images import EncodedImage, ImageLimits

DECODED_BYTES_PER_PIXEL = 8
PREVIEW_MAX_SIDE = 1024
"""The longer side of a ``/v1/detect`` overlay at most (a 40 MP overlay as base64 JSON
would help nobody)."""

Result = TypeVar("Result")


def decode_budget_bytes(max_pixels: int, slots: int) -> int:
    """Peak memory of a replica's image decodes: ``slots`` images of ``max_pixels`` each."""
    return slots * max_pixels * DECODED_BYTES_PER_PIXEL


@dataclass(frozen=True)
class DecodedImage:
    """A client image after decoding: on its model grid, its original ``(width, height)``,
    and a preview of at most :data:`PREVIEW_MAX_SIDE` pixels a side when asked for."""

    on_grid: Image.Image
    size: tuple[int, int]
    preview: Image.Image | None = None


def decode_for_model(
    image: EncodedImage, limits: ImageLimits, pixels: PixelBudget, preview: bool = False
) -> DecodedImage:
    """``image`` decoded, then kept only on its model grid (and as a preview if asked)."""
    full = image.decode(limits)
    small = full.resize(preview_size(full.size), Image.Resampling.BILINEAR) if preview else None
    return DecodedImage(to_grid_image(full, pixels), full.size, small)


def preview_size(size: tuple[int, int]) -> tuple[int, int]:
    """``size`` scaled down to at most :data:`PREVIEW_MAX_SIDE` on its longer side."""
    scale = min(1.0, PREVIEW_MAX_SIDE / max(size))
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def grid_png_uri(image: EncodedImage, limits: ImageLimits, pixels: PixelBudget) -> str:
    """A chat image re-encoded as a PNG data URI on its model grid: vLLM then decodes a
    small image (and sees exactly the pixels ``/v1/detect`` would give the model)."""
    buffer = io.BytesIO()
    decode_for_model(image, limits, pixels).on_grid.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class DecodeSlots:
    """At most ``slots`` decodes at once, each in a worker thread."""

    def __init__(self, slots: int):
        self._semaphore = asyncio.Semaphore(slots)

    async def run(self, decode: Callable[..., Result], *args: Any) -> Result:
        async with self._semaphore:
            work = asyncio.ensure_future(asyncio.to_thread(decode, *args))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                # A thread cannot be stopped: its slot stays taken until it ends, or the
                # budget would not hold for a client that hangs up mid-decode.
                await asyncio.wait([work])
                raise
