"""``/v1/detect``: the request (multipart upload or base64 JSON) and the response.

Bodies are read here, not by FastAPI's form/JSON parameters, so that the byte limit and
the bearer token are checked before anything is parsed, and every problem comes back as
a JSON error naming the field (see :mod:`mmrad.serve.errors`).

Multipart fields: ``image`` (file, required), ``reference`` (file), ``category``,
``threshold``, ``overlay``, ``model`` (an adapter's name; default the base model). JSON:
the same keys, images as base64 or ``data:image/...;base64,`` URIs. ``category``,
``threshold``, ``overlay`` and ``model`` may also be query parameters (the body wins).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mmrad.serve.errors import ApiError, validation_error
from mmrad.serve.images import EncodedImage, ImageLimits, checked_base64_image, checked_image

JSON_TYPE = "application/json"
MULTIPART_TYPE = "multipart/form-data"
IMAGE_FIELDS = ("image", "reference")
MAX_FORM_FIELDS = 16
MAX_JSON_DEPTH = 64
"""Deeper bodies are refused before parsing (a chat request nests 5 levels; a JSON
schema in ``response_format`` some more)."""


class DetectOptions(BaseModel):
    """What a detection request may set besides its images."""

    model_config = ConfigDict(extra="forbid")

    category: str | None = Field(None, max_length=200, description="Product category.")
    threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="anomalous = score >= threshold (else the answer)."
    )
    overlay: bool = Field(False, description="Also return a PNG with the boxes drawn.")
    model: str | None = Field(
        None,
        max_length=200,
        description="Adapter (production line) to answer with; default: the base model.",
    )


class DetectJSON(DetectOptions):
    image: str = Field(description="Query image: base64 or a data:image/...;base64, URI.")
    reference: str | None = Field(None, description="Normal reference image, same encoding.")


class DetectResponse(BaseModel):
    anomalous: bool | None = Field(description="None: the answer had no Yes/No and no score.")
    score: float | None = Field(description="P(Yes) at the answer's first token.")
    boxes: list[list[float]] = Field(description="[x1, y1, x2, y2] in the query's pixels.")
    labels: list[str]
    reasoning: str | None
    format_ok: bool = Field(description="The answer followed the task format.")
    threshold: float | None = Field(description="The threshold applied, if any.")
    completion: str = Field(description="The model's raw answer.")
    width: int
    height: int
    model: str
    latency_ms: float
    overlay_png: str | None = Field(None, description="Base64 PNG (overlay=true).")


@dataclass(frozen=True)
class DetectInput:
    """A detection request, its images checked but not decoded (see
    :mod:`mmrad.serve.decoding`)."""

    image: EncodedImage
    reference: EncodedImage | None
    options: DetectOptions


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (the
    declared Content-Length first, then what actually arrives)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def json_depth(body: bytes) -> int:
    """How deep ``body``'s arrays and objects nest, counted without parsing it: escape
    pairs and then strings are dropped, and the brackets left are summed up, all in C
    (a base64 image is one long string, so a 20 MB body leaves almost nothing to sum)."""
    structure = _STRING.sub(b"", _ESCAPE_PAIR.sub(b"", body)).translate(None, _NOT_BRACKET)
    steps = np.frombuffer(structure, dtype=np.uint8)
    if steps.size == 0:
        return 0
    return int(np.cumsum(np.where(np.isin(steps, _OPENING), 1, -1)).max())


_ESCAPE_PAIR = re.compile(rb"\\.", re.DOTALL)
_STRING = re.compile(rb'"[^"]*"')
_OPENING = np.frombuffer(b"[{", dtype=np.uint8)
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))


def parse_json(body: bytes) -> Any:
    """A JSON body, or a 400 naming the position of a syntax error or the nesting depth
    beyond :data:`MAX_JSON_DEPTH` (checked first: deep nesting exhausts the parser's stack)."""
    depth = json_depth(body)
    if depth > MAX_JSON_DEPTH:
        raise ApiError(400, f"request body nests arrays and objects {depth} levels deep; "
                       f"the limit is {MAX_JSON_DEPTH}")  # fmt: skip
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"request body is not valid JSON: {err}") from None


async def parse_detect(
    content_type: str | None,
    headers: Mapping[str, str],
    body: bytes,
    query: Mapping[str, str],
    limits: ImageLimits,
) -> DetectInput:
    """A detection request from its body (multipart or JSON) and query parameters.
    Parsing runs in a worker thread, so a large body does not stall other requests."""
    kind = media_type(content_type)
    if kind == JSON_TYPE:
        return await asyncio.to_thread(_detect_from_json, body, query, limits)
    if kind == MULTIPART_TYPE:
        return await _detect_from_form(headers, body, query, limits)
    raise ApiError(415, f"content type {kind or '(none)'!r}: send {MULTIPART_TYPE} or {JSON_TYPE}")


def _detect_from_json(body: bytes, query: Mapping[str, str], limits: ImageLimits) -> DetectInput:
    data = parse_json(body)
    if not isinstance(data, dict):
        raise ApiError(422, "request body must be a JSON object")
    try:
        request = DetectJSON.model_validate({**query, **data})
    except ValidationError as err:
        raise validation_error(err) from None
    image = checked_base64_image(request.image, "image", limits)
    reference = (
        checked_base64_image(request.reference, "reference", limits) if request.reference else None
    )
    options = DetectOptions.model_validate(request.model_dump(exclude=set(IMAGE_FIELDS)))
    return DetectInput(image, reference, options)


async def _detect_from_form(
    headers: Mapping[str, str], body: bytes, query: Mapping[str, str], limits: ImageLimits
) -> DetectInput:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body

    parser = MultiPartParser(headers, stream(), max_files=len(IMAGE_FIELDS),
                             max_fields=MAX_FORM_FIELDS)  # fmt: skip
    try:
        form = await parser.parse()
    except MultiPartException as err:
        raise ApiError(400, f"malformed multipart body: {err.message}") from None
    try:
        files, fields = {}, dict(query)
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key not in IMAGE_FIELDS:
                    raise ApiError(422, f"field {key!r}: unexpected file (send image, reference)",
                                   key)  # fmt: skip
                files[key] = (await value.read(), value.content_type)
            else:
                fields[key] = value
        if "image" not in files:
            raise ApiError(422, "field 'image': a file upload is required", "image")
        try:
            options = DetectOptions.model_validate(fields)
        except ValidationError as err:
            raise validation_error(err) from None
        images = await asyncio.to_thread(_check_files, files, limits)
        return DetectInput(images["image"], images.get("reference"), options)
    finally:
        await form.close()


def _check_files(
    files: Mapping[str, tuple[bytes, str | None]], limits: ImageLimits
) -> dict[str, EncodedImage]:
    return {key: checked_image(data, key, limits, kind) for key, (data, kind) in files.items()}
