"""The Serve application, driven over real HTTP: the ``openai`` client for chat
completions, plain HTTP for /v1/detect, every refused request, autoscaling; plus the
config file and the edge checks on their own (fast)."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib
from dataclasses import asdict
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from mmrad.config import ConfigError
from mmrad.engine.requests import grid_for, to_grid_image
from mmrad.engine.sampling import answer_score
from mmrad.serve.config import (
    DEPLOYMENT_NAME,
    ServeArgs,
    application,
    load_serve_file,
    serve_config,
    validate_serve_config,
)
from mmrad.serve.detect import decide
from mmrad.serve.errors import ApiError
from mmrad.serve.images import ImageLimits, decode_base64_image, decode_image
from mmrad.serve.overlay import BOX_COLOUR, draw_boxes
from mmrad.task.answer import parse_answer
from mmrad.task.prompt import IMAGE_PLACEHOLDER, build_messages

LIMITS = ImageLimits(max_bytes=2 * 2**20, max_pixels=4_000_000)


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width x height`` pixels, a few hundred bytes long:
    decoding it would need gigabytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 4096)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def data_uri(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode("ascii")


# -- config file (fast) -------------------------------------------------------------------


def test_config_files_validate_and_overrides_enter_lists_by_name():
    local = load_serve_file("configs/local/serve.yaml")
    assert local.apps["mmrad"].model_dir == "runs/pipeline/latest/grpo/export"
    assert local.app_urls() == {"mmrad": "http://127.0.0.1:8000"}
    cluster = load_serve_file("configs/cluster/serve.yaml")
    assert cluster.apps["mmrad"].model_dir.startswith("s3://")
    assert cluster.config["applications"][0]["deployments"][0]["ray_actor_options"]["num_gpus"] == 1
    changed = load_serve_file(
        "configs/local/serve.yaml",
        [
            "applications.mmrad.args.threshold=0.4",
            f"applications.0.deployments.{DEPLOYMENT_NAME}.autoscaling_config.max_replicas=3",
        ],
    )
    assert changed.apps["mmrad"].threshold == 0.4
    assert (
        changed.config["applications"][0]["deployments"][0]["autoscaling_config"]["max_replicas"]
        == 3
    )


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("applications.mmrad.args.engin.x=1", "key 'engin': unknown key"),
        ("applications.mmrad.args.threshold=2", "key 'threshold'"),
        ("applications.mmrad.args.auth_token=abc", "not both"),
        (
            f"applications.mmrad.deployments.{DEPLOYMENT_NAME}.autoscaling_config.max_replicas=0",
            "autoscaling_config.max_replicas",
        ),
        ("applications.mmrad.deployments.0.name=Other", "unknown deployment 'Other'"),
        ("applications.mmrad.route_prefix=[1]", "route_prefix"),
        ("applications.nope.args.x=1", "no item 'nope'"),
        (
            "applications.mmrad.deployments.MMRADServer.autoscaling_confg.x=1",
            "did you mean 'autoscaling_config'",
        ),
        ("http_option.port=1", "key 'http_option': unknown key"),
        ("applications.mmrad.args.pixels.max_pixels=1000", "args.pixels moved: write args.prompt"),
    ],
)
def test_config_errors_name_the_file_and_key(tmp_path, override, expected):
    path = tmp_path / "serve.yaml"
    text = Path("configs/local/serve.yaml").read_text()
    path.write_text(text.replace("auth_token_env: null", "auth_token_env: TOKEN"))
    with pytest.raises(ConfigError) as err:
        load_serve_file(path, [override])
    assert str(path) in str(err.value) and expected in str(err.value)


def test_secrets_never_appear_in_dumps_or_reprs():
    args = ServeArgs(model_dir="/m", auth_token="s3cr3t-value")
    assert "s3cr3t-value" not in repr(args)
    assert "s3cr3t-value" not in str(args.model_dump(mode="json"))


# -- edge checks (fast) -------------------------------------------------------------------


def expect_api_error(status: int, words: str, call, *args):
    with pytest.raises(ApiError) as err:
        call(*args)
    assert err.value.status == status and words in err.value.message, err.value.message


def test_image_checks_refuse_before_decoding():
    good = png_bytes(noise_image(30, 20))
    assert decode_image(good, "image", LIMITS, "image/png").size == (30, 20)
    assert decode_base64_image(data_uri(good), "image", LIMITS).size == (30, 20)
    bomb = bomb_png(3000, 3000)  # over our limit (4e6), under PIL's (8.9e7)
    assert len(bomb) < 1000
    expect_api_error(413, "9000000 pixels exceeds the limit of 4000000 decoded pixels",
                     decode_image, bomb, "image", LIMITS)  # fmt: skip
    huge = bomb_png(50_000, 50_000)  # over PIL's limit too: its guard fires in open()
    expect_api_error(413, "limit of 4000000 decoded pixels", decode_image, huge, "image", LIMITS)
    expect_api_error(413, "exceeds", decode_image, good, "image", ImageLimits(100, 10**6))
    expect_api_error(415, "text/plain", decode_image, good, "image", LIMITS, "text/plain")
    expect_api_error(400, "not an image", decode_image, b"hello world", "image", LIMITS)
    expect_api_error(
        400, "corrupt or truncated", decode_image, good[: len(good) // 2], "image", LIMITS
    )
    jpeg = png_bytes(noise_image(30, 20), "JPEG")
    assert decode_image(jpeg, "image", LIMITS, "image/jpeg").size == (30, 20)
    gif = png_bytes(noise_image(8, 8).convert("P"), "GIF")
    expect_api_error(415, "GIF images are not accepted", decode_image, gif, "image", LIMITS)
    expect_api_error(400, "not valid base64", decode_base64_image, "@@@", "image", LIMITS)
    expect_api_error(
        415, "text/html", decode_base64_image, data_uri(good, "text/html"), "x", LIMITS
    )


def test_openai_requests_are_checked_in_front_of_vllm():
    from mmrad.serve.openai_api import (
        check_chat_images,
        check_request_fields,
        with_default_max_tokens,
    )
    from mmrad.serve.vllm_api import ChatCompletionRequest, CompletionRequest

    supported = {"model": "m", "messages": [], "response_format": {"type": "json_object"},
                 "presence_penalty": 1.0, "max_completion_tokens": 3}  # fmt: skip
    check_request_fields(supported, ChatCompletionRequest)
    check_request_fields({"model": "m", "prompt": "x", "echo": True}, CompletionRequest)
    expect_api_error(400, "'colour'", check_request_fields, {**supported, "colour": 1},
                     ChatCompletionRequest)  # fmt: skip
    expect_api_error(400, "'messages'", check_request_fields, {"model": "m", "messages": []},
                     CompletionRequest)  # fmt: skip
    assert with_default_max_tokens({"model": "m"}, 64)["max_tokens"] == 64
    assert "max_tokens" not in with_default_max_tokens({"max_completion_tokens": 5}, 64)

    good = data_uri(png_bytes(noise_image(30, 20)))
    bomb = data_uri(bomb_png(3000, 3000))

    def chat_with(*parts):
        return {"messages": [{"role": "user", "content": list(parts)}]}

    def image(url):
        return {"type": "image_url", "image_url": {"url": url}}

    check_chat_images(chat_with(image(good), {"type": "text", "text": "hi"}), LIMITS, 2)
    expect_api_error(413, "decoded pixels", check_chat_images, chat_with(image(bomb)), LIMITS, 2)
    expect_api_error(400, "only data: URIs", check_chat_images,
                     chat_with(image("file:///etc/passwd")), LIMITS, 2)  # fmt: skip
    expect_api_error(400, "more than 1 images", check_chat_images,
                     chat_with(image(good), image(good)), LIMITS, 1)  # fmt: skip
    video = {"type": "video_url", "video_url": {"url": good}}
    expect_api_error(400, "'video_url' parts", check_chat_images, chat_with(video), LIMITS, 2)


def test_admission_holds_sequences_until_answers_and_streams_end():
    import asyncio

    from mmrad.serve.admission import Admission

    admission = Admission(capacity=3)
    with admission.admit(2):
        expect_api_error(503, "limit 3", admission.admit, 2)
        with admission.admit(1):
            assert admission.held == 3
    assert admission.held == 0

    async def events():
        yield "a"
        yield "b"

    async def drain(stream):
        return [event async for event in stream]

    with admission.admit(3) as ticket:
        stream = ticket.keep_for(events())
    assert admission.held == 3  # handed to the stream: held until it ends
    assert asyncio.run(drain(stream)) == ["a", "b"] and admission.held == 0
    with pytest.raises(RuntimeError), admission.admit(3) as ticket:
        ticket.keep_for(events())
        raise RuntimeError("the response never started")
    assert admission.held == 0
    assert Admission(capacity=None).admit(10**6)


def test_adapter_names_are_checked_and_never_the_base_models():
    args = ServeArgs(model_dir="/m", model_name="base", adapters={"line-1": "s3://b/a"})
    assert args.adapters == {"line-1": "s3://b/a"}
    for adapters, words in [({"base": "/a"}, "base model's name"), ({"a b": "/a"}, "'a b'"),
                            ({"line": ""}, "empty folder")]:  # fmt: skip
        with pytest.raises(ValueError, match=words):
            ServeArgs(model_dir="/m", model_name="base", adapters=adapters)


def test_overlay_outlines_boxes_and_leaves_the_rest():
    image = Image.new("RGB", (100, 80), (10, 200, 10))
    drawn = np.asarray(draw_boxes(image, [[20, 30, 60, 70]], [""]))
    assert tuple(drawn[50, 20]) == BOX_COLOUR and tuple(drawn[69, 40]) == BOX_COLOUR
    assert tuple(drawn[50, 40]) == (10, 200, 10) and tuple(drawn[5, 90]) == (10, 200, 10)
    assert np.asarray(image).sum() == 100 * 80 * 220  # the input is not drawn on


def test_threshold_rule():
    assert decide(True, 0.2, None) is True  # no threshold: the answer decides
    assert decide(True, 0.2, 0.5) is False and decide(False, 0.7, 0.5) is True
    assert decide(None, None, 0.5) is None and decide(False, None, 0.5) is False


# -- the running application (integration) ------------------------------------------------


def auth(endpoint) -> dict[str, str]:
    return {"Authorization": f"Bearer {endpoint.api_key}"}


def chat_messages_for(case) -> list[dict]:
    """The inspection prompt as an OpenAI client sends it: the same text the engine
    builds, images on the model grid as PNG data URIs."""
    pixels = case["pixels"]
    grid = grid_for(case["image"].size, pixels)
    [message] = build_messages(
        category=case["category"],
        grid_size=grid,
        variant=case["variant"],
        query_image=IMAGE_PLACEHOLDER,
        reference_image=IMAGE_PLACEHOLDER,
    )
    images = iter(
        [case["reference"], case["image"]] if case["variant"].use_reference else [case["image"]]
    )
    content = []
    for part in message["content"]:
        if part["type"] == "image":
            uri = data_uri(png_bytes(to_grid_image(next(images), pixels)))
            content.append({"type": "image_url", "image_url": {"url": uri}})
        else:
            content.append({"type": "text", "text": part["text"]})
    return [{"role": "user", "content": content}]


def detect_json(endpoint, case, **fields) -> httpx.Response:
    body = {
        "image": base64.b64encode(png_bytes(case["image"])).decode(),
        "reference": data_uri(png_bytes(case["reference"])),
        "category": case["category"],
        **fields,
    }
    return httpx.post(
        f"{endpoint.base_url}/v1/detect", json=body, headers=auth(endpoint), timeout=300
    )


@pytest.mark.integration
def test_detect_multipart_base64_threshold_and_overlay(serve_endpoint, inspection):
    endpoint, case = serve_endpoint, inspection
    files = {
        "image": ("q.png", png_bytes(case["image"]), "image/png"),
        "reference": ("r.png", png_bytes(case["reference"]), "image/png"),
    }
    multipart = httpx.post(
        f"{endpoint.base_url}/v1/detect",
        headers=auth(endpoint),
        files=files,
        data={"category": case["category"], "overlay": "true"},
        timeout=300,
    )
    assert multipart.status_code == 200, multipart.text
    result = multipart.json()
    assert result["model"] == endpoint.model and result["latency_ms"] > 0
    assert (result["width"], result["height"]) == (224, 224)
    assert result["format_ok"], result["completion"]  # the SFT'd model answers in format
    verdict = parse_answer(result["completion"])
    assert result["anomalous"] == verdict.decision and result["threshold"] is None
    assert 0.0 <= result["score"] <= 1.0
    assert len(result["boxes"]) == len(result["labels"]) == len(verdict.boxes)
    # The model answers on its 112 x 112 grid; the response is in the 224 x 224 original.
    original = parse_answer(result["completion"], scale=(2.0, 2.0), size=(224, 224))
    assert result["boxes"] == [list(box) for box in original.boxes]
    overlay = Image.open(io.BytesIO(base64.b64decode(result["overlay_png"])))
    assert overlay.format == "PNG" and overlay.size == (224, 224)
    changed = np.any(np.asarray(overlay.convert("RGB")) != np.asarray(case["image"]), axis=2)
    assert changed.any() == bool(result["boxes"])

    as_json = detect_json(endpoint, case)  # base64 and a data URI; same greedy answer
    assert as_json.status_code == 200, as_json.text
    assert as_json.json()["completion"] == result["completion"]
    assert as_json.json()["overlay_png"] is None
    assert as_json.json()["score"] == pytest.approx(result["score"], abs=1e-5)
    low, high = (detect_json(endpoint, case, threshold=t).json() for t in (0.0, 1.0))
    assert low["anomalous"] is True and low["threshold"] == 0.0
    assert high["anomalous"] is (result["score"] >= 1.0)


@pytest.mark.integration
def test_chat_completions_with_the_openai_client(serve_endpoint, inspection):
    import openai

    endpoint, case = serve_endpoint, inspection
    client = openai.OpenAI(
        base_url=f"{endpoint.base_url}/v1", api_key=endpoint.api_key, max_retries=0, timeout=300
    )
    assert [m.id for m in client.models.list()][0] == endpoint.model
    listed = httpx.get(f"{endpoint.base_url}/v1/models", headers=auth(endpoint), timeout=30)
    contract = listed.json()["data"][0]["mmrad_contract"]  # how the export says to prompt
    assert contract["prompt"] == asdict(case["variant"]) and contract["overrides"] == {}
    assert contract["pixels"] == case["pixels"].model_dump() and contract["from_export"]
    messages = chat_messages_for(case)

    greedy = client.chat.completions.create(
        model=endpoint.model,
        messages=messages,
        temperature=0,
        max_tokens=256,
        logprobs=True,
        top_logprobs=10,
    )
    [choice] = greedy.choices
    steps = choice.logprobs.content
    assert len(steps) == greedy.usage.completion_tokens > 0
    for step in steps:
        assert step.logprob <= 0 and 1 <= len(step.top_logprobs) <= 10
        tops = [alt.logprob for alt in step.top_logprobs]
        assert tops == sorted(tops, reverse=True) and step.logprob <= tops[0] + 1e-6
    # The same prompt through /v1/detect: same greedy answer, same P(Yes).
    detected = detect_json(endpoint, case).json()
    assert choice.message.content == detected["completion"]
    tokens = [s.token for s in steps]
    tops = [{a.token: a.logprob for a in s.top_logprobs} for s in steps]
    assert answer_score(tokens, tops) == pytest.approx(detected["score"], abs=1e-4)

    sampled = client.chat.completions.create(
        model=endpoint.model, messages=messages, n=3, temperature=1.0, seed=7, max_tokens=5
    )
    assert sorted(c.index for c in sampled.choices) == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in sampled.choices)
    assert sampled.usage.completion_tokens == 15 and sampled.choices[0].logprobs is None

    stream = client.chat.completions.create(
        model=endpoint.model,
        messages=messages,
        temperature=0,
        max_tokens=256,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == greedy.usage.completion_tokens

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=1)
    anonymous = openai.OpenAI(base_url=f"{endpoint.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.chat.completions.create(model=endpoint.model, messages=messages, max_tokens=1)


@pytest.mark.integration
def test_bad_requests_get_4xx_json_and_the_replica_keeps_serving(serve_endpoint, inspection):
    endpoint, case = serve_endpoint, inspection
    url, headers = endpoint.base_url, auth(endpoint)
    good = png_bytes(case["image"])
    chat_text = [{"role": "user", "content": "hello"}]

    def detect(**kwargs):
        return httpx.post(f"{url}/v1/detect", timeout=60, **kwargs)

    def chat(body, **kwargs):
        return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60, **kwargs)

    cases = {
        "no token": (401, "bearer token", detect(files={"image": ("q.png", good, "image/png")})),
        "wrong token": (
            401,
            "bearer token",
            chat(
                {"model": endpoint.model, "messages": chat_text},
                headers={"Authorization": "Bearer nope"},
            ),
        ),
        "models without token": (401, "bearer", httpx.get(f"{url}/v1/models")),
        "body too large": (
            413,
            "exceeds the limit",
            detect(headers=headers, content=b"x" * (3 * 2**20), params={"category": "x"}),
        ),
        "decompression bomb": (
            413,
            "decoded pixels",
            detect(
                headers=headers, files={"image": ("b.png", bomb_png(40_000, 40_000), "image/png")}
            ),
        ),
        "text body": (
            415,
            "multipart/form-data",
            detect(headers={**headers, "Content-Type": "text/plain"}, content=b"hi"),
        ),
        "text part": (
            415,
            "text/plain",
            detect(headers=headers, files={"image": ("q.txt", good, "text/plain")}),
        ),
        "malformed JSON": (
            400,
            "not valid JSON",
            detect(
                headers={**headers, "Content-Type": "application/json"}, content=b'{"image": "abc",'
            ),
        ),
        "non-image bytes": (
            400,
            "not an image",
            detect(headers=headers, files={"image": ("q.png", b"GIF? no.", "image/png")}),
        ),
        "truncated image": (
            400,
            "truncated",
            detect(
                headers=headers, files={"image": ("q.png", good[: len(good) // 3], "image/png")}
            ),
        ),
        "bad base64": (400, "base64", detect(headers=headers, json={"image": "%%%"})),
        "no image": (
            422,
            "'image'",
            detect(
                headers=headers,
                data={"category": "brick"},
                files={"reference": ("r.png", good, "image/png")},
            ),
        ),
        "bad threshold": (
            422,
            "'threshold'",
            detect(headers=headers, json={"image": data_uri(good), "threshold": 2}),
        ),
        "unknown field": (
            422,
            "'colour'",
            detect(headers=headers, json={"image": data_uri(good), "colour": 1}),
        ),
        "image by URL": (
            400,
            "only data: URIs",
            chat(
                {
                    "model": endpoint.model,
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": "http://1.2.3.4/x.png"}}
                            ],
                        }
                    ],
                },
                headers=headers,
            ),
        ),
        "bomb in chat": (
            413,
            "decoded pixels",
            chat(
                {
                    "model": endpoint.model,
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {
                                    "type": "image_url",
                                    "image_url": {"url": data_uri(bomb_png(40_000, 40_000))},
                                }
                            ],
                        }
                    ],
                },
                headers=headers,
            ),
        ),
        "no messages": (
            400,
            "empty conversation",
            chat({"model": endpoint.model, "messages": []}, headers=headers),
        ),
        "top without logprobs": (
            400,
            "logprobs",
            chat(
                {"model": endpoint.model, "messages": chat_text, "top_logprobs": 3}, headers=headers
            ),
        ),
        "prompt too long": (
            400,
            "context length",
            chat(
                {
                    "model": endpoint.model,
                    "max_tokens": 8,
                    "messages": [{"role": "user", "content": "word " * 6000}],
                },
                headers=headers,
            ),
        ),
        "unknown route": (404, "Not Found", httpx.get(f"{url}/v2/nothing", headers=headers)),
    }
    for name, (status, words, response) in cases.items():
        assert response.status_code == status, (name, response.status_code, response.text)
        error = response.json()["error"]
        assert words in error["message"] and error["code"] == status, (name, error)

    healthy = httpx.get(f"{url}/healthz", timeout=30)
    assert healthy.status_code == 200 and healthy.json()["status"] == "ok"
    after = detect_json(endpoint, case)
    assert after.status_code == 200 and after.json()["format_ok"], after.text


def replica_states() -> dict[str, int]:
    from ray import serve

    app = serve.status().applications["mmrad"]
    states = app.deployments[DEPLOYMENT_NAME].replica_states
    return {str(getattr(k, "value", k)): v for k, v in states.items()}


def poll(condition, deadline_s: float, every_s: float = 1.0) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every_s)
    return condition()


@pytest.mark.integration
def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(serve_endpoint):
    endpoint = serve_endpoint
    assert poll(lambda: replica_states().get("RUNNING") == 1, 120), replica_states()
    body = {
        "model": endpoint.model,
        "max_tokens": 48,
        "temperature": 1.0,
        "messages": [{"role": "user", "content": "Describe a scratch."}],
    }
    stop = threading.Event()
    failures: list[str] = []

    def client() -> None:  # one of 6 clients, each keeping one request in flight
        with httpx.Client(base_url=endpoint.base_url, headers=auth(endpoint), timeout=300) as c:
            while not stop.is_set():
                response = c.post("/v1/chat/completions", json=body)
                if response.status_code != 200:
                    failures.append(response.text)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        scaled_up = poll(lambda: replica_states().get("RUNNING") == 2, 300)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=300)
    assert scaled_up, replica_states()
    assert not failures, failures[:3]
    assert poll(lambda: replica_states() == {"RUNNING": 1}, 180), replica_states()


@pytest.mark.integration
def test_metrics_reach_prometheus(serve_endpoint):
    """Serve's and mmrad's counters are on the node's metrics agent (Ray exports them
    every few seconds, so poll)."""
    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    wanted = (
        "ray_serve_num_http_requests_total",
        "mmrad_serve_requests_total",
        "ray_vllm_time_to_first_token_seconds",  # vLLM's engine metrics, through Ray
        "ray_vllm_num_requests_waiting",
        "ray_vllm_kv_cache_usage_perc",
    )
    text = {"body": ""}

    def exported() -> bool:
        # vLLM sets its gauges only while its engine steps; after earlier tests removed
        # replicas they were seen missing from an idle engine's export, so each look
        # follows a request the engine works on.
        body = {"model": serve_endpoint.model, "max_tokens": 2,
                "messages": [{"role": "user", "content": "Hi."}]}  # fmt: skip
        httpx.post(f"{serve_endpoint.base_url}/v1/chat/completions", json=body,
                   headers=auth(serve_endpoint), timeout=60)  # fmt: skip
        text["body"] = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        return all(name in text["body"] for name in wanted) and models_counted(text["body"])

    def models_counted(body: str) -> bool:
        lines = [line for line in body.splitlines() if "mmrad_serve_requests_total{" in line]
        return any('route="/v1/models"' in line and 'outcome="ok"' in line for line in lines)

    httpx.get(f"{serve_endpoint.base_url}/v1/models", headers=auth(serve_endpoint), timeout=30)
    assert poll(exported, 90, every_s=3), (
        [name for name in wanted if name not in text["body"]],
        models_counted(text["body"]),
    )


def test_application_entry_round_trips_through_the_validator():
    app = application(
        {"model_dir": "/m"}, autoscaling={"min_replicas": 1, "max_replicas": 2}, env_vars={"T": "x"}
    )
    checked = validate_serve_config(serve_config([app], port=8123), "in code")
    assert checked.apps["mmrad"].model_dir == "/m"
    assert checked.app_urls() == {"mmrad": "http://127.0.0.1:8123"}
    assert json.loads(json.dumps(checked.config)) == checked.config


def test_cli_and_job_refuse_a_bad_file_before_starting_ray(capsys):
    from typer.testing import CliRunner

    from mmrad.cli import app
    from tests.helpers.entrypoints import run_job_module

    bad = ["applications.mmrad.args.max_pixels=1"]
    result = CliRunner().invoke(app, ["serve", "--config", "configs/local/serve.yaml", *bad])
    assert result.exit_code == 2 and "max_pixels" in result.output
    assert run_job_module("serve", "--config", "configs/local/serve.yaml", *bad) == 2
    assert "max_pixels" in capsys.readouterr().err


# -- deploying through Serve's public API (fast: no Ray) ----------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("target_capacity=50", "'target_capacity'"),
        (
            f"applications.mmrad.deployments.{DEPLOYMENT_NAME}.rolling_update_percentage=0.5",
            f"'applications.mmrad.deployments.{DEPLOYMENT_NAME}.rolling_update_percentage'",
        ),
        ("applications.mmrad.import_path=other.module:app", "'applications.mmrad.import_path'"),
    ],
)
def test_what_the_public_api_cannot_deploy_fails_before_ray_naming_the_key(override, key):
    from typer.testing import CliRunner

    from mmrad.cli import app

    result = CliRunner().invoke(app, ["serve", "-c", "configs/local/serve.yaml", override])
    assert result.exit_code == 2 and key in result.output and "serve deploy" in result.output


def test_an_application_deploys_with_its_deployment_entry_and_runtime_env():
    from mmrad.serve.deploy import app_targets, deployment_options

    entry = application({"model_dir": "/m"}, env_vars={"TOKEN_ENV": "x"}, num_cpus=0.25)
    deployment = entry["deployments"][0]
    deployment["ray_actor_options"]["runtime_env"] = {"env_vars": {"OWN": "y"}, "pip": []}
    deployment["health_check_period_s"] = 3
    options = deployment_options(entry, "in code")
    assert options["ray_actor_options"] == {
        "num_cpus": 0.25,
        "runtime_env": {"env_vars": {"TOKEN_ENV": "x", "OWN": "y"}, "pip": []},
    }
    assert options["health_check_period_s"] == 3 and options["max_ongoing_requests"] == 16
    del entry["deployments"]  # the code's ray_actor_options, with the app's runtime_env
    assert deployment_options(entry, "in code") == {
        "ray_actor_options": {"num_cpus": 0.5, "runtime_env": {"env_vars": {"TOKEN_ENV": "x"}}}
    }
    file = validate_serve_config(
        serve_config([entry, {**entry, "name": "b", "route_prefix": "/b"}])
    )
    targets = app_targets(file)
    assert [(t.name, t.run_options["route_prefix"]) for t in targets] == [
        ("mmrad", "/"),
        ("b", "/b"),
    ]


def test_serve_deploys_through_rays_public_api_only():
    import ast

    imported = set()
    for path in Path("mmrad/serve").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
    assert not [name for name in imported if name.startswith("ray") and "._private" in name]
