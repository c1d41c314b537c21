"""The rollout pool on a real Ray cluster with real vLLM workers (the tiny model): G
rollouts per prompt with sampling log-probs, full and LoRA weight sync checked against
transformers/peft log-probs, and a worker killed with SIGKILL mid-batch.

The tests share one pool (two workers, built once); they run in file order and the
weight versions build up: full weights v1, then a LoRA adapter v2 on top.
"""

from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace

import numpy as np
import pytest

from mmrad.config import LoraConfig, PixelBudget
from mmrad.engine import InspectionInput, Sampling, build_request
from mmrad.rl.pool import RolloutPool, contiguous_chunks
from mmrad.rl.rollout import RolloutPrompt, WeightUpdate, write_adapter
from mmrad.task.prompt import PromptVariant
from tests.helpers.engines import small_engine_config
from tests.helpers.logprobs import hf_completion_logprobs

PIXELS = PixelBudget()
VARIANT = PromptVariant()
ENGINE = small_engine_config()
LORA = LoraConfig(r=8, alpha=16, dropout=0.0)
TOLERANCE = 1e-3  # vLLM and transformers agree to ~1e-6 on this model in float32


def noise(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def inspection(seed: int) -> InspectionInput:
    return InspectionInput(noise(112, seed), noise(112, seed + 1000), "brick")


def prompts(count: int, tag: str, lora: bool = True) -> list[RolloutPrompt]:
    return [RolloutPrompt(f"{tag}{i}", inspection(i), lora) for i in range(count)]


# -- pure parts ------------------------------------------------------------------------


def test_contiguous_chunks_are_balanced():
    assert contiguous_chunks(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert contiguous_chunks(2, 3) == [(0, 1), (1, 2), (2, 2)]
    assert contiguous_chunks(0, 2) == [(0, 0), (0, 0)]
    with pytest.raises(ValueError):
        contiguous_chunks(3, 0)


def test_weight_update_checks_and_adapter_files(tmp_path):
    import json

    import torch

    with pytest.raises(ValueError, match="needs its adapter_config"):
        WeightUpdate(1, "lora", {"a": torch.zeros(1)})
    with pytest.raises(ValueError, match="kind must be"):
        WeightUpdate(1, "delta", {"a": torch.zeros(1)})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="holds no tensors"):
        WeightUpdate(1, "full", {})
    update = WeightUpdate(
        3, "lora", {"x.lora_A.weight": torch.ones(2, 4).T}, {"r": 2, "t": {"b", "a"}}
    )
    out = write_adapter(update, tmp_path / "adapter")
    from safetensors.torch import load_file

    assert torch.equal(
        load_file(out / "adapter_model.safetensors")["x.lora_A.weight"], torch.ones(4, 2)
    )
    assert json.loads((out / "adapter_config.json").read_text()) == {"r": 2, "t": ["a", "b"]}


def json_types_only(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and json_types_only(v) for k, v in value.items())
    if isinstance(value, list):
        return all(json_types_only(v) for v in value)
    return value is None or type(value) in (str, int, float, bool)


def test_lora_updates_unpickle_without_peft():
    """peft's config dict holds sets and enums; the update keeps JSON types only, so the
    coordinator and the engines unpickle it without importing peft."""
    import torch
    from peft import LoraConfig

    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM").to_dict()
    assert not json_types_only(config)  # what would travel otherwise
    update = WeightUpdate(1, "lora", {"x.lora_A.weight": torch.ones(1)}, config)
    assert json_types_only(update.adapter_config)
    assert sorted(update.adapter_config["target_modules"]) == ["q_proj", "v_proj"]
    assert update.adapter_config["task_type"] == "CAUSAL_LM" and update.adapter_config["r"] == 2


# -- the pool (real Ray, real vLLM) --------------------------------------------------------


@pytest.fixture(scope="module")
def pool(ray_cluster, tiny_model):
    pool = RolloutPool(tiny_model, ENGINE, PIXELS, VARIANT, num_workers=2, num_cpus=0.5)
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def processor(tiny_model):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def synced(pool, tiny_model, processor):
    """Sync full weights (v1), then a LoRA adapter (v2), through the pool; record vLLM's
    and transformers'/peft's log-probs of a fixed completion at each version."""
    import torch
    from peft import get_peft_model_state_dict
    from transformers import AutoModelForImageTextToText

    from mmrad.model.lora import apply_lora

    fixed = [
        *prompts(2, "fixed-"),
        *[RolloutPrompt(f"base-{i}", inspection(i), lora=False) for i in range(2)],
    ]
    text = "<think>The brick looks normal.</think><answer>No.</answer><|im_end|>"
    completion = processor.tokenizer(text).input_ids
    completions = [completion] * len(fixed)

    def reference(model) -> list[list[float]]:
        return [
            hf_completion_logprobs(
                model, processor, build_request(processor, p.inputs, VARIANT, PIXELS), completion
            )
            for p in fixed
        ]

    model = AutoModelForImageTextToText.from_pretrained(tiny_model).eval()
    result = SimpleNamespace(fixed=fixed, completions=completions, hf_base=reference(model))
    result.v0 = pool.prompt_logprobs(fixed, completions)

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    full = {name: p.detach().clone() for name, p in model.named_parameters()}
    result.full_seconds = pool.sync(WeightUpdate(1, "full", full))
    result.hf_full = reference(model)
    result.v1 = pool.prompt_logprobs(fixed, completions)

    peft_model = apply_lora(model, LORA).eval()
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5, generator=generator)
    adapter = WeightUpdate(
        2,
        "lora",
        get_peft_model_state_dict(peft_model),
        peft_model.peft_config["default"].to_dict(),
    )
    result.lora_seconds = pool.sync(adapter)
    result.hf_lora = reference(peft_model)
    result.v2 = pool.prompt_logprobs(fixed, completions)
    return result


def assert_close(actual, expected, atol=TOLERANCE):
    for got, want in zip(actual, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=atol)


def max_difference(a, b) -> float:
    return max(float(np.max(np.abs(np.subtract(x, y)))) for x, y in zip(a, b, strict=True))


@pytest.mark.integration
def test_group_of_rollouts_per_prompt(pool, processor):
    batch = prompts(5, "p")
    sampling = Sampling(n=3, temperature=1.0, max_tokens=12, seed=1)
    groups = pool.generate(batch, sampling)
    assert [len(group) for group in groups] == [3] * 5
    for prompt, group in zip(batch, groups, strict=True):
        assert [r.index for r in group] == [0, 1, 2]
        for rollout in group:
            assert rollout.prompt_id == prompt.prompt_id
            assert rollout.version == pool.version
            assert 0 < len(rollout.token_ids) == len(rollout.logprobs) <= 12
            assert all(lp <= 0 for lp in rollout.logprobs)
            decoded = processor.tokenizer.decode(rollout.token_ids, skip_special_tokens=True)
            assert decoded == rollout.text
        assert len({r.token_ids for r in group}) > 1  # G different samples
    # Contiguous chunks balanced by count: 3 prompts on worker 0, 2 on worker 1.
    assert [g[0].worker for g in groups] == ["rollout-0"] * 3 + ["rollout-1"] * 2

    stats = pool.stats()
    assert stats["rollout/tokens"] == sum(len(r.token_ids) for g in groups for r in g)
    assert stats["rollout/tokens_per_s"] > 0
    assert (
        stats["rollout/rollout-0/tokens_per_s"] > 0 and stats["rollout/rollout-1/tokens_per_s"] > 0
    )

    # The engines score given completions as they sampled them.
    flat = [r for g in groups for r in g]
    owners = [p for p, g in zip(batch, groups, strict=True) for _ in g]
    scored = pool.prompt_logprobs(owners, [r.token_ids for r in flat])
    assert_close(scored, [r.logprobs for r in flat], atol=1e-4)

    with pytest.raises(ValueError, match=r"repeated: \['p0'\]"):
        pool.submit([batch[0], batch[0]], sampling)


def test_rollout_seeds_are_fixed_per_run_batch_and_prompt():
    from mmrad.rl.rollout import rollout_seed

    assert rollout_seed(0, 3, "a@0") == rollout_seed(0, 3, "a@0")
    seeds = {rollout_seed(s, b, p) for s in (0, 1) for b in (0, 1) for p in ("a@0", "b@0")}
    assert len(seeds) == 8 and all(0 <= seed < 2**31 for seed in seeds)


@pytest.mark.integration
def test_seeded_prompts_sample_the_same_group_on_any_worker(pool):
    """What makes a resumed GRPO run sample what the uninterrupted one did: a prompt's
    own seed decides its G completions, whichever worker and batch position it gets."""
    seeded = [RolloutPrompt(f"s{i}", inspection(i), seed=100 + i) for i in range(3)]
    sampling = Sampling(n=3, temperature=1.0, max_tokens=12)
    first = pool.generate(seeded, sampling)
    again = pool.generate(seeded[::-1], sampling)[::-1]  # s2 moves to worker 0, s0 to 1
    assert first[0][0].worker != again[0][0].worker
    assert [[r.token_ids for r in g] for g in first] == [[r.token_ids for r in g] for g in again]
    other = pool.generate([RolloutPrompt("s0", inspection(0), seed=7)], sampling)[0]
    assert [r.token_ids for r in other] != [r.token_ids for r in first[0]]


@pytest.mark.integration
def test_sync_full_weights_then_lora(pool, synced):
    import torch

    # Version 0 is the model on disk, as transformers computes it.
    assert_close(synced.v0, synced.hf_base)
    # Full weights v1: every prompt (adapter or not, none is loaded yet) follows them.
    assert_close(synced.v1, synced.hf_full)
    assert max_difference(synced.v1, synced.v0) > 0.05
    # LoRA v2: adapter prompts follow peft's model; base prompts keep the v1 weights.
    assert_close(synced.v2[:2], synced.hf_lora[:2])
    assert_close(synced.v2[2:], synced.hf_full[2:])
    assert max_difference(synced.v2[:2], synced.v1[:2]) > 0.05
    assert synced.full_seconds > 0 and synced.lora_seconds > 0

    assert pool.version == 2 and pool.worker_versions() == [2, 2]
    groups = pool.generate(prompts(2, "after-"), Sampling(n=2, temperature=1.0, max_tokens=4))
    assert {r.version for g in groups for r in g} == {2}

    with pytest.raises(ValueError, match="older than the pool's v2"):
        pool.sync(WeightUpdate(1, "full", {"lm_head.weight": torch.zeros(1)}))


@pytest.mark.integration
def test_killed_worker_is_replaced_and_its_prompts_reissued(pool, synced):
    before = pool.worker_pids()
    batch = prompts(8, "kill-")
    sampling = Sampling(n=4, temperature=1.0, max_tokens=64, seed=2)
    os.kill(before[0], signal.SIGSTOP)  # worker 0 cannot finish its chunk before the kill
    pending = pool.submit(batch, sampling)
    time.sleep(0.5)
    os.kill(before[0], signal.SIGKILL)
    groups = pending.result()

    assert [len(group) for group in groups] == [4] * 8
    assert [g[0].prompt_id for g in groups] == [p.prompt_id for p in batch]
    # Worker 0's chunk was generated again by its replacement, with the latest weights.
    assert {r.worker for g in groups[:4] for r in g} == {"rollout-0.1"}
    assert {r.worker for g in groups[4:] for r in g} == {"rollout-1"}
    assert {r.version for g in groups for r in g} == {2}
    for group in groups:
        assert all(len(r.token_ids) == len(r.logprobs) > 0 for r in group)

    after = pool.worker_pids()
    assert len(after) == 2 and after[0] != before[0] and after[1] == before[1]
    assert pool.worker_versions() == [2, 2]
    assert pool.worker_names == ["rollout-0.1", "rollout-1"]
    assert pool.stats()["rollout/workers_replaced"] == 1
    # The replacement (slot 0 answers prompt_logprobs) holds full v1 + LoRA v2 for real.
    scored = pool.prompt_logprobs(synced.fixed, synced.completions)
    assert_close(scored[:2], synced.hf_lora[:2])
    assert_close(scored[2:], synced.hf_full[2:])


@pytest.mark.integration
def test_full_and_merged_lora_weights_over_the_channel(pool, synced, tiny_model, processor):
    """In-process engines over the weight channel: full weights (v3), then a peft
    policy merged (v4), each checked against transformers/peft on both workers."""
    import torch
    from transformers import AutoModelForImageTextToText

    from mmrad.model.lora import apply_lora
    from tests.helpers.channel import PoolSender

    def reference(model) -> list[list[float]]:
        return [
            hf_completion_logprobs(
                model, processor, build_request(processor, p.inputs, VARIANT, PIXELS), c
            )
            for p, c in zip(synced.fixed, synced.completions, strict=True)
        ]

    def on_each_worker() -> list[list[list[float]]]:
        return pool.worker_logprobs(synced.fixed, synced.completions)

    model = AutoModelForImageTextToText.from_pretrained(tiny_model).eval()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    sender = PoolSender(pool)
    try:
        assert sender.send(model, 3) > 0
        assert pool.worker_versions() == [3, 3]
        for scored in on_each_worker():  # no adapter any more: every prompt follows v3
            assert_close(scored, reference(model))
        peft_model = apply_lora(model, LORA).eval()
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.5, generator=generator)
        sender.send(peft_model, 4)
        for scored in on_each_worker():
            assert_close(scored, reference(peft_model))
    finally:
        sender.close()
