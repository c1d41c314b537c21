"""SFT throughput on Ray Train: 2 workers against 1 worker in the same run.

Runs the SFT job twice on the tiny model and the synthetic set with the same per-worker
batch and the same number of samples: ``--windows`` logging windows of 40 samples (10
steps of 1 worker, 5 steps of 2 workers: twice the samples per step). Prints samples/s
and tokens/s from the runs' metrics (first logging window, which includes start-up, left
out), the samples and tokens each arm trained in the windows counted, the scaling ratio
and the peak memory per worker. On this 2-core machine the two workers share the cores
with Ray Data's decoding, so the ratio shows overhead more than scaling; on a GPU node
each worker has its own device.

    scripts/loopback-netns .venv/bin/python benchmarks/sft_throughput.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from record import Arm, compare, publish
from workload import tiny_model_and_data

from mmrad.config import SFTJobConfig, load_config
from mmrad.sft.job import run_sft
from mmrad.storage import Storage
from mmrad.train.metrics_log import read_metrics

SAMPLES_PER_WINDOW = 40  # a logging window: 10 steps of 1 worker, 5 of 2 workers


def measure(work: str, model: str, manifest: str, workers: int, samples: int) -> dict[str, float]:
    """One SFT run of ``workers`` over ``samples`` samples (4 per worker and step)."""
    per_step = 4 * workers  # configs/local/sft.yaml's micro-batch, no accumulation
    steps = samples // per_step
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
            f"schedule.log_every={SAMPLES_PER_WINDOW // per_step}",
            "learners.micro_batch_size=4",
            "learners.grad_accum=1",
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
        "work": {
            "samples": sum(r["perf/samples"] for r in steady),
            "tokens": sum(r["perf/tokens"] for r in steady),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=6, help="logging windows per run")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="mmrad-sft-bench-")
    model, manifest = tiny_model_and_data(work)
    samples = args.windows * SAMPLES_PER_WINDOW
    results = {n: measure(work, model, manifest, n, samples) for n in (1, 2)}
    for workers, r in results.items():
        print(
            f"{workers} worker(s): {r['samples_per_s']:7.1f} samples/s  "
            f"{r['tokens_per_s']:9.0f} tokens/s  peak {r['peak_mb']:.0f} MB per worker"
        )
    arms = {
        n: Arm(f"{n} worker{'s' * (n > 1)}", r["samples_per_s"], r["work"])
        for n, r in results.items()
    }
    publish(
        compare(
            "sft_throughput",
            "SFT samples/s (tiny model)",
            arms[2],
            arms[1],
            # padding follows how the samples fall into batches, so tokens differ a little
            same=("samples", "tokens"),
            tolerance={"tokens": 0.05},
            goal="-> 2x with a device per worker",
        )
    )


if __name__ == "__main__":
    main()
