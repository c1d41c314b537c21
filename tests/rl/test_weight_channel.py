"""Weights to a rollout pool whose engines run vLLM's engine core in a child process
(vLLM's layout on GPUs), by both transports, and an engine core that dies inside a live
actor. Each sync is checked by the engines' log-probs of fixed completions against
transformers/peft after it. The in-process layout's pool is tests/rl/test_rollout_pool.py.

The tests share one pool (two workers) and run in file order; versions build up.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from mmrad.config import LoraConfig, PixelBudget
from mmrad.engine import InspectionInput, Sampling, build_request
from mmrad.engine.channel import ChannelFailed, ChannelTimedOut
from mmrad.rl.pool import RolloutPool
from mmrad.rl.rollout import RolloutPrompt, WeightUpdate
from mmrad.task.prompt import PromptVariant
from tests.helpers.channel import PoolSender
from tests.helpers.engines import small_engine_config
from tests.helpers.logprobs import hf_completion_logprobs

PIXELS = PixelBudget()
VARIANT = PromptVariant()
ENGINE = small_engine_config(multiprocess=True)
LORA = LoraConfig(r=8, alpha=16, dropout=0.0)
TOLERANCE = 1e-3
TEXT = "<think>The brick looks normal.</think><answer>No.</answer><|im_end|>"

pytestmark = pytest.mark.integration


def noise(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def prompts(count: int, tag: str) -> list[RolloutPrompt]:
    return [
        RolloutPrompt(f"{tag}{i}", InspectionInput(noise(112, i), noise(112, i + 1000), "brick"))
        for i in range(count)
    ]


class Behind:
    """The pool's ``on_behind``: counts calls (replacements that need weights)."""

    def __init__(self):
        self.calls = 0
        self.event = threading.Event()

    def __call__(self) -> None:
        self.calls += 1
        self.event.set()


@pytest.fixture(scope="module")
def behind():
    return Behind()


@pytest.fixture(scope="module")
def pool(ray_cluster, tiny_model, behind):
    pool = RolloutPool(
        tiny_model, ENGINE, PIXELS, VARIANT, num_workers=2, num_cpus=0.5, on_behind=behind
    )
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def sender(pool):
    sender = PoolSender(pool)
    yield sender
    sender.close()


@pytest.fixture(scope="module")
def probe(tiny_model):
    """Fixed completions of two prompts (one per worker) and a reference: transformers'
    log-probs of them under a given model."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model)
    fixed = prompts(2, "fixed-")
    completion = processor.tokenizer(TEXT).input_ids

    def reference(model) -> list[list[float]]:
        return [
            hf_completion_logprobs(
                model, processor, build_request(processor, p.inputs, VARIANT, PIXELS), completion
            )
            for p in fixed
        ]

    return fixed, [completion] * len(fixed), reference


@pytest.fixture(scope="module")
def policy(tiny_model):
    """The tiny model with every weight perturbed (a policy some steps into training)."""
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def lora_policy(policy):
    """``policy`` with a LoRA adapter whose B is not zero (so it matters)."""
    import copy

    import torch

    from mmrad.model.lora import apply_lora

    peft_model = apply_lora(copy.deepcopy(policy), LORA).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5, generator=generator)
    return peft_model


def on_each_worker(pool, probe) -> list[list[list[float]]]:
    """Every worker's log-probs of the probe completions."""
    fixed, completions, _ = probe
    return pool.worker_logprobs(fixed, completions)


def assert_close(actual, expected):
    for got, want in zip(actual, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=TOLERANCE)


def test_full_weights_over_the_channel(pool, sender, probe, policy):
    _, _, reference = probe
    base = on_each_worker(pool, probe)
    seconds = sender.send(policy, 1)
    assert seconds > 0 and pool.version == 1 and pool.worker_versions() == [1, 1]
    expected = reference(policy)
    for scored in on_each_worker(pool, probe):
        assert_close(scored, expected)
        assert max(abs(a - b) for a, b in zip(scored[0], base[0][0], strict=True)) > 0.05


def test_full_weights_and_a_lora_adapter_through_the_object_store(pool, probe, policy, lora_policy):
    """Tensors reach a child-process engine through a shared-memory file: other weights
    (v2), then the policy's again (v3); an adapter on top loads from its directory (v4)."""
    import copy

    import torch
    from peft import get_peft_model_state_dict

    fixed, completions, reference = probe
    other = copy.deepcopy(policy)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    for version, model in ((2, other), (3, policy)):
        pool.sync(
            WeightUpdate(version, "full", {n: p.detach() for n, p in model.named_parameters()})
        )
        for scored in on_each_worker(pool, probe):
            assert_close(scored, reference(model))
    config = lora_policy.peft_config["default"].to_dict()
    pool.sync(WeightUpdate(4, "lora", get_peft_model_state_dict(lora_policy), config))
    assert_close(pool.prompt_logprobs(fixed, completions), reference(lora_policy))


def test_lora_merged_over_the_channel(pool, sender, probe, lora_policy):
    """The same peft policy with its adapter merged: the workers drop their adapter."""
    peft_model = lora_policy
    _, _, reference = probe
    sender.send(peft_model, 5)
    expected = reference(peft_model)
    for scored in on_each_worker(pool, probe):
        assert_close(scored, expected)
    assert pool.adapter_dirs() == [None, None]


def test_dead_engine_core_is_replaced_and_its_prompts_reissued(
    pool, sender, probe, behind, lora_policy
):
    """SIGKILL to worker 0's engine core process (the actor lives on): the worker is
    dead, its replacement has no copy of v5 (it went by channel), so its chunk waits;
    the pool asks for the weights, the learner side sends v5 again, and the chunk is
    generated with v5 on the replacement. The core is frozen before the batch goes out,
    so its chunk cannot finish before the kill (the tiny model answers in well under a
    second)."""
    _, _, reference = probe
    actors = pool.worker_pids()
    cores = pool.engine_pids()
    assert cores[0] != actors[0]  # the engine core is a child process of the actor
    batch = prompts(6, "dead-core-")
    sampling = Sampling(n=2, temperature=1.0, max_tokens=32, seed=3)
    os.kill(cores[0], signal.SIGSTOP)
    pending = pool.submit(batch, sampling)
    time.sleep(0.5)
    os.kill(cores[0], signal.SIGKILL)

    def learner() -> None:  # what the coordinator's ResendWeights makes the learners do
        assert behind.event.wait(timeout=300)
        sender.send(lora_policy, 5)

    resend = threading.Thread(target=learner, daemon=True)
    resend.start()
    groups = pending.result()
    resend.join(timeout=300)

    assert behind.calls == 1
    assert [g[0].prompt_id for g in groups] == [p.prompt_id for p in batch]
    assert {r.worker for g in groups[:3] for r in g} == {"rollout-0.1"}
    assert {r.worker for g in groups[3:] for r in g} == {"rollout-1"}
    assert {r.version for g in groups for r in g} == {5}
    assert pool.stats()["rollout/workers_replaced"] == 1
    after = pool.worker_pids()
    assert after[0] != actors[0] and after[1] == actors[1]
    for scored in on_each_worker(pool, probe):  # the replacement holds v5 for real
        assert_close(scored, reference(lora_policy))


def test_engines_killed_while_they_receive_release_the_sender_and_a_resend_heals(
    pool, sender, probe, behind, policy
):
    """Worker 1's engine core is frozen (SIGSTOP), so its receive of v6 waits; it is
    SIGKILLed once the pool shows that receive in flight: the channel breaks for the
    sender and for worker 0 (whose engine lives on, behind). The replacement's core is
    frozen and killed the same way while it joins the fresh channel of the resend: the
    sender is called off at once, naming it (the channel's timeout is 600 s). The third
    send reaches both workers, the second replacement included."""
    _, _, reference = probe
    calls = behind.calls
    failures = [
        kill_engine_core_while_it_receives(pool, sender, policy, 6, slot=1) for _ in range(2)
    ]
    assert "broke" in str(failures[0])  # mid-broadcast on the channel of v5's members
    assert "called off: rollout-1.1 failed to receive v6" in str(failures[1])  # joining
    assert not any(isinstance(failure, ChannelTimedOut) for failure in failures)
    status = pool.status()
    assert status["workers"] == ["rollout-0.1", "rollout-1.2"]
    assert status["behind"] == ["rollout-0.1", "rollout-1.2"] and status["receiving"] == {}
    assert behind.calls == calls + 4  # per kill: the replacement, and worker 0 missing v6

    sender.send(policy, 6)
    assert pool.status()["behind"] == [] and pool.worker_versions() == [6, 6]
    for scored in on_each_worker(pool, probe):
        assert_close(scored, reference(policy))


def kill_engine_core_while_it_receives(pool, sender, model, version: int, slot: int):
    """Freeze ``slot``'s engine core, send ``version`` from a thread, SIGKILL the core
    once the pool shows its receive in flight; returns the sender's ChannelFailed."""
    core = pool.engine_pids()[slot]
    name = pool.status()["workers"][slot]
    os.kill(core, signal.SIGSTOP)
    failures: list[Exception] = []

    def learner() -> None:
        try:
            sender.send(model, version)
        except ChannelFailed as error:
            failures.append(error)

    sending = threading.Thread(target=learner, daemon=True)
    sending.start()
    wait_until(lambda: name in pool.status()["receiving"])
    os.kill(core, signal.SIGKILL)
    sending.join(timeout=120)
    assert not sending.is_alive() and len(failures) == 1
    return failures[0]


def wait_until(condition, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the state waited for never came"
        time.sleep(0.05)
