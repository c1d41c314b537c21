"""The OpenAI-compatible client against a real HTTP server on 127.0.0.1 that answers
429 and 500 before it succeeds: the openai SDK's retries (which statuses, Retry-After
waited, as the server saw the tries), failures recorded per sample, the concurrency
limit, P(Yes) from the returned log-probs, images sent on the model grid, the key never
shown or logged."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from mmrad.config import PixelBudget
from mmrad.engine.requests import InspectionInput
from mmrad.engine.sampling import Sampling
from mmrad.eval.config import EndpointTarget, EvalJobConfig
from mmrad.eval.endpoint import EndpointClient, EndpointConfigError
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
    (the last one repeats), ``delay_s`` after it arrived; requests are recorded with
    their arrival time, and the most requests ever in progress at once."""

    def __init__(self, script, delay_s: float = 0.0):
        self.script = list(script)
        self.delay_s = delay_s
        self.requests: list[dict] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                index = outer.record(self)
                with outer.in_flight():
                    time.sleep(outer.delay_s)
                outer.reply(self, *outer.script[min(index, len(outer.script) - 1)])

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def record(self, handler: BaseHTTPRequestHandler) -> int:
        """Records the request with its arrival time; returns its index."""
        arrived = time.monotonic()
        body = json.loads(handler.rfile.read(int(handler.headers.get("content-length", 0))))
        headers = {k.lower(): v for k, v in handler.headers.items()}
        with self._lock:
            self.requests.append({"path": handler.path, "time": arrived, "body": body,
                                  "headers": headers})  # fmt: skip
            return len(self.requests) - 1

    @contextlib.contextmanager
    def in_flight(self):
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    @staticmethod
    def reply(handler: BaseHTTPRequestHandler, status: int, headers: dict, body: dict) -> None:
        data = json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("content-type", "application/json")
        handler.send_header("content-length", str(len(data)))
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(data)

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
    fields = dict(url=url, model="baseline", api_key_env=KEY_ENV, retries=3, timeout_s=10)
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
        client = EndpointClient(target(server.url), PIXELS)
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


ERROR = {"error": {"message": "try again"}}
FAST = {"retry-after-ms": "1"}  # the SDK waits 1 ms instead of its backoff


def complete_one(server: ScriptedServer, **changes):
    client = EndpointClient(target(server.url, **changes), PIXELS)
    [result] = client.complete_many([prompt()], Sampling(max_tokens=8))
    return result


@pytest.mark.parametrize(
    ("headers", "wait_s"), [({"retry-after": "1"}, 1.0), ({"retry-after-ms": "700"}, 0.7)]
)
def test_the_server_asked_delay_is_waited_before_the_retry(headers, wait_s):
    # the SDK's own first backoff is at most 0.5 s: a longer gap is the server's delay
    with ScriptedServer([(429, headers, ERROR), (200, {}, completion_body())]) as server:
        result = complete_one(server)
    assert result.error is None and result.attempts == 2
    first, retry = server.requests
    assert retry["time"] - first["time"] >= wait_s
    assert retry["headers"]["x-stainless-retry-count"] == "1"


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502])
def test_retried_statuses(status):
    with ScriptedServer([(status, FAST, ERROR), (200, {}, completion_body())]) as server:
        result = complete_one(server)
    assert result.error is None and result.attempts == 2 and len(server.requests) == 2


@pytest.mark.parametrize(
    ("status", "headers"),
    [(400, {}), (401, {}), (404, {}), (422, {}),
     (503, {"x-should-retry": "false"}),  # the server's word wins
     (429, {"retry-after": "600"})],  # longer than the SDK waits (120 s): no retry
)  # fmt: skip
def test_not_retried_statuses_become_the_samples_error(status, headers):
    with ScriptedServer([(status, headers, ERROR), (200, {}, completion_body())]) as server:
        result = complete_one(server)
    assert len(server.requests) == 1 and result.attempts == 1
    assert result.error.startswith(f"after 1 tries: HTTP {status}") and result.completions == ()


def test_5xx_until_retries_run_out_then_the_rows_error():
    with ScriptedServer([(502, FAST, ERROR)]) as server:
        result = complete_one(server, retries=4)
    assert len(server.requests) == 5 and result.attempts == 5
    assert result.error.startswith("after 5 tries: HTTP 502") and "try again" in result.error
    counts = [r["headers"]["x-stainless-retry-count"] for r in server.requests]
    assert counts == ["0", "1", "2", "3", "4"]


def test_a_timeout_is_retried_then_the_rows_error():
    with ScriptedServer([(200, {}, completion_body())], delay_s=0.5) as server:
        result = complete_one(server, retries=1, timeout_s=0.1)
    assert len(server.requests) == 2 and result.attempts == 2
    assert result.error == "after 2 tries: timed out after 0.1 s"


def test_concurrency_is_bounded():
    with ScriptedServer([(200, {}, completion_body())], delay_s=0.2) as server:
        client = EndpointClient(target(server.url, max_concurrency=2), PIXELS)
        results = client.complete_many([prompt() for _ in range(6)], Sampling(max_tokens=8))
    assert all(r.error is None for r in results) and len(server.requests) == 6
    assert server.max_in_flight == 2


def test_the_key_is_not_logged_even_at_debug(caplog):
    caplog.set_level(logging.DEBUG)
    with ScriptedServer([(500, FAST, ERROR), (401, {}, ERROR)]) as server:
        result = complete_one(server)
    assert result.attempts == 2 and "HTTP 401" in result.error
    assert "Retrying request" in caplog.text  # the SDK did log its retry
    assert SECRET not in caplog.text and SECRET not in result.error


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
        load_config(EvalJobConfig, None, [*endpoint, "target.retries=-1"])
    # the backoff is the SDK's now: old configs are told so
    with pytest.raises(ConfigError, match="backoff_s was removed: the openai SDK's backoff"):
        load_config(EvalJobConfig, None, [*endpoint, "target.backoff_s=0.5"])
