"""SFT steps per second with Ray Data's scheduling loop resting while idle
(:mod:`mmrad.data.idle_wait`) against Ray's own loop, in the same run.

Each arm is one ``mmrad sft`` process of the learning recipe (configs/local/learning/
sft.yaml: the tiny model, 2 FSDP workers, 16 samples a step) on a synthetic set of its
data config with ``--images`` per category; the baseline sets ``MMRAD_DATA_IDLE_WAIT=0``.
Prints the steps per second of each arm over its logging windows after the first
``--skip`` (start-up and the first reads left out), the samples and tokens they counted
(the same batches in both arms: the same seed) and the ratio. Arms alternate,
``--repeats`` runs each.

    scripts/loopback-netns .venv/bin/python benchmarks/idle_data_loop.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean

from record import Arm, compare, publish

from mmrad.config import DataJobConfig, load_config
from mmrad.data.build import build_dataset
from mmrad.data.idle_wait import SWITCH
from mmrad.model.tiny import build_tiny_model
from mmrad.storage import Storage
from mmrad.train.metrics_log import read_metrics

REPO = Path(__file__).resolve().parents[1]
LOG_EVERY = 10


def learning_data(work: str, images: int) -> str:
    """The learning recipe's synthetic set with ``images`` per category: its manifest."""
    config = load_config(
        DataJobConfig,
        REPO / "configs/local/learning/data.yaml",
        [f"data.out={work}/data", f"data.synthetic.images_per_category={images}"],
    )
    return build_dataset(config.data, Storage(), progress=False).manifest_uri


def run_arm(work: str, name: str, model: str, manifest: str, steps: int, rest: bool) -> dict:
    """One SFT run; its steady windows' steps per second and counted work."""
    env = {**os.environ, SWITCH: "1" if rest else "0"}
    command = [
        sys.executable, "-m", "mmrad.cli", "sft", "--config",
        str(REPO / "configs/local/learning/sft.yaml"), f"model.path={model}",
        f"data.manifest={manifest}", f"run.storage_path={work}/runs", f"run.name={name}",
        f"schedule.max_steps={steps}", f"schedule.checkpoint_every={steps}",
        f"schedule.log_every={LOG_EVERY}", "validation.every=100000",
        f"ray.state_dir={work}/ray-{name}",
    ]  # fmt: skip
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, cwd=REPO)
    return [r for r in read_metrics(Storage(), f"{work}/runs/{name}") if "train/loss" in r]


def summary(runs: list[list[dict]], skip: int) -> tuple[float, dict[str, float]]:
    rates, samples, tokens = [], 0.0, 0.0
    for rows in runs:
        steady = rows[skip:]
        span = steady[-1]["time"] - rows[skip - 1]["time"]
        rates.append((steady[-1]["step"] - rows[skip - 1]["step"]) / span)
        samples += sum(r["perf/samples"] for r in steady)
        tokens += sum(r["perf/tokens"] for r in steady)
    return mean(rates), {"samples": samples, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=120, help="per category")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--skip", type=int, default=3, help="logging windows left out")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="mmrad-idle-loop-")
    model = str(build_tiny_model(f"{work}/tiny"))
    manifest = learning_data(work, args.images)
    runs: dict[bool, list] = {True: [], False: []}
    for repeat in range(args.repeats):
        for rest in (False, True):
            name = f"{'rest' if rest else 'ray'}-{repeat}"
            runs[rest].append(run_arm(work, name, model, manifest, args.steps, rest))
    arms = {}
    for rest, label in ((True, "loop rests while idle"), (False, "Ray's own loop")):
        rate, work_done = summary(runs[rest], args.skip)
        print(f"{label}: {rate:.3f} steps/s")
        arms[rest] = Arm(label, rate, work_done)
    publish(
        compare(
            "idle_data_loop",
            "SFT steps/s (learning recipe, 2 workers)",
            arms[True],
            arms[False],
            same=("samples", "tokens"),
            goal="> 1: Ray Data's idle loop no longer takes the trainers' cores",
        )
    )


if __name__ == "__main__":
    main()
