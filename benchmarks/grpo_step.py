"""GRPO step time: one-step-off overlap against none, and a step's overhead at two sizes.

Runs the GRPO job in the same Ray session with the same config and steps, and reads the
runs' metrics (step 1, which includes start-up, left out):

- **overlap**: ``max_staleness: 1`` against ``0`` on the first model: mean step time,
  its split (rollout, reward, learner, sync, waiting for rollouts), the share of rollout
  time hidden behind learning, the weight sync's share of the step and the ratio of the
  two step times (the goal: at most 0.75 with overlap, on separate devices);
- **overhead**, at ``max_staleness: 0`` for each model: the part of a step that is not
  the engines' own sampling (``time/generation``), the learners' compute
  (``time/learner``) or the weight sync they wait through (``time/sync_critical``):
  coordinator, Ray calls, serialisation, prompt decoding, scoring (``time/overhead``;
  goal: under 5% of the step at the larger size).

The models: ``tiny``, the last ``make demo``'s SFT export (``runs/pipeline/latest/sft/
export``, as ``configs/local/grpo.yaml`` says; another: ``model.path=...``), and
``larger``, a random-weight Qwen2.5-VL-shaped model of tens of millions of parameters
(the tiny model's recipe at ``--hidden-size``/``--layers``) prompted as the config says.
Each arm counts the steps, samples and completion tokens it did; sampled lengths follow
the policy, which overlap changes (batches sample one version behind), so token counts
may differ by up to 10% and still give a ratio.

On a 2-core machine the rollout engines and the learners share the same cores, so the
overlap cannot hide compute: sampling while training only slows both. Placement options
put them on separate devices on a GPU node, e.g.

    python benchmarks/grpo_step.py --config configs/cluster/grpo.yaml --steps 6 \\
        --rollout-workers 4 --rollout-gpus 1 --learners 4 --learner-gpus 1

Locally, after ``make demo``:

    scripts/loopback-netns .venv/bin/python benchmarks/grpo_step.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from record import Arm, compare, publish

from mmrad.config import load_config
from mmrad.model.tiny import build_tiny_model
from mmrad.rl.config import GRPOJobConfig
from mmrad.rl.job import run_grpo
from mmrad.storage import Storage
from mmrad.train.metrics_log import read_metrics

SPLIT = ("time/rollout", "time/reward", "time/learner", "time/sync", "time/wait")
OVERHEAD_PARTS = (
    "time/generation", "time/learner", "time/sync_critical", "time/between_steps",
    "time/overhead",
)  # fmt: skip
TOKEN_TOLERANCE = 0.10  # sampled lengths follow the policy, which overlap changes


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


def measure(
    args: argparse.Namespace, staleness: int, model_overrides: list[str], label: str
) -> dict[str, float]:
    """Mean figures of the steady steps of one GRPO run, and the work it counted."""
    overrides = [
        f"algorithm.max_staleness={staleness}",
        f"schedule.max_steps={args.steps}",
        f"schedule.checkpoint_every={args.steps}",
        "schedule.sync_check_every=0",
        f"run.storage_path={args.storage}",
        f"run.name={label}-staleness-{staleness}-{int(time.time())}",
        *placement(args),
        *model_overrides,
        *args.overrides,
    ]
    job = load_config(GRPOJobConfig, args.config, overrides)
    result = run_grpo(job)
    rows = [r for r in read_metrics(Storage(), result.run_uri) if "time/step" in r]
    steady = rows[1:] or rows
    out = {key: statistics.mean(r.get(key, 0.0) for r in steady) for key in SPLIT}
    out |= {key: statistics.mean(r.get(key, 0.0) for r in steady) for key in OVERHEAD_PARTS}
    out["time/step"] = statistics.mean(r["time/step"] for r in steady)
    out["hidden"] = statistics.mean(r["time/rollout_hidden_share"] for r in steady)
    out["sync_share"] = statistics.mean(r["time/sync"] / r["time/step"] for r in steady)
    out["work"] = {
        "steps": len(steady),
        "samples": sum(r["rollout/samples"] for r in steady),
        "completion_tokens": round(
            sum(r["completions/mean_length"] * r["rollout/samples"] for r in steady)
        ),
    }
    return out


def model_overrides(size: str, args: argparse.Namespace) -> list[str]:
    """The config overrides that put the ``size`` model in: ``tiny`` is the config's own
    model (the demo's SFT export); ``larger`` a random model of tens of millions of
    parameters, built here."""
    if size == "tiny":
        return []
    model = build_tiny_model(
        Path(args.storage, "larger-model"), hidden_size=args.hidden_size, num_layers=args.layers
    )
    return [f"model.path={model}"]


def overlap_entry(runs: dict[int, dict]) -> None:
    print(f"\nGRPO step time, {runs[0]['work']['steps']} steady steps each, cpus={os.cpu_count()}")
    header = f"{'max_staleness':>14} {'step s':>8} " + " ".join(f"{k[5:]:>8}" for k in SPLIT)
    print(header + f" {'hidden':>7} {'sync %':>7}")
    for staleness, r in runs.items():
        split = " ".join(f"{r[k]:8.2f}" for k in SPLIT)
        print(
            f"{staleness:>14} {r['time/step']:8.2f} {split} {r['hidden']:7.0%} "
            f"{r['sync_share']:7.1%}"
        )
    publish(
        compare(
            "grpo_step_overlap",
            "seconds per GRPO step (tiny model)",
            Arm("max_staleness 1 (one step off)", runs[1]["time/step"], runs[1]["work"]),
            Arm("max_staleness 0 (on-policy)", runs[0]["time/step"], runs[0]["work"]),
            same=("steps", "samples", "completion_tokens"),
            tolerance={"completion_tokens": TOKEN_TOLERANCE},
            goal="<= 0.75x on separate devices",
            notes={"sync_share_on_policy": runs[0]["sync_share"]},
        )
    )


def overhead_entry(size: str, run: dict) -> None:
    """The step's overhead against the whole step (the same run: the same work)."""
    parts = ", ".join(f"{k[5:]} {run[k]:.2f} s" for k in OVERHEAD_PARTS)
    print(f"\n{size} model, max_staleness 0: step {run['time/step']:.2f} s = {parts}")
    publish(
        compare(
            f"grpo_step_overhead_{size}",
            f"seconds per GRPO step, {size} model, max_staleness 0",
            Arm("not sampling, learner compute or sync", run["time/overhead"], run["work"]),
            Arm("the whole step", run["time/step"], run["work"]),
            same=("steps", "samples"),
            goal="< 0.05x at the larger size",
            notes={key: run[key] for key in OVERHEAD_PARTS},
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/local/grpo.yaml")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--storage", default=None, help="Run folder (default: a temp dir).")
    parser.add_argument("--sizes", default="tiny,larger", help="overhead at these models")
    parser.add_argument("--hidden-size", type=int, default=512, help="of the larger model")
    parser.add_argument("--layers", type=int, default=10, help="of the larger model")
    parser.add_argument("--rollout-workers", type=int)
    parser.add_argument("--rollout-cpus", type=float)
    parser.add_argument("--rollout-gpus", type=float)
    parser.add_argument("--learners", type=int)
    parser.add_argument("--learner-cpus", type=float)
    parser.add_argument("--learner-gpus", type=float)
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args()
    args.storage = args.storage or tempfile.mkdtemp(prefix="mmrad-grpo-bench-")

    on_policy = {}
    for size in args.sizes.split(","):
        on_policy[size] = measure(args, 0, model_overrides(size, args), size)
        overhead_entry(size, on_policy[size])
    first = args.sizes.split(",")[0]
    one_off = measure(args, 1, model_overrides(first, args), first)
    overlap_entry({0: on_policy[first], 1: one_off})
    if (os.cpu_count() or 1) <= 4 and not args.rollout_gpus:
        print(
            "note: rollout engines and learners share this machine's few CPU cores, so "
            "sampling ahead cannot hide compute here (it competes for the same cores); "
            "the overlap pays off when engines and learners have devices of their own "
            "(--rollout-gpus / --learner-gpus on a GPU node)."
        )


if __name__ == "__main__":
    main()
