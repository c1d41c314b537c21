"""Fault rows of one GRPO run (real Ray, vLLM and 2 FSDP2 learners, LoRA merged over
the gloo weight channel, ``max_staleness: 0``; the engine core runs in the rollout
actor), injected in sequence, each at its critical moment:

1. the rollout engine SIGKILLed while it receives weights: the test freezes its process
   (SIGSTOP) while it idles before a sync, waits until the coordinator reports the
   receive in flight, then kills it. The learners' send is called off at once (not at
   the channel's 600 s timeout); the replacement gets the weights sent again;
2. that replacement killed the same way at the next sync;
3. a learner SIGKILLed while both ranks wait in ``Coordinator.shard`` for a batch being
   made: Ray Train restarts the learners from the last checkpoint; the dead group's
   waiting calls leave as stale and take no batch from the new group.

Afterwards the run's final checkpoint equals an uninterrupted run's: the same prompts,
samples and weights, nothing lost or repeated."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from mmrad.rl.job import run_grpo
from mmrad.storage import Storage
from tests.helpers.checkpoints import differences, latest_checkpoint, read_checkpoint
from tests.helpers.faults import (
    a_learner,
    kill_rollout_engines_while_they_receive,
    kill_while_learners_wait_in_shard,
    record_fault,
)
from tests.helpers.grpo import EXACT_RUN, EXACT_STEPS, grpo_config, steps_of

pytestmark = pytest.mark.e2e


def test_engines_killed_in_syncs_and_a_learner_killed_in_shard_change_nothing(
    grpo_uninterrupted, sft_trained, synthetic_local, tmp_path
):
    name = "faults"
    engines, kills = kill_rollout_engines_while_they_receive(name, count=2)
    learner, killed_learners = kill_while_learners_wait_in_shard(
        name, after_step=2, victim=a_learner, after=engines
    )
    result = run_grpo(grpo_config(sft_trained.export_uri, synthetic_local, str(tmp_path), name,
                                  *EXACT_RUN, "run.max_failures=1"))  # fmt: skip
    learner.join(timeout=60)

    assert [kill.worker for kill in kills] == ["rollout-0", "rollout-0.1"], "a kill did not fire"
    assert kills[0].version < kills[1].version
    assert len(killed_learners) == 1, "no learner was killed"
    rows = steps_of(result.run_uri)
    assert [row["step"] for row in rows][-1] == EXACT_STEPS
    assert sum(row["sync/failed_sends"] for row in rows) >= 2  # one per engine kill
    assert all(row["sync/timed_out_sends"] == 0 for row in rows)  # called off, not waited out
    assert all(row["rollout/incomplete_groups"] == 0 for row in rows)
    healed = read_checkpoint(Storage(), latest_checkpoint(Storage(), result.run_uri))
    assert differences(healed, grpo_uninterrupted) == []  # same prompts, samples, weights

    same = {"prompts_lost": 0, "samples_repeated_or_skipped": 0, "stage": "GRPO"}
    record_fault("grpo/1 rollout engine killed during a weight sync", {
        **same, "fault": "rollout engine SIGKILLed while it receives weights (channel)",
        "outcome": "send called off, engine replaced, weights sent again; equals a clean run",
        "seconds_to_recover": round(kills[0].seconds_to_recover, 1), "kill": asdict(kills[0]),
    })  # fmt: skip
    record_fault("grpo/2 its replacement killed during the next sync", {
        **same, "fault": "the replacement SIGKILLed while it receives the next weights",
        "outcome": "as above, a second time; equals a clean run",
        "seconds_to_recover": round(kills[1].seconds_to_recover, 1), "kill": asdict(kills[1]),
    })  # fmt: skip
    record_fault("grpo/3 learner killed while its ranks wait in shard", {
        **same, "fault": "a learner SIGKILLed while both ranks wait for a batch (max_staleness 0)",
        "outcome": "learners restart from the last checkpoint; stale calls take nothing; "
                   "equals a clean run",
        "seconds_to_recover": "n/a (a learner restart)",
    })  # fmt: skip
