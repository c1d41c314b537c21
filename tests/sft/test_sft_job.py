"""SFT on a real local Ray cluster: Ray Train V2, FSDP over gloo, 2 CPU workers.
Full-weight FSDP2 training is checked on the session's ``sft_trained`` run
(tests/sft/test_sft_quality.py)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from mmrad.model.export import read_export_info
from mmrad.sft.job import run_sft
from mmrad.storage import Storage
from mmrad.train.metrics_log import read_metrics
from tests.conftest import TEST_BUCKET
from tests.sft.helpers import sft_config

pytestmark = pytest.mark.e2e


def losses(run_uri: str) -> list[float]:
    return [row["train/loss"] for row in read_metrics(Storage(), run_uri) if "train/loss" in row]


def final_state(run_uri: str) -> dict:
    latest = sorted(Path(run_uri).glob("checkpoint_[0-9]*"))[-1]
    return json.loads((latest / "trainer_state.json").read_text())


def test_fsdp1_lora_checkpoints_and_export_land_on_s3(ray_cluster, tiny_model, synthetic_local):
    """FSDP1 with LoRA (full weights on FSDP2 is the session's ``sft_trained``), on S3."""
    storage_path = f"s3://{TEST_BUCKET}/sft-runs"
    job = sft_config(
        tiny_model, synthetic_local, storage_path, "on-s3", "fsdp.version=1",
        "lora.enabled=true", "train.max_steps=4", "train.checkpoint_every=2",
    )  # fmt: skip
    result = run_sft(job)
    curve = losses(result.run_uri)
    assert len(curve) == 4 and curve[-1] < curve[0]
    objects = Storage().list(f"{storage_path}/on-s3")
    names = {uri.split("/on-s3/", 1)[1] for uri in objects}
    assert {"checkpoint_000002/trainer_state.json", "checkpoint_000004/trainer_state.json"} <= names
    assert any(name.startswith("checkpoint_000004/weights/") for name in names)
    assert {"config.yaml", "run_info.json", "metrics.jsonl"} <= names
    assert result.export_uri == f"{storage_path}/on-s3/export"
    assert read_export_info(result.export_uri, Storage())["lora"] == "merged"
    assert "export/model.safetensors" in names


def train_worker_pids() -> list[int]:
    return [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"] and p.info["cmdline"][0].startswith("ray::RayTrainWorker")
    ]


def kill_a_worker_after(run_uri: str, step: int, killed: list[int]) -> None:
    """SIGKILL one Train worker once the run has logged ``step`` (no injected exception)."""
    deadline = time.monotonic() + 600
    metrics = Path(run_uri) / "metrics.jsonl"
    while time.monotonic() < deadline and not killed:
        if metrics.exists() and any(
            json.loads(line).get("step", 0) >= step for line in metrics.read_text().splitlines()
        ):
            pids = train_worker_pids()
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed.append(pids[-1])
                return
        time.sleep(0.2)


RESUME_OVERRIDES = ("lora.enabled=true", "train.max_steps=12", "train.checkpoint_every=3",
                    "train.epochs=2", "run.max_failures=2")  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tiny_model, synthetic_local, tmp_path_factory):
    """The reference: the same 12 steps without any interruption."""
    storage_path = str(tmp_path_factory.mktemp("clean"))
    job = sft_config(tiny_model, synthetic_local, storage_path, "clean", *RESUME_OVERRIDES)
    return final_state(run_sft(job).run_uri)["trained_ids"]


def test_rerun_and_a_killed_worker_both_continue_and_train_each_sample_once(
    uninterrupted, tiny_model, synthetic_local, tmp_path
):
    """One run interrupted twice, checked against the uninterrupted one: it stops after 6
    steps and is rerun under the same name (continuing at step 7), and during the rerun a
    Train worker is SIGKILLed after step 8 (no injected exception; Ray Train restarts the
    group from the last checkpoint). The same samples in the same order, none twice, none
    skipped."""
    first = sft_config(tiny_model, synthetic_local, str(tmp_path), "again", *RESUME_OVERRIDES,
                       "train.max_steps=6")  # fmt: skip
    run_sft(first)
    assert len(final_state(str(tmp_path / "again"))["trained_ids"]) == 6 * 2 * 4

    killed: list[int] = []
    killer = threading.Thread(target=kill_a_worker_after, args=(str(tmp_path / "again"), 8, killed))
    killer.start()
    second = sft_config(tiny_model, synthetic_local, str(tmp_path), "again", *RESUME_OVERRIDES)
    result = run_sft(second)
    killer.join()
    assert killed, "no Train worker was killed"

    assert len(uninterrupted) == 12 * 2 * 4  # steps x workers x batch
    assert final_state(result.run_uri)["trained_ids"] == uninterrupted
    steps = [row["step"] for row in read_metrics(Storage(), result.run_uri) if "train/loss" in row]
    assert steps[:7] == list(range(1, 8))  # the rerun started at step 7
    assert sorted(set(steps)) == list(range(1, 13))
    assert len(steps) > 12  # the steps after the last checkpoint before the kill ran twice
