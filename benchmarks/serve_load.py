"""Serving throughput: a bounded load on /v1/detect at concurrency 1 and 8, same run.

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

Detection decodes greedily and stops at end-of-sequence, so an answer's length depends
on its image: the arms' token counts may differ by up to 5% (the declared tolerance)
and still give a ratio. Without ``--model`` it builds the tiny random model (its answers
are noise, mostly ``--max-tokens`` long; the work per request is real: prefill of the
image and prompt, and the decoding steps counted).

    scripts/loopback-netns .venv/bin/python benchmarks/serve_load.py
    scripts/loopback-netns .venv/bin/python benchmarks/serve_load.py --model EXPORT_DIR
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from record import Arm, compare, publish

CONCURRENCY = (1, 8)
TOKEN_TOLERANCE = 0.05  # greedy answers stop at end-of-sequence: lengths follow the images
ROUTE = "/v1/detect"


def query_png(size: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def body_images(body: dict) -> int:
    return sum(1 for key in ("image", "reference") if body.get(key))


async def load(url: str, bodies: list[dict], concurrency: int) -> dict[str, float]:
    """Send every body with at most ``concurrency`` in flight; latency per request and
    the images of the answered ones."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    images = 0
    queue: asyncio.Queue = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal images
        while not queue.empty():
            body = queue.get_nowait()
            start = time.perf_counter()
            try:
                response = await client.post(f"{url}{ROUTE}", json=body)
                if response.status_code != 200:
                    errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                    continue
            except httpx.HTTPError as err:
                errors.append(f"{type(err).__name__}: {err}")
                continue
            latencies.append(time.perf_counter() - start)
            images += body_images(body)

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


def deploy_app(model: str, work: str, max_tokens: int, base_model: bool) -> str:
    from mmrad.config import RayConfig
    from mmrad.ray_env import init_ray
    from mmrad.serve.config import application, serve_config, validate_serve_config
    from mmrad.serve.deploy import deploy

    args = {
        "model_dir": model,
        "model_name": "bench",
        "max_tokens": max_tokens,
        "engine": {"kv_cache_bytes": 128 * 2**20, "max_num_seqs": 32, "max_model_len": 2048},
    }
    if base_model:  # the tiny model has no mmrad.json: say how to prompt it
        args |= {"prompt": {"use_reference": False}}
    app = application(args, max_ongoing_requests=32, num_cpus=0.5)
    init_ray(RayConfig(num_cpus=2, state_dir=f"{work}/ray"))
    urls = deploy(validate_serve_config(serve_config([app]), "benchmark"))
    return urls["mmrad"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="Export directory (default: build the tiny model).")
    parser.add_argument("--requests", type=int, default=32, help="Requests per concurrency.")
    parser.add_argument("--warmup", type=int, default=4, help="Requests of the warm-up.")
    parser.add_argument("--max-tokens", type=int, default=64, help="Tokens per answer.")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--out", help="Also write the figures as JSON here.")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="mmrad-serve-bench-")
    model = args.model
    if model is None:
        from mmrad.model.tiny import build_tiny_model

        model = str(build_tiny_model(Path(work) / "tiny"))
    started = time.perf_counter()
    url = deploy_app(model, work, args.max_tokens, base_model=args.model is None)
    print(f"deployed in {time.perf_counter() - started:.0f} s at {url}", flush=True)

    def bodies(first_seed: int, count: int) -> list[dict]:
        return [{"image": query_png(args.image_size, first_seed + i), "category": "brick"}
                for i in range(count)]  # fmt: skip

    counters = ServerCounters()
    # Warm-up (first-request costs out of the figures) on images no timed request sends.
    warmup = asyncio.run(load(url, bodies(0, args.warmup), 2))
    before = counters.after(warmup["requests"])
    results, arms = [], []
    for index, concurrency in enumerate(CONCURRENCY):
        first_seed = args.warmup + index * args.requests
        r = asyncio.run(load(url, bodies(first_seed, args.requests), concurrency))
        totals = counters.after(r["requests"])
        r["completion_tokens"] = totals["completion_tokens"] - before["completion_tokens"]
        r["server_requests"] = totals["requests"] - before["requests"]
        before = totals
        results.append(r)
        print(f"concurrency {r['concurrency']}: {r['requests_per_s']:.2f} req/s, "
              f"p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, "
              f"{r['requests']} ok, {r['errors']} errors"
              + (f" (first: {r['first_error']})" if r["first_error"] else ""),
              flush=True)  # fmt: skip
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
                "model": args.model or "tiny (random weights)",
            },
        )
    )
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {"results": results, "ratio": entry.ratio, "refused": entry.refused}, indent=2
            )
        )

    from ray import serve

    serve.shutdown()


if __name__ == "__main__":
    main()
