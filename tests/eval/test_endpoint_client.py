"""The OpenAI-compatible client against a real HTTP server on 127.0.0.1 that answers
429 and 500 before it succeeds: retries with backoff, failures recorded per sample,
P(Yes) from the returned log-probs, images sent on the model grid, the key never shown."""

from __future__ import annotations

import base64
import io
import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from mmrad.config import PixelBudget
from mmrad.engine.requests import InspectionInput
from mmrad.engine.sampling import Sampling
from mmrad.eval.config import EndpointTarget, EvalJobConfig
from mmrad.eval.endpoint import (
    EndpointClient,
    EndpointConfigError,
    backoff_delay,
    is_retryable,
    retry_after_seconds,
)
from mmrad.eval.inference import chat_prompt
from mmrad.task.prompt import PromptVariant

KEY_ENV = "MMRAD_TEST_ENDPOINT_KEY"
SECRET = "sk-test-secret-value-42"
PIXELS = PixelBudget(max_pixels=112 * 112)
ANSWER = (
    "<think>a dent.</think><answer>Yes. {'bbox_2d': [10, 20, 40, 60], 'label': 'dent'}</answer>"
)
# the tokens of ANSWER, as an endpoint reports them; "Yes" (index 3) is the scored one
TOKENS = ["<think>a dent.</think>", "<answer>", "", "Yes", ". {'bbox_2d': [10, 20, 40, 60], ",
          "'label': 'dent'}", "</answer>"]  # fmt: skip


def completion_body(n: int = 1) -> dict:
    content = []
    for token in TOKENS:
        top = [{"token": token, "logprob": -0.1}]
        if token == "Yes":
            top = [
                {"token": "Yes", "logprob": np.log(0.8)},
                {"token": "No", "logprob": np.log(0.2)},
            ]
        content.append({"token": token, "logprob": -0.1, "top_logprobs": top})
    choices = [
        {"index": i, "message": {"role": "assistant", "content": ANSWER},
         "finish_reason": "stop", "logprobs": {"content": content}}
        for i in range(n)
    ]  # fmt: skip
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": choices}  # fmt: skip


class ScriptedServer:
    """A real HTTP server: each POST gets the next scripted ``(status, headers, body)``
    (the last one repeats); requests are recorded."""

    def __init__(self, script):
        self.script = list(script)
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                length = int(self.headers.get("content-length", 0))
                outer.requests.append(
                    {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                     "body": json.loads(self.rfile.read(length))}
                )  # fmt: skip
                index = min(len(outer.requests) - 1, len(outer.script) - 1)
                status, headers, body = outer.script[index]
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def target(url: str, **changes) -> EndpointTarget:
    fields = dict(url=url, model="baseline", api_key_env=KEY_ENV, retries=3, backoff_s=0.01,
                  max_backoff_s=0.05, timeout_s=10)  # fmt: skip
    return EndpointTarget(**(fields | changes))


def prompt():
    rng = np.random.default_rng(0)
    query = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)  # H x W, off the grid
    reference = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    item = InspectionInput(query, reference, "metal_nut")
    return chat_prompt(item, PromptVariant(), PIXELS)


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def test_retries_429_and_500_then_succeeds_and_scores():
    error = {"error": {"message": "slow down"}}
    script = [(429, {"retry-after": "0"}, error), (500, {}, error), (200, {}, completion_body(2))]
    with ScriptedServer(script) as server:
        client = EndpointClient(target(server.url), PIXELS, rng=random.Random(0))
        [result] = client.complete_many([prompt()], Sampling(n=2, max_tokens=64, logprobs=5))
    assert result.error is None and result.attempts == 3
    assert result.completions == (ANSWER, ANSWER)
    assert result.scores == pytest.approx((0.8, 0.8))
    assert result.latency_ms > 0
    assert len(server.requests) == 3

    request = server.requests[-1]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["authorization"] == f"Bearer {SECRET}"
    body = request["body"]
    assert body["model"] == "baseline" and body["n"] == 2 and body["temperature"] == 0.0
    assert body["logprobs"] is True and body["top_logprobs"] == 5 and body["max_tokens"] == 64
    parts = body["messages"][0]["content"]
    images = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    assert len(images) == 2  # reference, then query
    decoded = Image.open(io.BytesIO(base64.b64decode(images[1].split(",", 1)[1])))
    assert decoded.size == (84, 112)  # 200 x 300 resized to its model grid under the budget
    text = " ".join(p["text"] for p in parts if p["type"] == "text")
    assert "84 pixels wide and 112 pixels high" in text and "metal nut" in text


def test_failures_are_recorded_per_sample_not_raised():
    with ScriptedServer([(503, {}, {"error": "down"})]) as server:
        client = EndpointClient(target(server.url, retries=2), PIXELS)
        results = client.complete_many([prompt(), prompt()], Sampling(max_tokens=8))
    assert [r.attempts for r in results] == [3, 3]
    assert all(r.completions == () and "HTTP 503" in r.error for r in results)
    assert len(server.requests) == 6

    with ScriptedServer([(400, {}, {"error": {"message": "bad image"}})]) as server:
        client = EndpointClient(target(server.url), PIXELS)
        [result] = client.complete_many([prompt()], Sampling(max_tokens=8))
    assert result.attempts == 1 and "HTTP 400" in result.error  # a client error: no retry
    assert SECRET not in result.error and SECRET not in repr(client)


def test_unreachable_endpoint_is_an_error_per_sample():
    with ScriptedServer([(200, {}, completion_body())]) as server:
        url = server.url
    client = EndpointClient(target(url, retries=1), PIXELS)  # the server is gone
    [result] = client.complete_many([prompt()], Sampling(max_tokens=8))
    assert result.attempts == 2 and result.error.startswith("after 2 tries: connection")


def test_missing_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(EndpointConfigError, match=KEY_ENV):
        EndpointClient(target("http://127.0.0.1:9/v1"), PIXELS)


def test_backoff_policy():
    rng = random.Random(0)
    delays = [[backoff_delay(a, 0.5, 4.0, rng=rng) for _ in range(200)] for a in range(6)]
    for attempt, values in enumerate(delays):
        assert min(values) >= 0 and max(values) <= min(4.0, 0.5 * 2**attempt)
    assert max(delays[2]) > max(delays[0])  # grows exponentially, then capped
    assert backoff_delay(0, 0.5, 4.0, retry_after_s=3.0, rng=rng) >= 3.0
    assert backoff_delay(0, 0.5, 4.0, retry_after_s=60.0, rng=rng) == 4.0
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert [is_retryable(s) for s in (None, 429, 500, 503, 400, 401, 404)] == [
        True, True, True, True, False, False, False,
    ]  # fmt: skip


def test_endpoint_target_in_job_config():
    from mmrad.config import ConfigError, load_config

    endpoint = ["target.kind=endpoint", "target.url=http://h/v1", "target.model=m"]
    job = load_config(EvalJobConfig, None, [*endpoint, "target.api_key_env=null"])
    assert isinstance(job.target, EndpointTarget) and job.target.api_key_env is None
    with pytest.raises(ConfigError, match="url"):
        load_config(EvalJobConfig, None, ["target.kind=endpoint", "target.model=m"])
    # switching kinds on a file that sets target.path: told how
    with pytest.raises(ConfigError, match=r"path not allowed for kind 'endpoint'.*target=\{kind"):
        load_config(EvalJobConfig, "configs/local/eval.yaml", endpoint)
    job = load_config(EvalJobConfig, "configs/local/eval.yaml", ["target={kind: endpoint}",
                                                                *endpoint[1:]])  # fmt: skip
    assert isinstance(job.target, EndpointTarget) and job.target.url == "http://h/v1"
    with pytest.raises(ConfigError, match="retries"):
        load_config(EvalJobConfig, None, ["target.kind=endpoint", "target.url=u",
                                          "target.model=m", "target.retries=-1"])  # fmt: skip
