"""SFT throughput on Ray Train: 2 workers against 1 worker in the same run.

Runs the SFT job twice on the tiny model and the synthetic set (same steps, same per-worker
batch) and prints samples/s and tokens/s from the runs' metrics (first logging window,
which includes start-up, left out), the scaling ratio and the peak memory per worker.
On this 2-core machine the two workers share the cores with Ray Data's decoding, so the
ratio shows overhead more than scaling; on a GPU node each worker has its own device.

    scripts/loopback-netns .venv/bin/python benchmarks/sft_throughput.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from mmrad.config import DataBuildConfig, SFTJobConfig, load_config
from mmrad.data.build import build_dataset
from mmrad.model.tiny import build_tiny_model
from mmrad.sft.job import run_sft
from mmrad.storage import Storage
from mmrad.train.metrics_log import read_metrics


def measure(work: str, model: str, manifest: str, workers: int, steps: int) -> dict[str, float]:
    job = load_config(
        SFTJobConfig,
        "configs/local/sft.yaml",
        [
            f"model.path={model}",
            f"data.manifest={manifest}",
            f"run.storage_path={work}/runs",
            f"run.name=workers-{workers}",
            f"learners.num_workers={workers}",
            f"schedule.max_steps={steps}",
            "schedule.log_every=5",
            f"schedule.checkpoint_every={steps}",
            "schedule.epochs=50",
        ],
    )
    result = run_sft(job)
    rows = [r for r in read_metrics(Storage(), result.run_uri) if "perf/samples_per_s" in r]
    steady = rows[1:] or rows
    return {
        "samples_per_s": statistics.mean(r["perf/samples_per_s"] for r in steady),
        "tokens_per_s": statistics.mean(r["perf/tokens_per_s"] for r in steady),
        "peak_mb": max(r["perf/peak_memory_mb_per_worker"] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="mmrad-sft-bench-")
    model = str(build_tiny_model(f"{work}/tiny"))
    manifest = build_dataset(
        DataBuildConfig(out=f"{work}/data", synthetic={"image_size": 112}),
        Storage(),
        progress=False,
    ).manifest_uri
    results = {n: measure(work, model, manifest, n, args.steps) for n in (1, 2)}
    for workers, r in results.items():
        print(
            f"{workers} worker(s): {r['samples_per_s']:7.1f} samples/s  "
            f"{r['tokens_per_s']:9.0f} tokens/s  peak {r['peak_mb']:.0f} MB per worker"
        )
    ratio = results[2]["samples_per_s"] / results[1]["samples_per_s"]
    print(f"scaling ratio (2 workers / 1 worker): {ratio:.2f}x")


if __name__ == "__main__":
    main()
