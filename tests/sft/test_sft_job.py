"""SFT on a real local Ray cluster: Ray Train V2, FSDP over gloo, 2 CPU workers: resume
proven against an uninterrupted run (local and S3, rerun and a killed worker), with a
negative control. Full-weight FSDP2 training is checked on the session's ``sft_trained``
run (tests/sft/test_sft_quality.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mmrad.config import ConfigError
from mmrad.model.export import read_export_info
from mmrad.sft.job import run_sft
from mmrad.storage import Storage, join
from mmrad.train.metrics_log import read_metrics
from tests.conftest import TEST_BUCKET
from tests.helpers.checkpoints import (
    committed_step,
    differences,
    drop_optimizer_state,
    latest_checkpoint,
    read_checkpoint,
)
from tests.helpers.faults import record_s3_faults, s3_faults
from tests.helpers.processes import kill_one_when, train_workers
from tests.helpers.tracking import artifact_names, assert_tracked_as_its_table
from tests.sft.helpers import sft_config

pytestmark = pytest.mark.e2e


def losses(run_uri: str) -> list[float]:
    return [row["train/loss"] for row in read_metrics(Storage(), run_uri) if "train/loss" in row]


def loss_steps(run_uri: str) -> list[int]:
    return [row["step"] for row in read_metrics(Storage(), run_uri) if "train/loss" in row]


def final_checkpoint(run_uri: str) -> dict:
    return read_checkpoint(Storage(), latest_checkpoint(Storage(), run_uri))


def run_with_a_kill(job, after_step: int):
    """Run ``job`` while a Train worker is SIGKILLed once Ray Train has committed the
    checkpoint of ``after_step``; returns the result, or the error when the run failed
    (``run.max_failures=0``)."""
    run_uri = join(job.run.storage_path, job.run.name)
    ready = lambda: committed_step(Storage(), run_uri) >= after_step  # noqa: E731
    killer, killed = kill_one_when(ready, train_workers)
    try:
        outcome = run_sft(job)
    except Exception as err:  # the stop that a rerun continues from
        outcome = err
    killer.join()
    assert killed, "no Train worker was killed"
    return outcome


def stopped_at_step_4(*args) -> list[dict]:
    """The first part of an interrupted run: a worker dies after the step-4 checkpoint is
    committed and, with no restarts allowed, the run fails. Returns the metrics rows of
    the committed steps, which a rerun that resumes (rather than starts over) keeps as
    they are. The rerun uses the very same config (a first run with ``max_steps=4``
    would have another learning-rate schedule)."""
    job = sft_config(*args, *RESUME, "run.max_failures=0")
    assert isinstance(run_with_a_kill(job, 4), Exception), "the run was meant to stop"
    run_uri = join(job.run.storage_path, job.run.name)
    step = committed_step(Storage(), run_uri)
    assert 2 <= step < STEPS - 1  # at least 2 steps before and 2 after the interruption
    return [row for row in read_metrics(Storage(), run_uri) if row["step"] <= step]


def assert_resumed_from(before: list[dict], run_uri: str) -> None:
    """The rerun kept the first part's rows of its committed steps to the letter (their
    timestamps included): it resumed there. A run that started over would have logged
    them anew."""
    rows = read_metrics(Storage(), run_uri)
    assert rows[: len(before)] == before


STEPS = 8
RESUME = ("lora.enabled=true", "learners.fsdp.version=1", f"schedule.max_steps={STEPS}",
          "schedule.checkpoint_every=2", "schedule.epochs=2", "run.max_failures=2",
          "learners.micro_batch_tokens=700")  # fmt: skip
"""FSDP1 with LoRA and micro-batches by a token budget here; full weights on FSDP2 are the
session's ``sft_trained``, FSDP2 with LoRA the GRPO learners'. The learning rate is > 0
and changes every step (cosine)."""


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tiny_model, synthetic_local, tmp_path_factory):
    """The reference: the same 8 steps without any interruption; its final checkpoint."""
    job = sft_config(tiny_model, synthetic_local, str(tmp_path_factory.mktemp("clean")), "clean",
                     *RESUME)  # fmt: skip
    return final_checkpoint(run_sft(job).run_uri)


@pytest.fixture(scope="module")
def stopped_local(ray_cluster, tiny_model, synthetic_local, tmp_path_factory):
    """One local run stopped after its step-4 checkpoint (:func:`stopped_at_step_4`), run
    once for the two tests that rerun it on local disk: the rerun test continues it where
    it is; a copy of it, made right after the stop, is what the negative control reruns
    (the same run name in a folder of its own: its checkpoints, metrics and run files
    as the stop left them). Returns the run's storage folder, the copy's, and the
    metrics rows of its committed steps."""
    storage = tmp_path_factory.mktemp("stopped")
    before = stopped_at_step_4(tiny_model, synthetic_local, str(storage), STOPPED)
    pristine = tmp_path_factory.mktemp("stopped-copy")
    shutil.copytree(storage / STOPPED, pristine / STOPPED, symlinks=True)
    return storage, pristine, before


STOPPED = "again"


def assert_same_as_uninterrupted(resumed: dict, uninterrupted: dict) -> None:
    """Exactly equal on CPU (float32, gloo, one thread order): the weights, AdamW's
    moments and step counts, the scheduler and its learning rate, every rank's RNG
    states, and the data position with every trained sample id in order."""
    assert any(key.startswith("optim.state.") and key.endswith("exp_avg_sq") for key in resumed)
    assert {"rng_rank0", "rng_rank1", "scheduler"} <= resumed.keys()
    assert resumed["trainer_state"]["step"] == STEPS
    assert len(resumed["trainer_state"]["extra"]["trained_ids"]) == STEPS * 2 * 4
    assert differences(resumed, uninterrupted) == []


def test_rerun_and_a_killed_worker_continue_exactly(uninterrupted, stopped_local, tiny_model,
                                                     synthetic_local):  # fmt: skip
    """One run interrupted twice, on local disk: it stops after its step-4 checkpoint and
    is rerun under the same name, and during the rerun a Train worker is SIGKILLed after
    the step-6 checkpoint (Ray Train restarts the group from it). The final state equals
    the uninterrupted run's, and the metrics hold each step once."""
    storage, _, before = stopped_local
    job = sft_config(tiny_model, synthetic_local, str(storage), STOPPED, *RESUME)
    result = run_with_a_kill(job, 6)
    assert_resumed_from(before, result.run_uri)
    assert_same_as_uninterrupted(final_checkpoint(result.run_uri), uninterrupted)
    assert loss_steps(result.run_uri) == list(range(1, STEPS + 1))
    tracked = assert_tracked_as_its_table(result.run_uri, "mmrad-sft")  # one run, resumed
    assert tracked.data.params["schedule.max_steps"] == str(STEPS)
    assert {"metrics.jsonl", "config.yaml", "run_info.json"} <= artifact_names(tracked.info.run_id)

    other_order = sft_config(tiny_model, synthetic_local, str(storage), STOPPED, *RESUME,
                             "learners.micro_batch_size=2")  # fmt: skip
    with pytest.raises(ConfigError, match=r"another data order \(micro_batch_size 4 -> 2\)"):
        run_sft(other_order)


def test_a_resume_on_s3_under_s3_faults_continues_exactly_and_keeps_every_row(
    uninterrupted, tiny_model, synthetic_local_on_s3, s3_chaos
):
    """Images and checkpoints on S3, with S3 answers cut mid-body and 503 SlowDowns
    injected into mmrad's reads: the run stopped after step 4 and rerun equals the
    uninterrupted one on local images, every trained id the same (none skipped)."""
    storage_path, data = f"s3://{TEST_BUCKET}/sft-runs", synthetic_local_on_s3
    with s3_faults(s3_chaos) as first_faults:
        before = stopped_at_step_4(tiny_model, data, storage_path, "on-s3")
    with s3_faults(s3_chaos) as faults:
        result = run_sft(sft_config(tiny_model, data, storage_path, "on-s3", *RESUME))
    assert_resumed_from(before, result.run_uri)
    resumed = final_checkpoint(result.run_uri)
    order, clean_order = (c["trainer_state"]["extra"]["data_order"]
                          for c in (resumed, uninterrupted))  # fmt: skip
    assert order["manifest"] != clean_order["manifest"]  # its fingerprint holds the image URIs
    order["manifest"] = clean_order["manifest"]  # the one difference the images' place makes
    assert_same_as_uninterrupted(resumed, uninterrupted)
    assert loss_steps(result.run_uri) == list(range(1, STEPS + 1))  # none lost, none twice
    curve = losses(result.run_uri)
    assert curve[-1] < curve[0]
    assert_tracked_as_its_table(result.run_uri, "mmrad-sft")  # rows from the driver, live

    names = {uri.split("/on-s3/", 1)[1] for uri in Storage().list(f"{storage_path}/on-s3")}
    assert {"checkpoint_000008/trainer_state.json", "config.yaml", "run_info.json",
            "metrics.jsonl"} <= names  # fmt: skip
    assert any(name.startswith("checkpoint_000008/weights/") for name in names)
    assert result.export_uri == f"{storage_path}/on-s3/export"
    assert read_export_info(result.export_uri, Storage())["lora"] == "merged"
    assert "export/model.safetensors" in names
    record_s3_faults(
        "sft/1 S3 resets and 503 bursts",
        "SFT",
        first_faults + faults,
        "images and checkpoints on S3; a stop and rerun",
        "retried with backoff; trained ids and weights equal a clean run's",
    )


def test_a_resume_without_the_optimizer_state_is_caught(uninterrupted, stopped_local, tiny_model,
                                                         synthetic_local, tmp_path):  # fmt: skip
    """The negative control: the same stop and rerun (of a copy of the stopped run), but
    the resumed checkpoint's AdamW state zeroed in between (as a resume that
    re-initialised the optimizer). The comparison that passes above must fail here, in
    the moments and in the weights they move."""
    _, pristine, before = stopped_local
    shutil.copytree(pristine / STOPPED, tmp_path / STOPPED, symlinks=True)
    drop_optimizer_state(Path(latest_checkpoint(Storage(), str(tmp_path / STOPPED))))
    result = run_sft(sft_config(tiny_model, synthetic_local, str(tmp_path), STOPPED, *RESUME))
    assert_resumed_from(before, result.run_uri)
    resumed = final_checkpoint(result.run_uri)
    differ = differences(resumed, uninterrupted)
    assert any(key.endswith("exp_avg_sq") for key in differ), differ
    assert any(key.startswith("model.") and "lora_" in key for key in differ), differ
    # the same steps over the same samples: only the optimizer's state was lost
    state, reference = resumed["trainer_state"], uninterrupted["trainer_state"]
    assert state["step"] == reference["step"]
    assert state["extra"]["trained_ids"] == reference["extra"]["trained_ids"]
