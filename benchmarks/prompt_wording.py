"""SFT steps per second of the learning recipe with the terse prompt wording against the
paper's full one, in the same run (``prompt.wording``, :mod:`mmrad.task.prompt`).

Each arm is one ``mmrad sft`` process of the learning recipe on a synthetic set of its
data config with ``--images`` per category, the same seed and so the same samples; only
the prompt's words differ, so the arms count the same samples and different tokens (the
tokens per sample are printed). Arms alternate, ``--repeats`` runs each.

    scripts/loopback-netns .venv/bin/python benchmarks/prompt_wording.py
"""

from __future__ import annotations

from learning_sft import arm_options, prepare, run_arm, steady_rate
from record import Arm, compare, publish

WORDINGS = {"terse": "terse wording", "full": "full wording"}


def main() -> None:
    args = arm_options(__doc__.split("\n")[0])
    work, model, manifest = prepare("mmrad-prompt-wording-", args.images)
    runs: dict[str, list] = {wording: [] for wording in WORDINGS}
    for repeat in range(args.repeats):
        for wording in ("full", "terse"):
            overrides = (f"prompt.wording={wording}",)
            name = f"{wording}-{repeat}"
            runs[wording].append(run_arm(work, name, model, manifest, args.steps, overrides))
    arms = {}
    for wording, label in WORDINGS.items():
        rate, work_done = steady_rate(runs[wording], args.skip)
        per_sample = work_done["tokens"] / work_done["samples"]
        print(f"{label}: {rate:.3f} steps/s, {per_sample:.0f} tokens a sample")
        arms[wording] = (Arm(label, rate, {"samples": work_done["samples"]}), per_sample)
    (terse, terse_tokens), (full, full_tokens) = arms["terse"], arms["full"]
    publish(
        compare(
            "prompt_wording",
            "SFT steps/s (learning recipe, 2 workers)",
            terse,
            full,
            same=("samples",),
            goal="> 1: the terse prompt's fewer tokens make each step shorter",
            notes={"tokens_per_sample": {"terse": round(terse_tokens), "full": round(full_tokens)}},
        )
    )


if __name__ == "__main__":
    main()
