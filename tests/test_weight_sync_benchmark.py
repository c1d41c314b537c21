"""benchmarks/weight_sync.py in its small mode (the tiny model, one sync per arm): every
arm runs end to end and its figures are there and sane. Times are not asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "weight_sync.py"
ARMS = {
    f"{mode}/{transport}" for mode in ("full", "lora") for transport in ("object_store", "channel")
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One ``--small --repeats 1`` run in its own local Ray (the test session is already
    inside the loopback-only network namespace); returns its printed output and JSON."""
    out = tmp_path_factory.mktemp("weight-sync") / "weight_sync.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--small", "--repeats", "1", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout, json.loads(out.read_text())


def test_every_arm_syncs_and_the_engines_answer_with_the_new_weights(results):
    _, data = results
    arms = data["arms"]
    assert set(arms) == ARMS
    versions = []
    for key, arm in arms.items():
        assert (arm["mode"], arm["transport"]) == tuple(key.split("/"))
        assert len(arm["repeats"]) == 1
        assert arm["seconds"] > 0 and arm["sync_seconds"] > 0 and arm["probe_seconds"] > 0
        assert arm["seconds"] >= arm["sync_seconds"]
        assert arm["payload_bytes"] > 0 and arm["gb_per_s"] > 0
        assert arm["probe_max_abs_diff"] < 1e-3, key  # engines agree with the learners
        assert arm["probe_min_abs_change"] > 1e-3, key  # ... and the weights did change
        versions += [r["version"] for r in arm["repeats"]]
    assert len(set(versions)) == len(versions)  # one increasing counter over every sync
    model = data["model"]["bytes_float32"]
    assert arms["full/object_store"]["payload_bytes"] == model
    assert arms["full/channel"]["payload_bytes"] == model
    assert arms["lora/channel"]["payload_bytes"] == model  # sent merged
    assert 0 < arms["lora/object_store"]["payload_bytes"] < model  # the adapter alone
    assert data["model"]["learner_parameters"]["lora"]["trainable"] < data["model"]["parameters"]


def test_memory_is_measured_for_every_process(results):
    _, data = results
    labels = set(data["processes"])
    assert {"coordinator (this process)", "learner rank 0", "learner rank 1"} <= labels
    engines = {label for label in labels if label.startswith("engine ")}
    assert len(engines) >= data["settings"]["workers"]
    assert {p["malloc_mmap_threshold"].split()[0] for p in data["processes"].values()} == {"65536"}
    for arm in data["arms"].values():
        assert set(arm["memory"]) == labels
        for figures in arm["memory"].values():
            assert figures["before_bytes"] > 0
            assert figures["peak_bytes"] > 0
            assert figures["transient_bytes"] >= 0
            assert figures["shmem_after_bytes"] >= 0
    assert (
        data["memory_limit_bytes"]
        == data["model"]["bytes_float32"] + (data["settings"]["bucket_bytes"])
    )


def test_ratios_goals_and_the_7b_extrapolation_are_reported(results):
    stdout, data = results
    for mode in ("full", "lora"):
        assert data["ratios"][f"{mode}_channel_over_object_store"] > 0
    goals = data["goals"]
    assert set(goals) == {
        "probe_max_abs_diff_below_tolerance",
        "full_channel_no_slower",
        "lora_channel_no_slower",
        "full_channel_memory_under_model_plus_bucket",
        "lora_channel_memory_under_model_plus_bucket",
    }
    assert goals["probe_max_abs_diff_below_tolerance"]
    extrapolated = data["qwen7b"]["extrapolation"]
    assert set(extrapolated) == ARMS
    assert extrapolated["lora/object_store"]["bytes"] == pytest.approx(0.65e9)
    assert extrapolated["full/channel"]["bytes"] == extrapolated["lora/channel"]["bytes"]
    assert all(e["seconds"] > 0 for e in extrapolated.values())
    assert stdout.count(": PASS") + stdout.count(": FAIL") == len(goals)
    assert "EXTRAPOLATED" in stdout and "scripts/gpu_check.sh" in stdout
