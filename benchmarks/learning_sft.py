"""Short ``mmrad sft`` runs of the learning recipe (configs/local/learning/: the tiny
model, 2 FSDP workers, 16 samples a step) for benchmarks that compare two settings of
it: the data, one run per arm, and its steady steps per second."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean

from mmrad.config import DataJobConfig, load_config
from mmrad.data.build import build_dataset
from mmrad.model.tiny import build_tiny_model
from mmrad.storage import Storage
from mmrad.train.metrics_log import read_metrics

REPO = Path(__file__).resolve().parents[1]
LOG_EVERY = 10


def arm_options(description: str) -> argparse.Namespace:
    """The options every such benchmark takes: data size, steps, windows left out, repeats."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--images", type=int, default=120, help="per category")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--skip", type=int, default=3, help="logging windows left out")
    parser.add_argument("--repeats", type=int, default=1)
    return parser.parse_args()


def prepare(prefix: str, images: int) -> tuple[str, str, str]:
    """A work folder, the tiny model in it and the recipe's data set with ``images`` per
    category: ``(work, model, manifest)``."""
    work = tempfile.mkdtemp(prefix=prefix)
    model = str(build_tiny_model(f"{work}/tiny"))
    return work, model, learning_data(work, images)


def learning_data(work: str, images: int) -> str:
    """The learning recipe's synthetic set with ``images`` per category: its manifest."""
    config = load_config(
        DataJobConfig,
        REPO / "configs/local/learning/data.yaml",
        [f"data.out={work}/data", f"data.synthetic.images_per_category={images}"],
    )
    return build_dataset(config.data, Storage(), progress=False).manifest_uri


def run_arm(
    work: str,
    name: str,
    model: str,
    manifest: str,
    steps: int,
    overrides: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> list[dict]:
    """One SFT run under ``overrides`` and ``env`` (added to this process's); its rows of
    training metrics."""
    command = [
        sys.executable, "-m", "mmrad.cli", "sft", "--config",
        str(REPO / "configs/local/learning/sft.yaml"), f"model.path={model}",
        f"data.manifest={manifest}", f"run.storage_path={work}/runs", f"run.name={name}",
        f"schedule.max_steps={steps}", f"schedule.checkpoint_every={steps}",
        f"schedule.log_every={LOG_EVERY}", "validation.every=100000",
        f"ray.state_dir={work}/ray-{name}", *overrides,
    ]  # fmt: skip
    subprocess.run(command, check=True, env={**os.environ, **(env or {})},
                   stdout=subprocess.DEVNULL, cwd=REPO)  # fmt: skip
    return [r for r in read_metrics(Storage(), f"{work}/runs/{name}") if "train/loss" in r]


def steady_rate(runs: list[list[dict]], skip: int) -> tuple[float, dict[str, float]]:
    """Mean steps per second over each run's logging windows after the first ``skip``
    (start-up and the first reads left out), and the samples and tokens they counted."""
    rates, samples, tokens = [], 0.0, 0.0
    for rows in runs:
        steady = rows[skip:]
        span = steady[-1]["time"] - rows[skip - 1]["time"]
        rates.append((steady[-1]["step"] - rows[skip - 1]["step"]) / span)
        samples += sum(r["perf/samples"] for r in steady)
        tokens += sum(r["perf/tokens"] for r in steady)
    return mean(rates), {"samples": samples, "tokens": tokens}
