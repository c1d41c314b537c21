"""Images from untrusted clients: size limits, accepted formats, decoding.

The order matters. The byte size is checked first; then PIL reads only the header
(``Image.open`` is lazy) and the decoded size ``width x height`` is checked against
``max_pixels`` *before* any pixel is decoded, so a small file that claims a huge canvas
(a decompression bomb) costs nothing. PIL's own guard (``Image.MAX_IMAGE_PIXELS``,
``DecompressionBombError``) stays as a second line. Only then is the image decoded; a
truncated or corrupt file fails there with a 400 that says so.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from mmrad.serve.errors import ApiError

ACCEPTED_TYPES = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/bmp": "BMP",
    "image/tiff": "TIFF",
    "image/webp": "WEBP",
}
"""Content types taken, and the PIL format each must really be."""
ACCEPTED_FORMATS = frozenset(ACCEPTED_TYPES.values())
GENERIC_TYPES = frozenset({"application/octet-stream", ""})
"""Upload types that say nothing; the bytes decide (curl sends these for some files)."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int


@dataclass(frozen=True)
class EncodedImage:
    """An image as the client sent it, its cheap checks passed, not yet decoded."""

    field: str
    data: bytes
    content_type: str | None = None
    size: tuple[int, int] = (0, 0)
    """``(width, height)`` from the header."""

    def decode(self, limits: ImageLimits) -> Image.Image:
        return decode_image(self.data, self.field, limits, self.content_type)


def check_content_type(content_type: str | None, field: str) -> None:
    """415 unless ``content_type`` is an accepted image type (or says nothing)."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind in GENERIC_TYPES or kind in ACCEPTED_TYPES:
        return
    accepted = ", ".join(sorted(ACCEPTED_TYPES))
    raise ApiError(
        415, f"field {field!r}: content type {kind!r} is not an image ({accepted})", field
    )


def decode_image(
    data: bytes, field: str, limits: ImageLimits, content_type: str | None = None
) -> Image.Image:
    """An RGB image from untrusted bytes, or an :class:`ApiError` naming ``field``."""
    image = open_image(data, field, limits, content_type)
    try:
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ApiError(400, f"field {field!r}: corrupt or truncated image ({err})", field) from None


def open_image(
    data: bytes, field: str, limits: ImageLimits, content_type: str | None = None
) -> Image.Image:
    """Untrusted bytes opened as an image after every check that needs no decoding
    (type, byte size, format, pixel count from the header); pixels not yet decoded."""
    check_content_type(content_type, field)
    if not data:
        raise ApiError(400, f"field {field!r}: empty image", field)
    if len(data) > limits.max_bytes:
        raise ApiError(413, f"field {field!r}: {len(data)} bytes exceeds {limits.max_bytes}", field)
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as err:  # PIL's guard, for canvases beyond its limit
        raise ApiError(413, f"field {field!r}: exceeds the limit of {limits.max_pixels} "
                       f"decoded pixels ({err})", field) from None  # fmt: skip
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ApiError(400, f"field {field!r}: not an image (unrecognised bytes)", field) from None
    check_pixels(image.size, field, limits.max_pixels)
    if image.format not in ACCEPTED_FORMATS:
        accepted = ", ".join(sorted(ACCEPTED_FORMATS))
        raise ApiError(415, f"field {field!r}: {image.format} images are not accepted ({accepted})",
                       field)  # fmt: skip
    return image


def check_pixels(size: tuple[int, int], field: str, max_pixels: int) -> None:
    """413 when a ``(width, height)`` canvas holds more than ``max_pixels`` pixels."""
    width, height = size
    if width * height > max_pixels:
        raise ApiError(
            413,
            f"field {field!r}: {width}x{height} = {width * height} pixels exceeds the limit of "
            f"{max_pixels} decoded pixels",
            field,
        )


def decode_base64_image(text: str, field: str, limits: ImageLimits) -> Image.Image:
    """An image from base64 text or a ``data:image/...;base64,`` URI."""
    data, content_type = _base64_bytes(text, field, limits)
    return decode_image(data, field, limits, content_type)


def checked_image(
    data: bytes, field: str, limits: ImageLimits, content_type: str | None = None
) -> EncodedImage:
    """Untrusted bytes after :func:`open_image`'s checks, to be decoded later."""
    with open_image(data, field, limits, content_type) as image:
        return EncodedImage(field, data, content_type, image.size)


def checked_base64_image(text: str, field: str, limits: ImageLimits) -> EncodedImage:
    """Base64 text or a data URI after :func:`open_image`'s checks, not yet decoded."""
    data, content_type = _base64_bytes(text, field, limits)
    return checked_image(data, field, limits, content_type)


def _base64_bytes(text: str, field: str, limits: ImageLimits) -> tuple[bytes, str | None]:
    """The bytes of base64 text or a data URI, and the URI's content type."""
    content_type = None
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ApiError(400, f"field {field!r}: expected a data:<type>;base64,<data> URI", field)
        content_type = header[len("data:") : -len(";base64")]
        check_content_type(content_type, field)
    if len(text) * 3 // 4 > limits.max_bytes:
        raise ApiError(413, f"field {field!r}: more than {limits.max_bytes} bytes", field)
    try:
        return base64.b64decode(text, validate=True), content_type
    except (binascii.Error, ValueError):
        raise ApiError(400, f"field {field!r}: not valid base64", field) from None


def png_base64(image: Image.Image) -> str:
    """An image as base64 PNG text (what JSON responses carry)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
