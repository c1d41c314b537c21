"""Rollout engines kept from one GRPO run to the next (a sweep's trials on one reused
Tune actor): a pool given kept engines resets them to version 0 with the starting
weights (full weights and a LoRA adapter applied before are gone, by the engines' own
log-probs), leaves them running when it shuts down (what a run that ends on its own
does, so a FIFO sweep's next trial gets them), and a dead kept engine is replaced; an
ASHA sweep's second trial runs on the first trial's engine processes, reset, after ASHA
stopped the first trial while its GRPO run went on (that run ends there, and the next
trial's reset of the process succeeds)."""

from __future__ import annotations

import csv
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from mmrad.config import LoraConfig, PixelBudget, load_config, read_yaml
from mmrad.engine import InspectionInput
from mmrad.rl.coordinator import coordinator_name
from mmrad.rl.job import ENGINES_FILE
from mmrad.rl.kept_engines import KeptEngines
from mmrad.rl.pool import RolloutPool, WorkerSpec
from mmrad.rl.rollout import RolloutPrompt, WeightUpdate, starting_weights
from mmrad.storage import Storage
from mmrad.task.prompt import PromptVariant
from mmrad.train.metrics_log import read_metrics
from mmrad.tune.config import TuneJobConfig
from mmrad.tune.job import TRIAL_RUNS, run_tune
from mmrad.tune.report import RESULTS_CSV
from tests.helpers.engines import small_engine_config
from tests.tune.test_tune_job import CONFIG, SESSION_GRPO

SPEC_ARGS = (small_engine_config(), PixelBudget(), PromptVariant())
TOLERANCE = 1e-3


def probe(model_dir: str) -> tuple[list[RolloutPrompt], list[list[int]]]:
    """One prompt and a fixed completion to score."""
    from transformers import AutoTokenizer

    image = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    prompt = RolloutPrompt("probe", InspectionInput(image, image, "brick"))
    text = "<answer>No.</answer><|im_end|>"
    return [prompt], [AutoTokenizer.from_pretrained(model_dir)(text).input_ids]


def lora_update(model_dir: str, version: int) -> WeightUpdate:
    import torch
    from peft import get_peft_model_state_dict
    from transformers import AutoModelForImageTextToText

    from mmrad.model.lora import apply_lora

    model = apply_lora(
        AutoModelForImageTextToText.from_pretrained(model_dir), LoraConfig(r=8, alpha=16)
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5, generator=torch.Generator().manual_seed(1))
    config = model.peft_config["default"].to_dict()
    return WeightUpdate(version, "lora", get_peft_model_state_dict(model), config)


def differs(a: list[list[float]], b: list[list[float]]) -> bool:
    return not np.allclose(a[0], b[0], atol=0.05)


@pytest.mark.integration
def test_kept_engines_come_back_at_version_0_with_the_starting_weights(ray_cluster, tiny_model):
    import torch

    kept = KeptEngines()
    spec = WorkerSpec(tiny_model, *SPEC_ARGS, num_cpus=0.5)
    prompts, completion = probe(tiny_model)
    try:
        first = RolloutPool(tiny_model, *SPEC_ARGS, 1, num_cpus=0.5, workers=kept.take(spec, 1))
        (fresh,) = first.reused
        assert fresh["version"] == 0 and not fresh["reloaded"] and fresh["adapter_dir"] is None
        base = first.prompt_logprobs(prompts, completion)

        noise = torch.Generator().manual_seed(0)
        full = {n: t + 0.05 * torch.randn(t.shape, generator=noise)
                for n, t in starting_weights(tiny_model)}  # fmt: skip
        first.sync(WeightUpdate(1, "full", full))
        first.sync(lora_update(tiny_model, 2))
        assert first.adapter_dirs() != [None]
        assert differs(first.prompt_logprobs(prompts, completion), base)
        first.shutdown()  # leaves the kept engine running

        second = RolloutPool(tiny_model, *SPEC_ARGS, 1, num_cpus=0.5, workers=kept.take(spec, 1))
        (reset,) = second.reused
        assert reset == {"pid": fresh["pid"], "version": 0, "adapter_dir": None,
                         "reloaded": True}  # fmt: skip
        assert second.worker_versions() == [0] and second.adapter_dirs() == [None]
        np.testing.assert_allclose(second.prompt_logprobs(prompts, completion)[0], base[0],
                                   atol=TOLERANCE)  # fmt: skip
        second.shutdown()

        os.kill(fresh["pid"], signal.SIGKILL)  # a kept engine dies between runs
        third = RolloutPool(tiny_model, *SPEC_ARGS, 1, num_cpus=0.5, workers=kept.take(spec, 1))
        (replaced,) = third.reused
        assert replaced["pid"] != fresh["pid"] and replaced["version"] == 0
        np.testing.assert_allclose(third.prompt_logprobs(prompts, completion)[0], base[0],
                                   atol=TOLERANCE)  # fmt: skip
        third.shutdown()
    finally:
        kept.end()


def sweep_file(tmp_path: Path, model: str, manifest: str, address: str, **changes) -> Path:
    """A sweep of 2 trials, one at a time, of 1-step GRPO runs that keep their engines;
    ``changes`` replace top-level sections (``grpo_overrides`` add GRPO overrides). The
    ASHA test below covers FIFO's case too: a run that ends on its own leaves its
    engines to the next one as the pool test above does (its pool's ``shutdown``), and
    FIFO differs only in never stopping a trial."""
    data = read_yaml(CONFIG)
    data["ray"] = {"address": address}
    data["grpo"]["overrides"] += [
        f"model.path={model}", f"data.manifest={manifest}",
        f"run.storage_path={tmp_path / 'grpo'}", *SESSION_GRPO,
        "schedule.max_steps=1", "schedule.checkpoint_every=1",
        *changes.pop("grpo_overrides", []),
    ]  # fmt: skip
    data["run"] = {"storage_path": str(tmp_path / "sweeps"), "name": "sweep", "loggers": []}
    data.update(val_samples=2, num_samples=2, max_concurrent_trials=1, scheduler={"kind": "fifo"})
    data["trial"] = {**data["trial"], "reuse_engines": True}
    data.update(changes)
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def runs_in_order(sweep: Path) -> list[Path]:
    """The trials' GRPO run folders, first started first."""
    return sorted((sweep / TRIAL_RUNS).iterdir(),
                  key=lambda run: (run / "run_info.json").stat().st_mtime)  # fmt: skip


def engine_reports(runs: list[Path]) -> list[list[dict]]:
    return [json.loads((run / ENGINES_FILE).read_text()) for run in runs]


STOPPED_AT = 2  # ASHA's max_t: the base config's steps (one validation each)
STOPPED_STEPS = 10  # the first trial's GRPO run, if nothing stopped it
GONE_WAIT_S = 60.0


def live_coordinators(runs: list[Path]) -> list[str]:
    from ray.util.state import list_actors

    names = {coordinator_name(run.name) for run in runs}
    alive = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000,
                        raise_on_missing_output=False)  # fmt: skip
    return sorted(actor.name for actor in alive if actor.name in names)


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_an_asha_stopped_trials_run_ends_and_the_next_trials_run_on_its_engines(
    ray_cluster, tiny_model, synthetic_local, tmp_path
):
    """ASHA stops a trial at its validation of step 2 (``max_t`` comes from the base
    config's 2 steps): the first trial runs 10 steps, so its process goes to the second
    trial (1 step, which ends on its own before ASHA's limit) while its GRPO run has
    steps left. (A third trial on the engines of the second, which ended on its own,
    would add only what the pool test above checks.)"""
    address = ray_cluster.get_runtime_context().gcs_address
    config = sweep_file(
        tmp_path, tiny_model, synthetic_local, address,
        grpo_overrides=[f"schedule.max_steps={STOPPED_AT}", "schedule.checkpoint_every=1"],
        search_space={"schedule.max_steps": {"grid": [STOPPED_STEPS, 1]}}, num_samples=1,
        scheduler={"kind": "asha", "grace_period": STOPPED_AT, "reduction_factor": 2},
    )  # fmt: skip
    result = run_tune(load_config(TuneJobConfig, config))

    assert result.trials == 2
    sweep = tmp_path / "sweeps" / "sweep"
    runs = runs_in_order(sweep)
    with (sweep / RESULTS_CSV).open() as table:
        rows = {row["trial"]: row for row in csv.DictReader(table)}
    # no trial errored (the reset of the stopped trial's process succeeded); ASHA
    # stopped the first at its limit, the second ended on its own
    assert [(rows[run.name]["status"], rows[run.name]["validations"], rows[run.name]["steps"])
            for run in runs] == [("done", str(STOPPED_AT), str(STOPPED_AT)),
                                 ("done", "1", "1")]  # fmt: skip
    first, second = engine_reports(runs)
    assert [e["pid"] for e in second] == [e["pid"] for e in first]  # the same processes
    assert all(e["reloaded"] for e in second)  # the channel had replaced the weights
    assert all(e["version"] == 0 and e["adapter_dir"] is None for e in first + second)
    assert not any(e["reloaded"] for e in first)  # new engines
    # the stopped run ended soon after the stop, far from its own end; the next ran whole
    steps = [row["step"] for row in read_metrics(Storage(), str(runs[0]))]
    assert STOPPED_AT <= max(steps) < STOPPED_STEPS, steps
    assert not (runs[0] / "export").exists()
    assert all((run / "export" / "mmrad.json").exists() for run in runs[1:])
    deadline = time.monotonic() + GONE_WAIT_S  # the last trial's process is being ended
    while live_coordinators(runs) and time.monotonic() < deadline:
        time.sleep(1.0)
    assert not live_coordinators(runs)  # no GRPO run goes on
