"""Serving throughput: a bounded load on /v1/detect at concurrency 1 and 8, same run.

Deploys the mmrad Serve application (one replica, so the gain is the engine's continuous
batching, not more replicas) on a local Ray, sends ``--requests`` detections at each
concurrency (after a short warm-up) and prints requests/s, p50/p99 latency, errors, and
the ratio of requests/s at 8 to 1 (goal: at least 3x). Without ``--model`` it builds the
tiny random model (its answers are noise; the work per request is real: prefill of the
image and prompt, ``--max-tokens`` decoding steps).

    scripts/loopback-netns .venv/bin/python benchmarks/serve_load.py
    scripts/loopback-netns .venv/bin/python benchmarks/serve_load.py --model EXPORT_DIR
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CONCURRENCY = (1, 8)


def query_png(size: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def load(url: str, bodies: list[dict], concurrency: int) -> dict[str, float]:
    """Send every body with at most ``concurrency`` in flight; latency per request."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    queue: asyncio.Queue = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            start = time.perf_counter()
            try:
                response = await client.post(f"{url}/v1/detect", json=body)
                if response.status_code != 200:
                    errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                    continue
            except httpx.HTTPError as err:
                errors.append(f"{type(err).__name__}: {err}")
                continue
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": len(errors),
        "requests_per_s": len(latencies) / seconds,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "mean_ms": 1000 * statistics.mean(latencies) if latencies else float("nan"),
        "first_error": errors[0] if errors else None,
    }


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

    bodies = [{"image": query_png(args.image_size, i), "category": "brick"}
              for i in range(args.requests)]  # fmt: skip
    asyncio.run(load(url, bodies[:2], 2))  # warm-up: first-request costs out of the figures
    results = [asyncio.run(load(url, bodies, c)) for c in CONCURRENCY]
    for r in results:
        print(f"concurrency {r['concurrency']}: {r['requests_per_s']:.2f} req/s, "
              f"p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, "
              f"{r['requests']} ok, {r['errors']} errors"
              + (f" (first: {r['first_error']})" if r["first_error"] else ""))  # fmt: skip
    ratio = results[1]["requests_per_s"] / results[0]["requests_per_s"]
    print(f"ratio 8 vs 1: {ratio:.2f}x (goal >= 3x)")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "ratio": ratio}, indent=2))

    from ray import serve

    serve.shutdown()


if __name__ == "__main__":
    main()
