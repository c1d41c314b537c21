"""GRPO runs for tests: the configuration every test run shares, and readers of a
run's metrics, checkpoints and data order."""

from __future__ import annotations

import json
from pathlib import Path

from mmrad.config import load_config
from mmrad.data.loading import epoch_order
from mmrad.data.manifest import read_manifest
from mmrad.rl.config import GRPOJobConfig
from mmrad.storage import Storage
from mmrad.train.metrics_log import read_metrics

SYNC_TOLERANCE = 1e-3  # vLLM and transformers agree to ~1e-5 on the tiny model in float32
COMMON = (
    "ray.num_cpus=2",
    "data.pixels.max_pixels=12544",
    "model.pixels.max_pixels=12544",  # the session SFT export's pixel budget
    "data.decode_cpus=0.1",
    "engine.kv_cache_bytes=67108864",
    "engine.max_num_seqs=32",
    "rollout.cpus_per_worker=0.4",
    "learners.cpus_per_worker=0.4",
    "learners.micro_batch_size=8",
    "rollout.group_size=4",
    "schedule.log_every=1",
    "schedule.sync_check_every=1",
    "schedule.sync_check_tolerance=0.001",  # vLLM and transformers agree to ~1e-5 in float32
)


CONFIG = "configs/local/grpo.yaml"


def grpo_overrides(export: str, manifest: str, storage: str, name: str, *overrides: str):
    """The command-line overrides of a test run (on top of :data:`CONFIG`)."""
    return [f"model.path={export}", f"data.manifest={manifest}", f"run.storage_path={storage}",
            f"run.name={name}", *COMMON, *overrides]  # fmt: skip


def grpo_config(export: str, manifest: str, storage: str, name: str, *overrides: str):
    return load_config(
        GRPOJobConfig, CONFIG, grpo_overrides(export, manifest, storage, name, *overrides)
    )


def steps_of(run_uri: str) -> list[dict]:
    return [row for row in read_metrics(Storage(), run_uri) if "reward/total/mean" in row]


def grpo_state(run_uri: str) -> dict:
    """The latest checkpoint's step and GRPO state (coordinator, ledger)."""
    latest = sorted(Path(run_uri).glob("checkpoint_[0-9]*"))[-1]
    state = json.loads((latest / "trainer_state.json").read_text())
    return {"step": state["step"], **state["extra"]}


def data_order(manifest: str, seed: int = 0) -> list[str]:
    """The prompt ids an uninterrupted run draws, epoch 0 first."""
    train = [r for r in read_manifest(Storage(), manifest) if r["split"] == "train"]
    return [f"{train[i]['id']}@0" for i in epoch_order(train, seed, 0)]


def assert_sync_is_real(rows: list[dict]) -> None:
    """The engines' log-probs of the probe after a sync agree with the learner's new
    weights, and differ from its previous ones by far more than from its new ones (an
    engine that kept the old weights has the two equal). Once the policy has learned the
    format one step moves a well-formed probe's log-probs little, hence the relative
    test."""
    for row in rows:
        diff, change = row["sync/logprob_max_abs_diff"], row["sync/logprob_max_abs_change"]
        assert diff < SYNC_TOLERANCE, row["step"]
        assert change > max(20 * diff, SYNC_TOLERANCE), row["step"]


EXACT_STEPS = 5
EXACT_RUN = ("sync.weights=lora", "algorithm.max_staleness=0", "rollout.prompts_per_step=2",
             "rollout.max_tokens=64", "optimizer.lr=0.001", f"schedule.max_steps={EXACT_STEPS}",
             "schedule.checkpoint_every=1", "schedule.sync_check_every=0",
             "schedule.sample_table_every=1", "schedule.sample_table_rows=2")  # fmt: skip
"""On-policy (``max_staleness: 0``) with rollouts seeded per (run seed, batch, prompt):
a run resumed, or healed after a fault, samples, scores and trains exactly what the
uninterrupted one did (the ``grpo_uninterrupted`` fixture)."""
