"""The Serve edge's pieces that need no running app: JSON nesting checked before parsing,
500s as JSON, and image decodes held to their slots and shrunk before a slot is freed.
The same pieces against a running app: ``tests/serve/test_replica_edges.py``."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from PIL import Image

from mmrad.config import PixelBudget
from mmrad.engine.requests import grid_for, to_grid_image
from mmrad.serve.api import MAX_JSON_DEPTH, json_depth, parse_json
from mmrad.serve.decoding import (
    PREVIEW_MAX_SIDE,
    DecodeSlots,
    decode_for_model,
    grid_png_uri,
    preview_size,
)
from mmrad.serve.errors import ApiError, JSONServerErrors
from mmrad.serve.images import EncodedImage, ImageLimits
from mmrad.serve.overlay import BOX_COLOUR, draw_on_preview

PIXELS = PixelBudget(min_pixels=28 * 28, max_pixels=224 * 224)
LIMITS = ImageLimits(max_bytes=2**24, max_pixels=8_000_000)


def encoded(image: Image.Image, field: str = "image") -> EncodedImage:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return EncodedImage(field, buffer.getvalue(), "image/png")


def gradient(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=2)
    return Image.fromarray(rgb.astype(np.uint8))


# -- JSON nesting ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        {},
        [],
        "just a string",
        {"a": "[[[[{{{{"},
        {"a": 'quote \\" and [ inside', "b": [[{"c": ["\\\\"]}]]},
        {"messages": [{"content": [{"image_url": {"url": "data:,"}}]}]},
        [[[[[[[[1]]]]]]]],
        {"deep": json.loads("[" * 20 + "]" * 20)},
    ],
)
def test_json_depth_is_the_parsed_values_depth(value):
    def depth(item) -> int:
        if isinstance(item, dict):
            return 1 + max((depth(v) for v in item.values()), default=0)
        if isinstance(item, list):
            return 1 + max((depth(v) for v in item), default=0)
        return 0

    assert json_depth(json.dumps(value).encode()) == depth(value)


def test_deep_bodies_are_refused_before_parsing_and_the_limit_itself_passes():
    assert parse_json(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH) is not None
    for body in (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), b"[" * 200_000):
        with pytest.raises(ApiError) as caught:
            parse_json(body)
        assert caught.value.status == 400 and "levels deep" in caught.value.message
    with pytest.raises(ApiError, match="not valid JSON"):
        parse_json(b'{"a": [}')


# -- 500s as JSON ------------------------------------------------------------------------


def failing_app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(JSONServerErrors)

    @app.get("/fails")
    async def fails():
        raise RuntimeError("secret detail")

    @app.get("/ok")
    async def ok():
        return {"ok": True}

    @app.get("/stream-fails")
    async def stream_fails():
        async def events():
            yield b"data: 1\n\n"
            raise RuntimeError("mid-stream")

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def test_an_unhandled_error_is_a_json_500_without_its_message():
    async def run() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=failing_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/fails"), await client.get("/ok")

    failed, ok = asyncio.run(run())
    assert failed.status_code == 500
    expected = {"message": "internal server error (RuntimeError)", "type": "server_error",
                "param": None, "code": 500}  # fmt: skip
    assert failed.json()["error"] == expected
    assert "secret" not in failed.text
    assert ok.status_code == 200 and ok.json() == {"ok": True}


def test_an_error_after_a_stream_started_is_not_answered_twice():
    async def run() -> None:
        transport = httpx.ASGITransport(app=failing_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await client.get("/stream-fails")

    with pytest.raises(RuntimeError, match="mid-stream"):
        asyncio.run(run())


# -- decode slots ------------------------------------------------------------------------


def test_decodes_never_exceed_their_slots():
    lock, running, peak = threading.Lock(), [0], [0]

    def decode(seconds: float) -> float:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(seconds)
        with lock:
            running[0] -= 1
        return seconds

    async def run() -> list[float]:
        slots = DecodeSlots(2)
        return await asyncio.gather(*(slots.run(decode, 0.02) for _ in range(12)))

    assert asyncio.run(run()) == [0.02] * 12
    assert peak[0] == 2


def test_a_cancelled_decode_keeps_its_slot_until_its_thread_ends():
    release, second_started = threading.Event(), threading.Event()

    async def run() -> None:
        slots = DecodeSlots(1)
        first = asyncio.create_task(slots.run(release.wait))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(slots.run(second_started.set))
        first.cancel()
        await asyncio.sleep(0.2)
        assert not second_started.is_set()  # the first thread still runs in its slot
        release.set()
        await second
        assert second_started.is_set()
        with pytest.raises(asyncio.CancelledError):
            await first

    asyncio.run(run())


# -- decoded images ----------------------------------------------------------------------


def test_a_decode_keeps_the_grid_image_the_size_and_a_bounded_preview():
    photo = gradient(3000, 2000)
    decoded = decode_for_model(encoded(photo), LIMITS, PIXELS, preview=True)
    assert decoded.size == (3000, 2000)
    assert decoded.on_grid.size == grid_for((3000, 2000), PIXELS)
    assert np.array_equal(np.asarray(decoded.on_grid), np.asarray(to_grid_image(photo, PIXELS)))
    assert decoded.preview.size == preview_size((3000, 2000)) == (PREVIEW_MAX_SIDE, 683)
    assert decode_for_model(encoded(photo), LIMITS, PIXELS).preview is None
    small = gradient(200, 100)
    assert decode_for_model(encoded(small), LIMITS, PIXELS, preview=True).preview.size == (200, 100)


def test_a_chat_image_reaches_vllm_as_its_grid_pixels():
    photo = gradient(1200, 900)
    uri = grid_png_uri(encoded(photo), LIMITS, PIXELS)
    assert uri.startswith("data:image/png;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert sent.size == grid_for((1200, 900), PIXELS)
    assert np.array_equal(np.asarray(sent), np.asarray(to_grid_image(photo, PIXELS)))


def test_overlay_boxes_are_scaled_to_the_preview():
    preview = Image.new("RGB", (1000, 500))
    drawn = np.asarray(draw_on_preview(preview, (4000, 2000), [[400, 200, 2000, 1000]], [""]))
    red = np.all(drawn == BOX_COLOUR, axis=2)
    ys, xs = np.nonzero(red)
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == (100, 50, 499, 249)


def test_a_checked_image_knows_its_size_and_whether_it_needs_a_grid_copy():
    from mmrad.engine.requests import on_grid
    from mmrad.serve.images import checked_base64_image

    for size in [(3000, 2000), grid_for((3000, 2000), PIXELS)]:
        data = encoded(gradient(*size)).data
        uri = "data:image/png;base64," + base64.b64encode(data).decode()
        image = checked_base64_image(uri, "messages.0.content.0", LIMITS)
        assert image.size == size and image.data == data
        assert on_grid(size, PIXELS) == (size == grid_for(size, PIXELS))
