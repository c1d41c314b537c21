"""A reward-weight sweep with rollout engines kept across trials against one that starts
them per trial, in the same run.

Runs the same small FIFO sweep twice on one local Ray (the tiny model, a synthetic set):
``--trials`` trials one after another, ``--steps`` GRPO steps each, one vLLM engine per
trial; once with ``trial.reuse_engines=true`` (Tune reuses the trial's process, which
keeps the engine, reset to the starting weights, for the next trial) and once with it
off (each trial's GRPO run starts its own engine). Prints each arm's wall time and the
work it counted: trials run, GRPO steps done (the trials' metrics) and engines started
(RolloutWorker actors Ray created), then the ratio. The arm with reuse runs first, so
it pays the cold start of Ray's worker processes.

    scripts/loopback-netns .venv/bin/python benchmarks/sweep_reuse.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml
from record import Arm, compare, publish
from workload import tiny_model_and_data

from mmrad.config import RayConfig, load_config, read_yaml
from mmrad.ray_env import init_ray
from mmrad.storage import Storage
from mmrad.train.metrics_log import read_metrics
from mmrad.tune.config import TuneJobConfig
from mmrad.tune.job import TRIAL_RUNS, run_tune

GRPO = [  # a short GRPO on the 2 cores: 1 engine, 1 learner
    "model.pixels.max_pixels=12544",
    "data.pixels.max_pixels=12544",
    "data.decode_cpus=0.1",
    "engine.kv_cache_bytes=67108864",
    "rollout.cpus_per_worker=0.4",
    "learners.cpus_per_worker=0.4",
    "learners.num_workers=1",
    "rollout.max_tokens=32",
]


def sweep_config(work: str, model: str, manifest: str, args, reuse: bool) -> Path:
    name = f"reuse-{str(reuse).lower()}"
    data = read_yaml("configs/local/tune.yaml")
    data["grpo"]["overrides"] += [
        f"model.path={model}", f"data.manifest={manifest}", f"run.storage_path={work}/grpo",
        *GRPO, f"schedule.max_steps={args.steps}", f"schedule.checkpoint_every={args.steps}",
    ]  # fmt: skip
    data["run"] = {"storage_path": f"{work}/sweeps", "name": name, "loggers": []}
    data.update(num_samples=args.trials, val_samples=2, scheduler={"kind": "fifo"})
    data["trial"] = {**data["trial"], "reuse_engines": reuse}
    path = Path(work) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def engines_started() -> int:
    """RolloutWorker actors this Ray has created (alive or not)."""
    from ray._private.state import state

    actors = state.actor_table(None).values()
    return sum(1 for actor in actors if actor["ActorClassName"] == "RolloutWorker")


def run_arm(config: Path, label: str) -> Arm:
    engines = engines_started()
    start = time.perf_counter()
    result = run_tune(load_config(TuneJobConfig, config))
    seconds = time.perf_counter() - start
    runs = sorted(Path(result.sweep_uri, TRIAL_RUNS).iterdir())
    steps = sum(
        1 for run in runs for row in read_metrics(Storage(), str(run)) if "reward/total/mean" in row
    )
    work = {"trials": result.trials, "steps": steps, "engines": engines_started() - engines}
    return Arm(label, seconds, work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=3, help="trials per sweep")
    parser.add_argument("--steps", type=int, default=1, help="GRPO steps per trial")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="mmrad-sweep-bench-")
    model, manifest = tiny_model_and_data(work)
    init_ray(RayConfig(num_cpus=2, warm_workers=6))
    arms = {
        reuse: run_arm(
            sweep_config(work, model, manifest, args, reuse),
            "engines kept across trials" if reuse else "engines started per trial",
        )
        for reuse in (True, False)
    }
    for arm in arms.values():
        print(f"{arm.label}: {arm.value:.1f} s  ({arm.work})")
    publish(
        compare(
            "sweep_reuse",
            f"seconds for a FIFO sweep of {args.trials} trials x {args.steps} GRPO step(s)",
            arms[True],
            arms[False],
            same=("trials", "steps"),
            goal="< 1 (engine start-up paid once per sweep, not per trial)",
            notes={"engines": {a.label: a.work["engines"] for a in arms.values()}},
        )
    )


if __name__ == "__main__":
    main()
