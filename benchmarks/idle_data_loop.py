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

from learning_sft import arm_options, prepare, run_arm, steady_rate
from record import Arm, compare, publish

from mmrad.data.idle_wait import SWITCH


def main() -> None:
    args = arm_options(__doc__.split("\n")[0])
    work, model, manifest = prepare("mmrad-idle-loop-", args.images)
    runs: dict[bool, list] = {True: [], False: []}
    for repeat in range(args.repeats):
        for rest in (False, True):
            name = f"{'rest' if rest else 'ray'}-{repeat}"
            env = {SWITCH: "1" if rest else "0"}
            runs[rest].append(run_arm(work, name, model, manifest, args.steps, env=env))
    arms = {}
    for rest, label in ((True, "loop rests while idle"), (False, "Ray's own loop")):
        rate, work_done = steady_rate(runs[rest], args.skip)
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
