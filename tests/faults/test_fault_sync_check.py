"""Fault row: an engine whose weights are not the learners' (its base model corrupted
behind the pool's back, as a faulty weight load would leave it). With
``schedule.sync_check_every: 1`` the next sync check stops the run, naming the weight
version and the size of the mismatch; a restarted learner group would not fix the
engines, so the coordinator refuses to start one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mmrad.rl.job import run_grpo
from mmrad.train.fail_fast import RunCannotRecover
from tests.helpers.faults import corrupt_engine_after, record_fault
from tests.helpers.grpo import grpo_config

pytestmark = pytest.mark.e2e
RUN = ("sync.weights=lora", "sync.transport=object_store", "algorithm.max_staleness=0",
       "rollout.prompts_per_step=2", "rollout.max_tokens=32", "schedule.max_steps=4",
       "schedule.checkpoint_every=4", "schedule.sync_check_every=1",
       "run.max_failures=1")  # fmt: skip
"""LoRA adapters through the object store: a sync never rewrites the base model, so the
corruption stays until a check finds it."""


def corrupted_base(export: str) -> dict:
    """The export's final norm, scaled: every token's log-prob changes."""
    from safetensors import safe_open

    with safe_open(str(Path(export) / "model.safetensors"), framework="pt") as tensors:
        return {"model.norm.weight": 5.0 * tensors.get_tensor("model.norm.weight")}


def test_a_corrupted_engine_fails_the_sync_check_naming_version_and_size(
    sft_trained, synthetic_local, tmp_path
):
    name = "corrupted-engine"
    export = sft_trained.export_uri
    corrupter, corrupted = corrupt_engine_after(name, 1, corrupted_base(export))
    with pytest.raises(RunCannotRecover) as failure:  # not Ray Train's retries: ended at once
        run_grpo(grpo_config(export, synthetic_local, str(tmp_path), name, *RUN))
    corrupter.join(timeout=60)

    assert corrupted, "the engine was not corrupted"
    found = re.search(
        r"sync check of weights v(\d+): the engines' log-probs of the probe differ from "
        r"the learners' by up to ([0-9.e+-]+) nats \(schedule.sync_check_tolerance=0.001\)",
        str(failure.value),
    )
    assert found, str(failure.value)[-2000:]
    version, size = int(found.group(1)), float(found.group(2))
    # the first check after the corruption: that of the corrupted version itself when it
    # ran after the corrupter (it waits for the engines to idle, not for that check)
    assert version >= corrupted[0]
    assert size > 0.1  # far above the tolerance: a real mismatch, not noise
    record_fault("grpo/engine weights corrupted behind the learners' back", {
        "fault": "an engine's base weights corrupted after v1 (LoRA through the object store)",
        "stage": "GRPO",
        "outcome": f"the sync check of v{version} stops the run: mismatch {size:.2f} nats; "
                   "no learner restart (it cannot fix the engines)",
        "prompts_lost": "n/a (run stopped)",
        "samples_repeated_or_skipped": "n/a",
        "seconds_to_recover": "n/a",
    })  # fmt: skip
