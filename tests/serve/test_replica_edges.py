"""A replica at its edges, against a running app of its own (``edges``, no token): hostile
JSON, decode memory under 16 concurrent two-image requests at the pixel limit, load
shedding, clients that hang up mid-stream, and an engine core that dies under load. The
crash test comes last: it has the replica replaced."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from mmrad.serve.decoding import decode_budget_bytes

pytestmark = pytest.mark.integration

APP = "edges"
MAX_PIXELS = 16_000_000  # a 16 MP camera photo is at the limit
DECODE_SLOTS = 2
RUNNING, QUEUED = 8, 8
LONG = 16_000
"""Tokens of a long generation: a minute or more of decoding for 8 together."""
MEMORY_SLACK = 160 * 2**20
"""What else 16 requests of ~80 kB PNGs may hold at once besides the decodes (bodies,
prompts, responses); unbounded decodes of their 32 images would hold up to 2 GB."""


@pytest.fixture(scope="module")
def edges(serve_endpoint, sft_trained) -> str:
    """The ``edges`` app's URL: 8 sequences running and 8 queued per replica, 2 decode
    slots, a 16 MP pixel limit."""
    from ray import serve

    from mmrad.serve.config import application, serve_config, validate_serve_config
    from mmrad.serve.deploy import deploy

    args = {"model_dir": sft_trained.export_uri, "model_name": APP, "max_tokens": 32,
            "max_pixels": MAX_PIXELS, "max_concurrent_decodes": DECODE_SLOTS,
            "max_upload_bytes": 4 * 2**20, "max_queued_requests": QUEUED,
            "engine": {"kv_cache_bytes": 64 * 2**20, "max_num_seqs": RUNNING,
                       "max_model_len": LONG + 384}}  # fmt: skip
    app = application(args, name=APP, route_prefix=f"/{APP}", max_ongoing_requests=32)
    app["deployments"][0]["health_check_period_s"] = 2  # a dead engine found in ~6 s, not 30
    urls = deploy(validate_serve_config(serve_config([app]), APP), timeout_s=600)
    yield urls[APP]
    serve.delete(APP)


def chat(text: str, max_tokens: int, **extra) -> dict:
    return {"model": APP, "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens, **extra}  # fmt: skip


def health(url: str) -> dict:
    return httpx.get(f"{url}/healthz", timeout=30).json()


def wait_for(condition, what: str, within_s: float, every_s: float = 0.25):
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    pytest.fail(f"{what}: not within {within_s:.0f} s")


def replica_process() -> psutil.Process | None:
    """The ``edges`` replica's actor process (Ray titles it ``ray::ServeReplica:...``)."""
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if f"ServeReplica:{APP}:" in " ".join(process.cmdline()):
                return process
    return None


def engine_core(replica: psutil.Process) -> psutil.Process:
    cores = [
        child
        for child in replica.children(recursive=True)
        if child.name().startswith("VLLM::EngineCor")
    ]  # comm keeps 15 characters
    assert len(cores) == 1, [(c.pid, c.name(), c.cmdline()) for c in replica.children(True)]
    return cores[0]


def test_deeply_nested_json_is_a_400_json_before_parsing(edges):
    for route in ("/v1/chat/completions", "/v1/detect"):
        reply = httpx.post(f"{edges}{route}", content=b"[" * 200_000, timeout=60,
                           headers={"content-type": "application/json"})  # fmt: skip
        assert reply.status_code == 400, (route, reply.text[:300])
        assert "200000 levels deep" in reply.json()["error"]["message"]


def camera_photo(seed: int) -> bytes:
    """A 4000 x 4000 PNG (16 MP, exactly the limit) that compresses to ~80 kB."""
    y, x = np.mgrid[0:4000, 0:4000]
    rgb = np.stack([(x + seed) * 255 // 4000, y * 255 // 4000, (x // 7 + y // 5) % 256], axis=2)
    buffer = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def peak_rss_during(process: psutil.Process, work) -> tuple[object, int]:
    """``work()``'s result and how far ``process``'s peak resident memory rose above
    where it stood when ``work`` began (the kernel's own high-water mark, reset first)."""
    with open(f"/proc/{process.pid}/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current resident size
    start = process.memory_info().rss
    result = work()
    with open(f"/proc/{process.pid}/status") as status:
        peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return result, peak_kib * 1024 - start


def test_sixteen_two_image_requests_at_the_pixel_limit_stay_in_the_decode_budget(edges):
    """8 detect requests (query + reference) and 8 chat requests with 2 images, all 16 MP,
    at once: each is answered, and the replica's peak memory rises by at most its decode
    budget (2 slots x 16 MP x 8 bytes) plus the rest of what the requests hold."""
    photos = [camera_photo(seed) for seed in range(4)]
    uri = [f"data:image/png;base64,{base64.b64encode(p).decode()}" for p in photos]

    def detect(i: int) -> httpx.Response:
        body = {"image": uri[i % 4], "reference": uri[(i + 1) % 4], "category": "bottle"}
        return httpx.post(f"{edges}/v1/detect", json=body, timeout=300)

    def chat_two_images(i: int) -> httpx.Response:
        parts = [{"type": "image_url", "image_url": {"url": uri[(i + k) % 4]}} for k in (0, 1)]
        content = [*parts, {"type": "text", "text": "Any defect?"}]
        body = {"model": APP, "max_tokens": 16, "messages": [{"role": "user", "content": content}]}
        return httpx.post(f"{edges}/v1/chat/completions", json=body, timeout=300)

    def burst() -> list[httpx.Response]:
        with ThreadPoolExecutor(16) as pool:
            return list(pool.map(lambda i: (detect if i % 2 else chat_two_images)(i), range(16)))

    replica = replica_process()
    replies, rise = peak_rss_during(replica, burst)
    assert [r.status_code for r in replies] == [200] * 16, [r.text[:200] for r in replies]
    detected = [r.json() for r in replies[1::2]]
    assert all((d["width"], d["height"]) == (4000, 4000) for d in detected)
    budget = decode_budget_bytes(MAX_PIXELS, DECODE_SLOTS)
    print(f"peak memory rise {rise / 2**20:.0f} MiB; decode budget {budget / 2**20:.0f} MiB")
    assert rise <= budget + MEMORY_SLACK, f"{rise / 2**20:.0f} MiB"


def test_a_full_replica_sheds_load_with_a_json_503(edges):
    """``max_queued_requests``: 8 running + 8 queued; of 24 requests at once the rest
    get 503 (JSON, Retry-After) at once, streams included (before their 200), while the
    admitted ones are answered."""
    body = chat("Describe a scratch.", 400, min_tokens=400, temperature=1.0)
    with ThreadPoolExecutor(24) as pool:
        replies = list(pool.map(lambda i: httpx.post(f"{edges}/v1/chat/completions",
                                                     json={**body, "stream": i % 5 == 4},
                                                     timeout=300), range(24)))  # fmt: skip
    statuses = sorted(reply.status_code for reply in replies)
    assert set(statuses) == {200, 503} and statuses.count(200) >= RUNNING + QUEUED - 2, statuses
    for reply in replies:
        if reply.status_code == 503:
            assert reply.json()["error"]["code"] == 503 and reply.headers["Retry-After"] == "1"
    assert health(edges)["admitted_sequences"] == 0


def test_streams_dropped_by_their_clients_free_their_engine_slots(edges):
    """8 streams of 16,000 tokens each (a minute or more of decoding together) are read up
    to their first event and dropped: the engine and the admission count let go of all 8
    within 10 s, and 16 requests at once are then all admitted."""
    body = chat("Describe a scratch.", LONG, min_tokens=LONG, temperature=1.0, stream=True)
    with contextlib.ExitStack() as streams:
        client = streams.enter_context(httpx.Client(timeout=120))
        open_lines = []  # a dropped line iterator would close its stream at once
        for _ in range(8):
            stream = streams.enter_context(client.stream("POST", f"{edges}/v1/chat/completions",
                                                         json=body))  # fmt: skip
            assert stream.status_code == 200
            open_lines.append(stream.iter_lines())
            assert next(open_lines[-1]).startswith("data: ")
        wait_for(lambda: health(edges)["engine_requests"] == 8, "8 streams in the engine", 60)
    start = time.monotonic()
    wait_for(lambda: _idle(health(edges)), "the engine let go of the dropped streams", 10)
    print(f"8 dropped streams freed in {time.monotonic() - start:.1f} s")
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda i: httpx.post(f"{edges}/v1/chat/completions",
                                                     json=chat("Hi.", 8), timeout=300),
                                range(16)))  # fmt: skip
    assert [r.status_code for r in replies] == [200] * 16, [r.text[:200] for r in replies]


def _idle(state: dict) -> bool:
    return state["engine_requests"] == 0 and state["admitted_sequences"] == 0


def test_an_engine_core_killed_under_load_answers_503_and_the_replica_is_replaced(edges):
    """SIGKILL to the replica's engine core while 4 requests run: each gets a 503 JSON,
    ``/healthz`` answers 503, Serve's health check replaces the replica (a new process),
    and the app answers again."""
    replica = replica_process()
    core = engine_core(replica)
    body = chat("Describe a scratch.", LONG, min_tokens=LONG, temperature=1.0)
    replies: list[httpx.Response] = []

    def send() -> None:
        replies.append(httpx.post(f"{edges}/v1/chat/completions", json=body, timeout=300))

    senders = [threading.Thread(target=send) for _ in range(4)]
    for sender in senders:
        sender.start()
    wait_for(lambda: health(edges)["engine_requests"] == 4, "4 requests in the engine", 60)
    os.kill(core.pid, signal.SIGKILL)
    killed = time.monotonic()
    for sender in senders:
        sender.join(timeout=120)
    refused_after = time.monotonic() - killed
    assert [r.status_code for r in replies] == [503] * 4, [r.text[:300] for r in replies]
    assert all(r.json()["error"]["code"] == 503 for r in replies)
    dead = httpx.get(f"{edges}/healthz", timeout=30)
    assert dead.status_code == 503 and dead.json()["error"]["code"] == 503

    def replaced() -> bool:
        process = replica_process()
        return process is not None and process.pid != replica.pid

    wait_for(replaced, "a new replica process", 240, every_s=1)
    answered = wait_for(lambda: _answer(edges), "an answer from the new replica", 240, every_s=1)
    assert answered["choices"][0]["message"]["content"] is not None
    print(
        f"engine core killed: 4 requests refused after {refused_after:.1f} s, the app "
        f"answering again after {time.monotonic() - killed:.1f} s"
    )


def _answer(url: str) -> dict | None:
    with contextlib.suppress(httpx.HTTPError):
        reply = httpx.post(f"{url}/v1/chat/completions", json=chat("Hi.", 8), timeout=60)
        if reply.status_code == 200:
            return reply.json()
    return None
