"""Decoded samples/s from S3 to resized arrays: Ray Data against a plain sequential loop.

Both read the same objects (query and reference image per record) from the same S3
server, decode them and resize them to the model grid. The baseline is what people write
by hand: one reused boto3 client and PIL in a loop. Ray Data runs the decode pipeline of
``mmrad.data.loading`` with the CPUs Ray is given; run with ``--cpus 1,2,4`` to see the
curve. Starts a local S3 server (SeaweedFS on 127.0.0.1) unless AWS_ENDPOINT_URL is set.

    make bench   # = scripts/loopback-netns .venv/bin/python benchmarks/data_throughput.py
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np
from PIL import Image

from mmrad.config import DataBuildConfig, PixelBudget, RayConfig
from mmrad.data.build import build_dataset
from mmrad.data.loading import DecodeSpec, rank_datasets
from mmrad.data.manifest import read_manifest
from mmrad.storage import Storage, split_s3
from mmrad.task.geometry import model_grid


def sequential_baseline(records, pixels: PixelBudget) -> float:
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    started = time.perf_counter()
    for record in records:
        for uri in (record["image_uri"], record["reference_uri"]):
            bucket, key = split_s3(uri)
            data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            image = Image.open(io.BytesIO(data)).convert("RGB")
            grid = model_grid(image.size, pixels.min_pixels, pixels.max_pixels, pixels.factor)
            np.asarray(image.resize(grid, Image.Resampling.BICUBIC))
    return len(records) / (time.perf_counter() - started)


def ray_data_rate(records, pixels: PixelBudget, cpus: int, state_dir: str) -> float:
    import ray

    from mmrad.ray_env import init_ray

    ray.shutdown()
    init_ray(RayConfig(num_cpus=cpus, state_dir=state_dir))
    ray.data.DataContext.get_current().enable_progress_bars = False
    spec = DecodeSpec(Storage(), pixels)
    # Steady state, as in training: every worker process started and its imports done.
    warm = rank_datasets(records[: 32 * cpus], spec, world_size=1, seed=0)[0]
    sum(1 for _ in warm.iter_batches(batch_size=16))
    (dataset,) = rank_datasets(records, spec, world_size=1, seed=0)
    started = time.perf_counter()
    count = sum(len(batch["id"]) for batch in dataset.iter_batches(batch_size=16))
    rate = count / (time.perf_counter() - started)
    ray.shutdown()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images-per-category", type=int, default=60)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--max-pixels", type=int, default=224 * 224)
    parser.add_argument("--cpus", default=str(os.cpu_count() or 2), help="e.g. 1,2,4")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="mmrad-bench-")
    server = None
    if not os.environ.get("AWS_ENDPOINT_URL"):
        from mmrad.s3local import LocalS3

        os.environ.setdefault("AWS_ACCESS_KEY_ID", "mmrad-bench")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "mmrad-bench-secret")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        server = LocalS3(f"{work}/s3").start()
        os.environ["AWS_ENDPOINT_URL"] = server.endpoint_url
    try:
        uri = "s3://mmrad-bench/synthetic"
        build_dataset(
            DataBuildConfig(
                out=uri,
                synthetic={
                    "images_per_category": args.images_per_category,
                    "image_size": args.image_size,
                },
            ),
            Storage(),
            progress=False,
        )
        records = read_manifest(Storage(), uri)
        pixels = PixelBudget(max_pixels=args.max_pixels)
        baseline = sequential_baseline(records, pixels)
        print(f"{len(records)} samples of {args.image_size}px (query + reference) from S3")
        print(f"sequential boto3 + PIL loop: {baseline:8.1f} samples/s")
        for cpus in [int(c) for c in args.cpus.split(",")]:
            rate = ray_data_rate(records, pixels, cpus, f"{work}/ray")
            print(
                f"Ray Data, {cpus} CPU(s):        {rate:8.1f} samples/s   "
                f"ratio {rate / baseline:.2f}x"
            )
    finally:
        if server:
            server.stop()


if __name__ == "__main__":
    main()
