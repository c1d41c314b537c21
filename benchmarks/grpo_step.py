"""GRPO step time with one-step-off overlap (``max_staleness: 1``) against none (``0``).

Runs the GRPO job twice in the same Ray session, same config and steps, and prints from
the runs' metrics (step 1, which includes start-up, left out): the mean step time, its
split (rollout, reward, learner, sync, waiting for rollouts), the share of rollout time
hidden behind learning, the weight sync's share of the step, and the ratio of the two
step times (the goal: at most 0.75 with overlap, on separate devices).

On a 2-core machine the rollout engines and the learners share the same cores, so the
overlap cannot hide compute: sampling while training only slows both. Placement options
put them on separate devices on a GPU node, e.g.

    python benchmarks/grpo_step.py --config configs/cluster/grpo.yaml --steps 6 \\
        --rollout-workers 4 --rollout-gpus 1 --learners 4 --learner-gpus 1

Locally, after ``make demo`` (``configs/local/grpo.yaml`` starts from its SFT export,
``runs/pipeline/latest/sft/export``; another: ``model.path=...``):

    scripts/loopback-netns .venv/bin/python benchmarks/grpo_step.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from mmrad.config import load_config
from mmrad.rl.config import GRPOJobConfig
from mmrad.rl.job import run_grpo
from mmrad.storage import Storage
from mmrad.train.metrics_log import read_metrics

SPLIT = ("time/rollout", "time/reward", "time/learner", "time/sync", "time/wait")


def placement(args: argparse.Namespace) -> list[str]:
    """Overrides from the placement options (only those given)."""
    options = {
        "rollout.num_workers": args.rollout_workers,
        "rollout.cpus_per_worker": args.rollout_cpus,
        "rollout.gpus_per_worker": args.rollout_gpus,
        "learners.num_workers": args.learners,
        "learners.cpus_per_worker": args.learner_cpus,
        "learners.gpus_per_worker": args.learner_gpus,
    }
    overrides = [f"{key}={value}" for key, value in options.items() if value is not None]
    if args.learner_gpus:
        overrides.append("learners.use_gpu=true")
    return overrides


def measure(args: argparse.Namespace, staleness: int, storage: str) -> dict[str, float]:
    overrides = [
        f"algorithm.max_staleness={staleness}",
        f"schedule.max_steps={args.steps}",
        f"schedule.checkpoint_every={args.steps}",
        "schedule.sync_check_every=0",
        f"run.storage_path={storage}",
        f"run.name=staleness-{staleness}-{int(time.time())}",
        *placement(args),
        *args.overrides,
    ]
    job = load_config(GRPOJobConfig, args.config, overrides)
    result = run_grpo(job)
    rows = [r for r in read_metrics(Storage(), result.run_uri) if "time/step" in r]
    steady = rows[1:] or rows
    out = {key: statistics.mean(r.get(key, 0.0) for r in steady) for key in SPLIT}
    out["time/step"] = statistics.mean(r["time/step"] for r in steady)
    out["hidden"] = statistics.mean(r["time/rollout_hidden_share"] for r in steady)
    out["sync_share"] = statistics.mean(r["time/sync"] / r["time/step"] for r in steady)
    out["critical_sync_share"] = statistics.mean(
        r["time/sync_gather"] / r["time/step"] for r in steady
    )
    out["sync_kind"] = job.sync.weights
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/local/grpo.yaml")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--storage", default=None, help="Run folder (default: a temp dir).")
    parser.add_argument("--rollout-workers", type=int)
    parser.add_argument("--rollout-cpus", type=float)
    parser.add_argument("--rollout-gpus", type=float)
    parser.add_argument("--learners", type=int)
    parser.add_argument("--learner-cpus", type=float)
    parser.add_argument("--learner-gpus", type=float)
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args()
    storage = args.storage or tempfile.mkdtemp(prefix="mmrad-grpo-bench-")
    results = {staleness: measure(args, staleness, storage) for staleness in (0, 1)}

    print(f"\nGRPO step time, {args.steps} steps each (step 1 left out), cpus={os.cpu_count()}")
    header = f"{'max_staleness':>14} {'step s':>8} " + " ".join(f"{k[5:]:>8}" for k in SPLIT)
    print(header + f" {'hidden':>7} {'sync %':>7}")
    for staleness, r in results.items():
        split = " ".join(f"{r[k]:8.2f}" for k in SPLIT)
        print(
            f"{staleness:>14} {r['time/step']:8.2f} {split} {r['hidden']:7.0%} "
            f"{r['sync_share']:7.1%}"
        )
    ratio = results[1]["time/step"] / results[0]["time/step"]
    print(f"\nstep time ratio, staleness 1 / 0: {ratio:.2f}x (goal on separate devices: <= 0.75x)")
    print(
        f"{results[0]['sync_kind']} sync: {results[0]['sync_share']:.1%} of the step "
        f"(learner-side gather+push {results[0]['critical_sync_share']:.1%}; goal < 5%)"
    )
    if (os.cpu_count() or 1) <= 4 and not args.rollout_gpus:
        print(
            "note: rollout engines and learners share this machine's few CPU cores, so "
            "sampling ahead cannot hide compute here (it competes for the same cores); "
            "the overlap pays off when engines and learners have devices of their own "
            "(--rollout-gpus / --learner-gpus on a GPU node)."
        )


if __name__ == "__main__":
    main()
