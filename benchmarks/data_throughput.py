"""Decoded samples/s from S3 to resized arrays: Ray Data against a plain sequential loop.

Both arms read the same records' images (a query and a reference each) from the same S3
server, decode them and resize them to the model grid, and keep decoded references the
same way, so they do the same decodes:

- baseline: what people write by hand, one reused boto3 client and PIL in a loop, with a
  dict of decoded references (one decode per distinct reference URI);
- candidate: Ray Data running ``mmrad.data.loading`` (``rank_datasets``) with ``--cpus``
  CPUs; each worker process keeps its own cache of decoded references.

Both first warm up on records that are not timed (other query images of the same
categories, so the same references), ordered so that every warm-up batch holds every
reference: after it the baseline's dict and every Ray worker's cache hold every
reference, as in training's steady state, where a handful of references serve
thousands of queries. (Cold caches cannot match: each Ray worker decodes each reference
once more.) The timed records' queries are decoded by neither warm-up.

Counted per arm over the timed records: ``samples`` produced (rows without an error),
``images_fetched`` (objects read from S3) and ``images_decoded``, the Ray side's from
the per-row counts that ``DecodeSpec(count_reads=True)`` adds, summed where the rows
are consumed. A Ray worker that missed a reference in the warm-up decodes it again, and
the entry says the counts differ instead of giving a ratio. One entry per ``--cpus``
value (``data_throughput_cpus<N>``, samples/s), against the same baseline run; run with
``--cpus 1,2,4`` to see the curve. Starts a local S3 server (SeaweedFS on 127.0.0.1)
unless AWS_ENDPOINT_URL is set.

    make bench   # = scripts/loopback-netns .venv/bin/python benchmarks/data_throughput.py
"""

from __future__ import annotations

import argparse
import io
import os
import random
import tempfile
import time
from collections import Counter, defaultdict

import numpy as np
from PIL import Image
from record import Arm, compare, publish

from mmrad.config import DataBuildConfig, PixelBudget, RayConfig
from mmrad.data.build import build_dataset
from mmrad.data.loading import RECORD_COLUMNS, DecodeSpec, rank_datasets
from mmrad.data.loading import build_dataset as decode_dataset
from mmrad.data.manifest import read_manifest
from mmrad.storage import Storage, split_s3
from mmrad.task.geometry import model_grid

BATCH_SIZE = 16


def split_records(records: list[dict], warmup: int) -> tuple[list[dict], list[dict]]:
    """Warm-up records and timed records, disjoint; the warm-up ones in whole rounds over
    the references (the rest are left out), so that every batch of them holds every
    reference."""
    shuffled = sorted(records, key=lambda r: r["id"])
    random.Random(0).shuffle(shuffled)
    warm, timed = shuffled[:warmup], shuffled[warmup:]
    by_reference: dict[str, list[dict]] = defaultdict(list)
    for record in warm:
        by_reference[record["reference_uri"]].append(record)
    if len(by_reference) > BATCH_SIZE:
        raise SystemExit(f"{len(by_reference)} references do not fit one batch of {BATCH_SIZE}")
    missing = {r["reference_uri"] for r in timed} - set(by_reference)
    if missing:
        raise SystemExit(f"the warm-up records miss {len(missing)} reference(s): more --warmup")
    rounds = zip(*by_reference.values(), strict=False)  # whole rounds only
    return [record for batch in rounds for record in batch], timed


def sequential_baseline(warm: list[dict], timed: list[dict], pixels: PixelBudget) -> Arm:
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    work: Counter = Counter(samples=0, images_fetched=0, images_decoded=0)

    def fetch_and_decode(uri: str) -> np.ndarray:
        bucket, key = split_s3(uri)
        data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        work["images_fetched"] += 1
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            grid = model_grid(image.size, pixels.min_pixels, pixels.max_pixels, pixels.factor)
            if grid != image.size:
                image = image.resize(grid, Image.Resampling.BICUBIC)
            array = np.asarray(image, dtype=np.uint8)
        work["images_decoded"] += 1
        return array

    references: dict[str, np.ndarray] = {}

    def run(records: list[dict]) -> None:
        for record in records:
            fetch_and_decode(record["image_uri"])
            uri = record["reference_uri"]
            if uri not in references:
                references[uri] = fetch_and_decode(uri)
            work["samples"] += 1

    run(warm)
    for key in work:  # count the timed run only
        work[key] = 0
    started = time.perf_counter()
    run(timed)
    seconds = time.perf_counter() - started
    return Arm("sequential boto3 + PIL loop", work["samples"] / seconds, dict(work))


def consume(dataset) -> Counter:
    """Read every row, as a training loop does, summing the per-row counts."""
    work: Counter = Counter(samples=0, images_fetched=0, images_decoded=0)
    for batch in dataset.iter_batches(batch_size=BATCH_SIZE):
        work["samples"] += int(sum(1 for error in batch["error"] if not error))
        work["images_fetched"] += int(batch["images_fetched"].sum())
        work["images_decoded"] += int(batch["images_decoded"].sum())
    return work


def ray_data_arm(
    warm: list[dict], timed: list[dict], pixels: PixelBudget, cpus: int, state_dir: str
) -> Arm:
    import ray

    from mmrad.ray_env import init_ray

    ray.shutdown()
    init_ray(RayConfig(num_cpus=cpus, state_dir=state_dir))
    ray.data.DataContext.get_current().enable_progress_bars = False
    spec = DecodeSpec(Storage(), pixels, count_reads=True)
    # Every worker process started, its imports done and its reference cache filled.
    rows = [{**{k: r[k] for k in RECORD_COLUMNS}, "position": i} for i, r in enumerate(warm)]
    consume(decode_dataset(rows, spec, BATCH_SIZE))
    (dataset,) = rank_datasets(timed, spec, world_size=1, seed=0, batch_size=BATCH_SIZE)
    started = time.perf_counter()
    work = consume(dataset)
    seconds = time.perf_counter() - started
    ray.shutdown()
    return Arm(f"Ray Data, {cpus} CPU(s)", work["samples"] / seconds, dict(work))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images-per-category", type=int, default=100)
    parser.add_argument(
        "--warmup",
        type=int,
        default=240,
        help="Records set aside for the warm-ups (whole rounds over the references are used).",
    )
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
        warm, timed = split_records(read_manifest(Storage(), uri), args.warmup)
        pixels = PixelBudget(max_pixels=args.max_pixels)
        print(
            f"{len(timed)} timed samples of {args.image_size}px (query + reference) from S3, "
            f"{len(warm)} others to warm up on; "
            f"{len({r['reference_uri'] for r in timed})} distinct references",
            flush=True,
        )
        baseline = sequential_baseline(warm, timed, pixels)
        for cpus in [int(c) for c in args.cpus.split(",")]:
            publish(
                compare(
                    f"data_throughput_cpus{cpus}",
                    "samples/s",
                    ray_data_arm(warm, timed, pixels, cpus, f"{work}/ray"),
                    baseline,
                    same=("samples", "images_fetched", "images_decoded"),
                    notes={"image_size": args.image_size, "max_pixels": args.max_pixels},
                )
            )
    finally:
        if server:
            server.stop()


if __name__ == "__main__":
    main()
