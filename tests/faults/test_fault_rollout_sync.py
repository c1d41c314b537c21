"""Fault row: a rollout engine killed during a weight sync over the channel, then its
replacement killed the same way at the next sync (a GRPO run, real Ray, vLLM and FSDP2
learners, LoRA merged over gloo; the engine core runs in the rollout actor).

Each kill lands while the engine's receive is in flight: the test freezes the rollout
process (SIGSTOP) while it idles before a sync, waits until the coordinator reports its
receive of the new weights in flight, and SIGKILLs it. The learners' send is called off
at once (not at the channel's 600 s timeout), the replacement gets the weights sent
again, and the run trains exactly what an uninterrupted run does."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from mmrad.rl.job import run_grpo
from mmrad.storage import Storage
from tests.helpers.checkpoints import differences, latest_checkpoint, read_checkpoint
from tests.helpers.faults import kill_rollout_engines_while_they_receive, record_fault
from tests.helpers.grpo import EXACT_RUN, EXACT_STEPS, grpo_config, steps_of

pytestmark = pytest.mark.e2e


def test_rollout_engine_killed_during_a_sync_and_its_replacement_too(
    grpo_uninterrupted, sft_trained, synthetic_local, tmp_path
):
    name = "sync-faults"
    saboteur, kills = kill_rollout_engines_while_they_receive(name, count=2)
    result = run_grpo(grpo_config(sft_trained.export_uri, synthetic_local, str(tmp_path), name,
                                  *EXACT_RUN))  # fmt: skip
    saboteur.join(timeout=60)

    assert [kill.worker for kill in kills] == ["rollout-0", "rollout-0.1"], "a kill did not fire"
    assert kills[0].version < kills[1].version
    rows = steps_of(result.run_uri)
    assert [row["step"] for row in rows] == list(range(1, EXACT_STEPS + 1))
    assert rows[-1]["rollout/workers_replaced"] == 2
    assert sum(row["sync/failed_sends"] for row in rows) == 2  # one per kill
    assert all(row["sync/timed_out_sends"] == 0 for row in rows)  # called off, not waited out
    assert all(row["rollout/incomplete_groups"] == 0 for row in rows)
    healed = read_checkpoint(Storage(), latest_checkpoint(Storage(), result.run_uri))
    assert differences(healed, grpo_uninterrupted) == []  # same prompts, samples, weights

    record_fault("grpo/rollout engine killed during a weight sync, then its replacement", {
        "fault": "rollout engine SIGKILLed while it receives weights (channel), twice in a row",
        "stage": "GRPO",
        "outcome": "send called off, engine replaced, weights sent again; run equals a clean run",
        "prompts_lost": 0,
        "samples_repeated_or_skipped": 0,
        "seconds_to_recover": [round(kill.seconds_to_recover, 1) for kill in kills],
        "kills": [asdict(kill) for kill in kills],
    })  # fmt: skip
