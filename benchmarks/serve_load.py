"""Serving throughput: /v1/detect at concurrency 1 and 8, and chat against vLLM's server.

Deploys the mmrad Serve application (one replica, so the gain is the engine's continuous
batching, not more replicas) on a local Ray and sends ``--requests`` detections at each
concurrency, after a warm-up of ``--warmup`` requests at concurrency 2. Every request
carries its own random query image (seeds: the warm-up's, then concurrency 1's, then
8's, never repeated), so no arm finds another's prompt in the engine's prefix cache; both
arms send the same number of requests of the same size. Printed per concurrency:
requests/s, p50/p99 latency and errors; published (``benchmarks/record.py``): requests/s
at 8 against 1 (goal: at least 3x), with the work each arm counted: ``requests``
answered, ``images`` sent in them, and ``completion_tokens``, the tokens the replica
generated for them (its ``mmrad_serve_generated_tokens`` counter, read from the node's
metrics agent before and after each arm; ``/v1/detect`` returns no usage).

Then the same for ``/v1/chat/completions``, ours against vLLM's own OpenAI server (the
same model directory, with the engine arguments and process environment the replica
builds from the same engine config), one server at a time: our app's arms first, then
Ray is shut down and vLLM's server started. Both get the same bodies per concurrency
(one image each, images no other arm sends, greedy, ``max_tokens``) after the same
warm-up; published per concurrency: our requests/s against vLLM's (goal at 8: at least
0.9x), with ``requests``, ``images``, ``prompt_tokens`` and ``completion_tokens`` from
each response's ``usage``; p50/p99 and their ratios (ours/vLLM) are printed. The server
is ended (its whole process group) however the script ends.

Detection decodes greedily and stops at end-of-sequence, so an answer's length depends
on its image: the arms' token counts may differ by up to 5% (the declared tolerance)
and still give a ratio. Without ``--model`` it builds the tiny random model (its answers
are noise, mostly ``--max-tokens`` long; the work per request is real: prefill of the
image and prompt, and the decoding steps counted).

    scripts/loopback-netns .venv/bin/python benchmarks/serve_load.py
    scripts/loopback-netns .venv/bin/python benchmarks/serve_load.py --model EXPORT_DIR
    ... serve_load.py --no-vllm                       # detection only
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from record import Arm, compare, publish

if TYPE_CHECKING:
    from mmrad.config import EngineConfig

CONCURRENCY = (1, 8)
TOKEN_TOLERANCE = 0.05  # greedy answers stop at end-of-sequence: lengths follow the images
ROUTE = "/v1/detect"
CHAT_ROUTE = "/v1/chat/completions"
CHAT_QUESTION = "Is there a defect on this brick? Answer Yes or No."
MODEL_NAME = "bench"
ENGINE = {"kv_cache_bytes": 128 * 2**20, "max_num_seqs": 32, "max_model_len": 2048}
VS_VLLM_GOAL = {8: ">= 0.9x"}
VLLM_STARTUP_TIMEOUT_S = 600
VLLM_STOP_TIMEOUT_S = 30


def query_png(size: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def chat_body(png: str, max_tokens: int) -> dict:
    """One OpenAI chat request: an image and a question, greedy, ``max_tokens``."""
    image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}
    return {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": [image, {"type": "text", "text": CHAT_QUESTION}]}],
        "temperature": 0,
        "max_tokens": max_tokens,
    }


def body_images(body: dict) -> int:
    """Images in a /v1/detect or a chat body."""
    if "messages" in body:
        return sum(
            1
            for message in body["messages"]
            for part in message["content"]
            if part.get("type") == "image_url"
        )
    return sum(1 for key in ("image", "reference") if body.get(key))


async def load(
    url: str, bodies: list[dict], concurrency: int, route: str = ROUTE
) -> dict[str, float]:
    """Send every body to ``route`` with at most ``concurrency`` in flight; latency per
    request, the images of the answered ones and the tokens their ``usage`` counts
    (0 for a route that returns none)."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    images = 0
    tokens = {"prompt_tokens": 0, "completion_tokens": 0}
    queue: asyncio.Queue = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal images
        while not queue.empty():
            body = queue.get_nowait()
            start = time.perf_counter()
            try:
                response = await client.post(f"{url}{route}", json=body)
                if response.status_code != 200:
                    errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                    continue
            except httpx.HTTPError as err:
                errors.append(f"{type(err).__name__}: {err}")
                continue
            latencies.append(time.perf_counter() - start)
            images += body_images(body)
            usage = response.json().get("usage") or {}
            for key in tokens:
                tokens[key] += usage.get(key, 0)

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "images": images,
        "errors": len(errors),
        "requests_per_s": len(latencies) / seconds,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "mean_ms": 1000 * statistics.mean(latencies) if latencies else float("nan"),
        "first_error": errors[0] if errors else None,
        "usage": tokens,
    }


class ServerCounters:
    """The replica's own counters for the route, as the node's metrics agent exports
    them (Ray flushes them every few seconds, hence the polling)."""

    def __init__(self) -> None:
        import ray

        self.url = f"http://127.0.0.1:{ray.nodes()[0]['MetricsExportPort']}/metrics"
        self.answered = 0  # requests answered so far, as the client saw them

    def scrape(self) -> dict[str, float]:
        import httpx

        text = httpx.get(self.url, timeout=30).text
        totals = {"requests": 0.0, "completion_tokens": 0.0}
        for line in text.splitlines():
            match = re.match(
                r"\w*mmrad_serve_(requests|generated_tokens)_total\{(.*)\} (\S+)$", line
            )
            if not match or f'route="{ROUTE}"' not in match[2]:
                continue
            if match[1] == "requests" and 'outcome="ok"' in match[2]:
                totals["requests"] += float(match[3])
            elif match[1] == "generated_tokens":
                totals["completion_tokens"] += float(match[3])
        return totals

    def after(self, answered: int, timeout_s: float = 120) -> dict[str, float]:
        """The totals once the replica's count of answered requests reaches the client's
        (every request's tokens are counted before the request is)."""
        self.answered += answered
        deadline = time.monotonic() + timeout_s
        while True:
            totals = self.scrape()
            if totals["requests"] >= self.answered or time.monotonic() > deadline:
                return totals
            time.sleep(2)


# -- vLLM's own OpenAI server, the chat baseline -------------------------------------------
# Started with the engine arguments the replica builds from the same EngineConfig
# (mmrad.engine.settings.engine_kwargs, as command-line flags) and the environment its
# AsyncEngine sets process-wide (on CPUs CPU_ENVIRONMENT: the engine core runs the model
# itself), bound to 127.0.0.1 on a free port, in its own process group: ended with
# everything it started when the ``with`` block is left, however it is left.


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli_flags(kwargs: Mapping[str, Any]) -> list[str]:
    """``engine_kwargs`` as vLLM's command line: ``max_num_seqs=32`` → ``--max-num-seqs
    32``, ``True`` → the bare flag, a mapping → JSON."""
    flags: list[str] = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif isinstance(value, Mapping):
            flags += [flag, json.dumps(dict(value))]
        elif value is not None and value is not False:
            flags += [flag, str(value)]
    return flags


def server_command(model: str, config: EngineConfig, model_name: str, port: int) -> list[str]:
    from mmrad.engine.settings import engine_kwargs

    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        *cli_flags(engine_kwargs(config, model)),
        "--served-model-name", model_name,
        "--host", "127.0.0.1",
        "--port", str(port),
        # Engine stats on, as in the replica (which exports them through Ray's metrics).
    ]  # fmt: skip


def server_environment() -> dict[str, str]:
    """This process's environment plus what the replica's engine sets for itself."""
    from mmrad.engine.settings import CPU_ENVIRONMENT, on_gpu_default

    return {**os.environ, **({} if on_gpu_default() else CPU_ENVIRONMENT)}


def wait_ready(proc: subprocess.Popen, url: str, log: Path) -> None:
    """Until ``GET /health`` answers 200; fails when the server exits first or is late."""
    import httpx

    deadline = time.monotonic() + VLLM_STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"vllm serve not ready after {VLLM_STARTUP_TIMEOUT_S} s; see {log}")


def stop(proc: subprocess.Popen) -> None:
    """End the server's process group (the API server and its engine core): SIGTERM,
    then SIGKILL for whatever is left after :data:`VLLM_STOP_TIMEOUT_S`."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=VLLM_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    with suppress(ProcessLookupError):  # the engine core may outlive its parent
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextmanager
def vllm_server(model: str, config: EngineConfig, model_name: str, log: Path) -> Iterator[str]:
    """vLLM's OpenAI server for ``model`` under ``config``: its base URL while in the
    block; its output goes to ``log``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # A SIGTERM (``timeout``) ends this script through the ``finally`` below, not past it.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        with open(log, "w") as out:
            proc = subprocess.Popen(
                server_command(model, config, model_name, port),
                env=server_environment(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, ended as a whole
            )
        try:
            wait_ready(proc, url, log)
            yield url
        finally:
            stop(proc)
    finally:
        signal.signal(signal.SIGTERM, previous)


def app_args(model: str, max_tokens: int, base_model: bool) -> dict:
    """The application's ``args`` (the replica's engine config among them)."""
    args = {"model_dir": model, "model_name": MODEL_NAME, "max_tokens": max_tokens,
            "engine": ENGINE}  # fmt: skip
    if base_model:  # the tiny model has no mmrad.json: say how to prompt it
        args |= {"prompt": {"use_reference": False}}
    return args


def deploy_app(args: dict, work: str) -> str:
    from mmrad.config import RayConfig
    from mmrad.ray_env import init_ray
    from mmrad.serve.config import application, serve_config, validate_serve_config
    from mmrad.serve.deploy import deploy

    app = application(args, max_ongoing_requests=32, num_cpus=0.5)
    init_ray(RayConfig(num_cpus=2, state_dir=f"{work}/ray"))
    urls = deploy(validate_serve_config(serve_config([app]), "benchmark"))
    return urls["mmrad"]


def shut_down_app() -> None:
    """Serve and the local Ray, so nothing of ours runs beside vLLM's server."""
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def print_result(label: str, r: dict) -> None:
    print(f"{label} concurrency {r['concurrency']}: {r['requests_per_s']:.2f} req/s, "
          f"p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, "
          f"{r['requests']} ok, {r['errors']} errors"
          + (f" (first: {r['first_error']})" if r["first_error"] else ""),
          flush=True)  # fmt: skip


def arm_seeds(first: int, args: argparse.Namespace) -> tuple[int, list[int]]:
    """First image seeds of a warm-up and of each concurrency's arm, from ``first`` on
    (``args.warmup`` images, then ``args.requests`` per arm)."""
    return first, [first + args.warmup + i * args.requests for i in range(len(CONCURRENCY))]


def measure_detect(url: str, args: argparse.Namespace, model_label: str) -> dict:
    """/v1/detect at each concurrency; publishes 8 against 1. Seeds from 0 on."""

    def bodies(first_seed: int, count: int) -> list[dict]:
        return [{"image": query_png(args.image_size, first_seed + i), "category": "brick"}
                for i in range(count)]  # fmt: skip

    warmup_seed, first_seeds = arm_seeds(0, args)
    counters = ServerCounters()
    # Warm-up (first-request costs out of the figures) on images no timed request sends.
    warmup = asyncio.run(load(url, bodies(warmup_seed, args.warmup), 2))
    before = counters.after(warmup["requests"])
    results, arms = [], []
    for concurrency, first_seed in zip(CONCURRENCY, first_seeds, strict=True):
        r = asyncio.run(load(url, bodies(first_seed, args.requests), concurrency))
        totals = counters.after(r["requests"])
        r["completion_tokens"] = totals["completion_tokens"] - before["completion_tokens"]
        r["server_requests"] = totals["requests"] - before["requests"]
        before = totals
        results.append(r)
        print_result("detect", r)
        counted = {"requests": r["requests"], "images": r["images"],
                   "completion_tokens": r["completion_tokens"]}  # fmt: skip
        if r["server_requests"] != r["requests"]:  # the counters did not arrive in time
            del counted["completion_tokens"]
        arms.append(Arm(f"concurrency {concurrency}", r["requests_per_s"], counted))
    entry = publish(
        compare(
            "serve_load",
            "requests/s",
            arms[1],
            arms[0],
            same=("requests", "images", "completion_tokens"),
            tolerance={"completion_tokens": TOKEN_TOLERANCE},
            goal=">= 3x",
            notes={
                "max_tokens": args.max_tokens,
                "image_size": args.image_size,
                "model": model_label,
            },
        )
    )
    return {"results": results, "ratio": entry.ratio, "refused": entry.refused}


def measure_chat(url: str, args: argparse.Namespace, label: str) -> dict[int, dict]:
    """/v1/chat/completions at each concurrency after a warm-up at 2, on the images
    after detection's (the same ones whichever server ``url`` is)."""

    def bodies(first_seed: int, count: int) -> list[dict]:
        return [chat_body(query_png(args.image_size, first_seed + i), args.max_tokens)
                for i in range(count)]  # fmt: skip

    detect_seeds = args.warmup + len(CONCURRENCY) * args.requests
    warmup_seed, first_seeds = arm_seeds(detect_seeds, args)
    warmup = asyncio.run(load(url, bodies(warmup_seed, args.warmup), 2, CHAT_ROUTE))
    if warmup["errors"]:
        print(f"{label} chat warm-up: {warmup['errors']} errors (first: {warmup['first_error']})")
    results = {}
    for concurrency, first_seed in zip(CONCURRENCY, first_seeds, strict=True):
        r = asyncio.run(load(url, bodies(first_seed, args.requests), concurrency, CHAT_ROUTE))
        print_result(f"{label} chat", r)
        results[concurrency] = r
    return results


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def chat_arm(label: str, r: dict) -> Arm:
    return Arm(label, r["requests_per_s"],
               {"requests": r["requests"], "images": r["images"], **r["usage"]})  # fmt: skip


def publish_vs_vllm(
    ours: dict[int, dict], theirs: dict[int, dict], args: argparse.Namespace, model_label: str
) -> list[dict]:
    """Per concurrency: our chat requests/s against vLLM's (published) and the latency
    ratios (printed; above 1 is slower than vLLM)."""
    entries = []
    for concurrency in CONCURRENCY:
        a, b = ours[concurrency], theirs[concurrency]
        latency = {f"{q}_ratio": ratio(a[f"{q}_ms"], b[f"{q}_ms"]) for q in ("p50", "p99")}
        entry = publish(
            compare(
                f"serve_chat_vs_vllm c{concurrency}",
                "requests/s",
                chat_arm(f"mmrad concurrency {concurrency}", a),
                chat_arm(f"vllm serve concurrency {concurrency}", b),
                same=("requests", "images", "prompt_tokens", "completion_tokens"),
                tolerance={"completion_tokens": TOKEN_TOLERANCE},
                goal=VS_VLLM_GOAL.get(concurrency),
                notes={
                    "p50_ms": [a["p50_ms"], b["p50_ms"]],
                    "p99_ms": [a["p99_ms"], b["p99_ms"]],
                    **latency,
                    "max_tokens": args.max_tokens,
                    "image_size": args.image_size,
                    "model": model_label,
                },
            )
        )
        print(f"  ours/vLLM at concurrency {concurrency}: requests/s "
              f"{ratio(a['requests_per_s'], b['requests_per_s']):.2f}x, p50 latency "
              f"{latency['p50_ratio']:.2f}x, p99 latency {latency['p99_ratio']:.2f}x",
              flush=True)  # fmt: skip
        entries.append({"concurrency": concurrency, "ours": a, "vllm": b, "ratio": entry.ratio,
                        "refused": entry.refused, **latency})  # fmt: skip
    return entries


def measure_vllm(
    model: str, serve_args: dict, args: argparse.Namespace, work: str
) -> dict[int, dict]:
    """vLLM's server on the replica's engine config: chat at each concurrency."""
    from mmrad.serve.config import ServeArgs

    engine = ServeArgs.model_validate(serve_args).engine  # as the replica reads it
    log = Path(work) / "vllm-serve.log"
    started = time.perf_counter()
    with vllm_server(model, engine, MODEL_NAME, log) as url:
        print(f"vllm serve ready in {time.perf_counter() - started:.0f} s at {url} "
              f"(log: {log})", flush=True)  # fmt: skip
        return measure_chat(url, args, "vllm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="Export directory (default: build the tiny model).")
    parser.add_argument("--requests", type=int, default=32, help="Requests per concurrency.")
    parser.add_argument("--warmup", type=int, default=4, help="Requests of the warm-up.")
    parser.add_argument("--max-tokens", type=int, default=64, help="Tokens per answer.")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--no-vllm", dest="vllm", action="store_false",
                        help="Skip the chat comparison with vLLM's server.")  # fmt: skip
    parser.add_argument("--out", help="Also write the figures as JSON here.")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="mmrad-serve-bench-")
    model = args.model
    if model is None:
        from mmrad.model.tiny import build_tiny_model

        model = str(build_tiny_model(Path(work) / "tiny"))
    model_label = args.model or "tiny (random weights)"
    serve_args = app_args(model, args.max_tokens, base_model=args.model is None)
    started = time.perf_counter()
    try:
        url = deploy_app(serve_args, work)
        print(f"deployed in {time.perf_counter() - started:.0f} s at {url}", flush=True)
        report = measure_detect(url, args, model_label)
        ours = measure_chat(url, args, "mmrad") if args.vllm else None
    finally:
        shut_down_app()
    if ours is not None:
        theirs = measure_vllm(model, serve_args, args, work)
        report["chat_vs_vllm"] = publish_vs_vllm(ours, theirs, args, model_label)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
