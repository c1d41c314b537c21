"""The vLLM wrapper: engine settings, multimodal requests, sampling, scoring given
completions, in-place weight updates and LoRA adapters, on the tiny model and real vLLM."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from mmrad.config import LANGUAGE_MODEL_PROJECTIONS, EngineConfig, PixelBudget
from mmrad.engine import (
    Completion,
    Engine,
    InspectionInput,
    Sampling,
    build_request,
    engine_kwargs,
    grid_of,
)
from mmrad.engine.engine import _environ_changes
from mmrad.engine.sampling import answer_score, completion_from_output, top_by_text
from mmrad.engine.settings import child_process, layout_environment, lora_rank_slot
from mmrad.model.tiny import build_tiny_model
from mmrad.task.prompt import PromptVariant
from tests.helpers.engines import small_engine_config
from tests.helpers.logprobs import hf_completion_logprobs

PIXELS = PixelBudget()  # 56*56 .. 224*224, the tiny model's processor budget
MAX_TOKENS = 16


def noise(width: int, height: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


ITEMS = [
    InspectionInput(noise(250, 170, 1), noise(224, 224, 2), "metal_nut", ("scratch", "good")),
    InspectionInput(Image.fromarray(noise(200, 200, 3)), None, None),
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("engine-tiny") / "model")


@pytest.fixture(scope="module")
def processor(tiny_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_dir)


# -- settings (pure) -------------------------------------------------------------------


def test_cpu_settings():
    config = EngineConfig(kv_cache_bytes=2**28, max_images=3, seed=5)
    kwargs = engine_kwargs(config, "/m", on_gpu=False)
    assert kwargs == {
        "model": "/m",
        "max_model_len": 4096,
        "max_num_seqs": 64,
        "seed": 5,
        "limit_mm_per_prompt": {"image": 3},
        "worker_extension_cls": "mmrad.engine.worker_extension.WeightReceiver",
        "dtype": "float32",
        "distributed_executor_backend": "vllm.v1.executor.uniproc_executor.UniProcExecutor",
        "enforce_eager": True,
        "kv_cache_memory_bytes": 2**28,
        "enable_chunked_prefill": False,
    }
    assert engine_kwargs(config.model_copy(update={"dtype": "bfloat16"}), "/m", on_gpu=False)[
        "dtype"
    ] == ("bfloat16")


def test_gpu_settings_with_lora():
    config = EngineConfig(
        gpu_memory_utilization=0.5, tensor_parallel_size=2, enable_lora=True, max_lora_rank=12
    )
    kwargs = engine_kwargs(config, "/m", on_gpu=True)
    assert kwargs["dtype"] == "bfloat16"
    assert kwargs["gpu_memory_utilization"] == 0.5
    assert kwargs["tensor_parallel_size"] == 2
    assert kwargs["enable_lora"] is True
    assert kwargs["max_lora_rank"] == 16  # vLLM takes 1, 8, 16, 32, ...: the next one up
    assert kwargs["max_loras"] == 1
    assert not {"enforce_eager", "kv_cache_memory_bytes", "distributed_executor_backend"} & set(
        kwargs
    )
    assert "enable_lora" not in engine_kwargs(EngineConfig(), "/m", on_gpu=True)
    assert engine_kwargs(EngineConfig(dtype="float16"), "/m", on_gpu=True)["dtype"] == "float16"


def test_process_layout_follows_the_device_unless_set():
    assert child_process(EngineConfig(), on_gpu=True) is True
    assert child_process(EngineConfig(), on_gpu=False) is False
    for explicit in (True, False):
        for on_gpu in (True, False):
            assert child_process(EngineConfig(multiprocess=explicit), on_gpu) is explicit
    assert layout_environment(True) == {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    assert layout_environment(False) == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def test_lora_rank_slots():
    assert [lora_rank_slot(r) for r in (1, 2, 8, 64, 65, 512)] == [1, 8, 8, 64, 128, 512]
    with pytest.raises(ValueError, match="exceeds"):
        lora_rank_slot(513)


def test_weight_files_go_to_shared_memory_when_it_has_room():
    from mmrad.engine.engine import _shared_folder

    assert _shared_folder(1) == ("/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    assert _shared_folder(10**18) is None  # a model larger than /dev/shm: the temp folder


def test_environment_changes():
    before = {"A": "1", "B": "2"}
    after = {"A": "1", "B": "3", "C": "4"}
    assert _environ_changes(before, after) == {"B": ("2", "3"), "C": (None, "4")}


# -- requests --------------------------------------------------------------------------


def test_request_with_reference(processor):
    request = build_request(processor, ITEMS[0], PromptVariant(), PIXELS)
    reference, query = request["multi_modal_data"]["image"]
    assert query.size == (252, 168) and reference.size == (224, 224)  # model grids
    assert np.array_equal(np.asarray(reference), ITEMS[0].reference)  # on the grid: untouched
    prompt = request["prompt"]
    assert prompt.count("<|image_pad|>") == 2
    assert "252 pixels wide and 168 pixels high" in prompt
    assert "The first image shows a normal" in prompt and '"metal nut"' in prompt
    assert prompt.endswith("<|im_start|>assistant\n")

    grid = grid_of(ITEMS[0], PIXELS)
    assert grid.size == (250, 170) and grid.grid == (252, 168)
    assert grid.scale == pytest.approx((250 / 252, 170 / 168))

    # vLLM's processor, same budget, sees images already on the grid and keeps them.
    batch = processor(text=[prompt], images=[reference, query], return_tensors="np")
    assert batch["image_grid_thw"].tolist() == [[1, 16, 16], [1, 12, 18]]


def test_request_without_reference(processor):
    request = build_request(processor, ITEMS[1], PromptVariant(), PIXELS)
    assert len(request["multi_modal_data"]["image"]) == 1
    assert request["prompt"].count("<|image_pad|>") == 1
    assert "first image" not in request["prompt"]
    assert grid_of(ITEMS[1], PIXELS).grid == (196, 196)
    assert "196 pixels wide and 196 pixels high" in request["prompt"]

    ignored = build_request(processor, ITEMS[0], PromptVariant(use_reference=False), PIXELS)
    assert len(ignored["multi_modal_data"]["image"]) == 1  # the variant drops the reference


def test_request_from_tokenizer_matches_processor(processor):
    from_processor = build_request(processor, ITEMS[0], PromptVariant(), PIXELS)
    from_tokenizer = build_request(processor.tokenizer, ITEMS[0], PromptVariant(), PIXELS)
    assert from_tokenizer["prompt"] == from_processor["prompt"]


def test_bad_image_array(processor):
    item = InspectionInput(np.zeros((32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        build_request(processor, item, PromptVariant(), PIXELS)


# -- scores (pure) ---------------------------------------------------------------------


def test_answer_score_reads_the_first_answer_token():
    tokens = ["<think>", "hm", "</think>", "<answer>", "Yes", ".", "</answer>"]
    top = [{} for _ in tokens]
    top[4] = {"Yes": math.log(0.6), " yes": math.log(0.1), "No": math.log(0.1), "x": -1.0}
    assert answer_score(tokens, top) == pytest.approx(0.7 / 0.8)
    assert answer_score(["no", "answer"], [{}, {}]) is None
    assert answer_score(["<answer>", "Maybe"], [{}, {"Maybe": 0.0}]) is None


def test_completion_from_vllm_output():
    def entry(logprob, text):
        return SimpleNamespace(logprob=logprob, decoded_token=text)

    steps = [
        {7: entry(-0.1, "<answer>")},
        {8: entry(-0.5, "No"), 9: entry(-1.0, "Yes"), 10: entry(-2.0, "No")},  # same text twice
        {11: entry(-0.2, "</answer>")},
    ]
    output = SimpleNamespace(
        text="<answer>No</answer>", token_ids=[7, 8, 11], logprobs=steps, finish_reason="stop"
    )
    completion = completion_from_output(output)
    assert completion.token_ids == (7, 8, 11)
    assert completion.logprobs == pytest.approx((-0.1, -0.5, -0.2))
    p_no = math.exp(-0.5) + math.exp(-2.0)
    assert completion.score == pytest.approx(math.exp(-1.0) / (math.exp(-1.0) + p_no))
    assert top_by_text(steps[1])["No"] == pytest.approx(math.log(p_no))

    bare = completion_from_output(SimpleNamespace(**{**vars(output), "logprobs": None}))
    assert bare == Completion("<answer>No</answer>", (7, 8, 11), None, None, "stop")


# -- the engine (real vLLM) ------------------------------------------------------------


LAYOUTS = {"in_process": False, "child_process": True}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def engine(tiny_dir, request):
    """One engine per vLLM process layout: every engine test runs in both (the engine
    core in this process, as on CPUs, and in vLLM's child process, as on GPUs)."""
    saved = dict(os.environ)
    config = small_engine_config(
        max_model_len=2048, max_num_seqs=8, multiprocess=LAYOUTS[request.param]
    )
    engine = Engine(str(tiny_dir), config, PIXELS)
    yield engine
    engine.close()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def greedy(engine):
    """The base model's greedy completions of ITEMS (with top-5 log-probs)."""
    return engine.generate(ITEMS, Sampling(max_tokens=MAX_TOKENS, logprobs=5))


@pytest.mark.integration
def test_engine_arguments_are_vllms(tiny_dir):
    from vllm.engine.arg_utils import EngineArgs

    config = EngineConfig(enable_lora=True)
    for on_gpu in (False, True):
        EngineArgs(**engine_kwargs(config, str(tiny_dir), on_gpu=on_gpu))


@pytest.mark.integration
def test_greedy_is_repeatable(engine, greedy):
    again = engine.generate(ITEMS, Sampling(max_tokens=MAX_TOKENS, logprobs=5))
    assert [len(group) for group in greedy] == [1, 1]
    assert [g[0].text for g in again] == [g[0].text for g in greedy]
    assert [g[0].token_ids for g in again] == [g[0].token_ids for g in greedy]
    for (completion,) in greedy:
        assert 0 < len(completion.token_ids) <= MAX_TOKENS
        assert completion.finish_reason in ("stop", "length")
        assert completion.score is None or 0.0 <= completion.score <= 1.0

    stats = engine.stats
    assert stats.last.tokens == sum(len(g[0].token_ids) for g in again)
    assert stats.total.tokens >= 2 * stats.last.tokens and stats.calls >= 2
    assert stats.last.seconds > 0 and stats.last.tokens_per_second > 0


@pytest.mark.integration
def test_sampling_n_with_seed(engine):
    sampling = Sampling(n=3, temperature=1.0, max_tokens=MAX_TOKENS, logprobs=0, seed=7)
    (group,) = engine.generate(ITEMS[:1], sampling)
    assert len(group) == 3
    for completion in group:
        assert len(completion.token_ids) == len(completion.logprobs) > 0
        assert all(lp <= 0 for lp in completion.logprobs)
    assert len({c.token_ids for c in group}) > 1  # seeds seed, seed+1, seed+2
    (again,) = engine.generate(ITEMS[:1], sampling)
    assert [c.token_ids for c in again] == [c.token_ids for c in group]


@pytest.mark.integration
def test_one_sampling_per_item_keeps_each_items_own_seed(engine):
    """Per-item samplings (what GRPO's seeded rollouts send): each item samples as it
    would alone with its own seed, whatever its neighbour in the call."""
    base = Sampling(n=2, temperature=1.0, max_tokens=MAX_TOKENS, logprobs=0)
    first, second = replace(base, seed=11), replace(base, seed=12)
    together = engine.generate(ITEMS, [first, second])
    alone = [engine.generate([item], [sampling])[0]
             for item, sampling in zip(ITEMS, (first, second), strict=True)]  # fmt: skip
    assert [[c.token_ids for c in g] for g in together] == [[c.token_ids for c in g] for g in alone]
    reseeded = engine.generate(ITEMS[:1], [replace(base, seed=13)])[0]
    assert [c.token_ids for c in reseeded] != [c.token_ids for c in together[0]]
    with pytest.raises(ValueError, match="2 prompts but 1 samplings"):
        engine.generate(ITEMS, [first])


@pytest.mark.integration
def test_prompt_logprobs_reproduce_sampling_logprobs(engine):
    sampling = Sampling(n=2, temperature=1.0, max_tokens=MAX_TOKENS, logprobs=0, seed=3)
    groups = engine.generate(ITEMS, sampling)
    items = [item for item, group in zip(ITEMS, groups, strict=True) for _ in group]
    completions = [c for group in groups for c in group]
    scored = engine.prompt_logprobs(items, [c.token_ids for c in completions])
    for completion, logprobs in zip(completions, scored, strict=True):
        np.testing.assert_allclose(logprobs, completion.logprobs, atol=1e-4)
    assert engine.prompt_logprobs(ITEMS[:1], [[]]) == [[]]


@pytest.mark.integration
def test_update_weights(engine, greedy, tiny_dir):
    from safetensors.torch import load_file

    weights = load_file(tiny_dir / "model.safetensors")
    version = engine.version
    try:
        engine.update_weights([("lm_head.weight", weights["lm_head.weight"] * 3)], version + 1)
        assert engine.version == version + 1
        # The same images again: without resetting the engine's encoder cache this dies.
        changed = engine.generate(ITEMS, Sampling(max_tokens=MAX_TOKENS, logprobs=5))
        for (before,), (after,) in zip(greedy, changed, strict=True):
            assert after.token_ids[0] == before.token_ids[0]  # argmax survives scaling ...
            assert abs(after.logprobs[0] - before.logprobs[0]) > 0.1  # ... its log-prob not
    finally:
        engine.update_weights(weights.items(), version + 2)
    restored = engine.generate(ITEMS, Sampling(max_tokens=MAX_TOKENS, logprobs=5))
    for (before,), (after,) in zip(greedy, restored, strict=True):
        assert after.token_ids == before.token_ids
        np.testing.assert_allclose(after.logprobs, before.logprobs, atol=1e-5)
    assert engine.version == version + 2


@pytest.mark.integration
def test_update_weights_with_training_names(engine, greedy, tiny_dir):
    """A learner sends ``named_parameters()`` names (transformers 5:
    ``model.language_model.layers...``), not the checkpoint's; one whole layer changes."""
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    state = dict(model.named_parameters())
    layer = "model.language_model.layers.1."
    assert any(name.startswith(layer) for name in state)
    generator = torch.Generator().manual_seed(0)
    noisy = [
        (name, p.detach() + 0.5 * torch.randn(p.shape, generator=generator))
        for name, p in state.items()
        if name.startswith(layer)
    ]
    try:
        engine.update_weights(noisy, engine.version + 1)
        changed = engine.generate(ITEMS, Sampling(max_tokens=MAX_TOKENS, logprobs=5))
        for (before,), (after,) in zip(greedy, changed, strict=True):
            assert abs(after.logprobs[0] - before.logprobs[0]) > 1e-3
    finally:
        engine.update_weights([(n, p.detach()) for n, p in state.items()], engine.version + 1)
    restored = engine.generate(ITEMS, Sampling(max_tokens=MAX_TOKENS))
    assert [g[0].token_ids for g in restored] == [g[0].token_ids for g in greedy]


@pytest.fixture(scope="module")
def adapter_dir(tiny_dir, tmp_path_factory):
    """A peft LoRA on the language model's projections with non-zero B (so it matters)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=LANGUAGE_MODEL_PROJECTIONS)
    model = get_peft_model(base, lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.5)
    out = tmp_path_factory.mktemp("adapter") / "v1"
    model.save_pretrained(out)
    return out


@pytest.mark.integration
def test_lora(engine, greedy, adapter_dir):
    handle = engine.load_lora(str(adapter_dir), version=1)
    other = engine.load_lora(str(adapter_dir), version=2)
    assert handle.version == 1 and other.request.lora_int_id != handle.request.lora_int_id

    sampling = Sampling(max_tokens=MAX_TOKENS, logprobs=0)
    adapted = engine.generate(ITEMS, sampling, lora=handle)
    assert [g[0].token_ids for g in adapted] != [g[0].token_ids for g in greedy]
    scored = engine.prompt_logprobs(ITEMS, [g[0].token_ids for g in adapted], lora=handle)
    for (completion,), logprobs in zip(adapted, scored, strict=True):
        np.testing.assert_allclose(logprobs, completion.logprobs, atol=1e-4)

    base = engine.generate(ITEMS, sampling)  # no adapter leaks into a base-only call
    assert [g[0].token_ids for g in base] == [g[0].token_ids for g in greedy]
    np.testing.assert_allclose(base[0][0].logprobs, greedy[0][0].logprobs, atol=1e-5)


class ChannelSender:
    """Learner rank 0's side of a weight channel with one engine (world 2), sending from
    a thread of this process: announce ``model``'s weights (adapters merged), then
    broadcast them while the engine receives."""

    def __init__(self, name: str):
        from mmrad.rl.weight_sender import WeightSender

        self.name = name
        self.sender = WeightSender(0, "gloo", "127.0.0.1", bucket_bytes=256 * 1024)
        self.spec: dict | None = None

    def send(self, engine, model, version: int) -> None:
        import threading

        import torch

        from mmrad.engine.channel import ChannelSpec

        update = self.sender.announce(model, torch.float32, version)
        names = [t.name for t in update.send_plan.tensors]
        assert len(update.send_plan.buckets) > 1  # bounded buckets, not one blob
        assert not any("lora_" in n or "base_layer" in n or "base_model" in n for n in names)
        fresh = self.spec is None
        if fresh:
            self.spec = ChannelSpec(update.host, update.port, 2, "gloo", self.name, 120).to_dict()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self.sender.send(model, torch.float32, update, self.spec)
            except BaseException as error:  # reported below
                errors.append(error)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        if fresh:
            engine.join_channel(self.spec, first_rank=1)
        engine.receive(update.plan)
        thread.join(timeout=120)
        assert not errors and not thread.is_alive()
        assert engine.version == version

    def close(self, engine) -> None:
        engine.leave_channel()
        self.sender.close()


def engine_matches(engine, model, processor) -> None:
    """The engine's log-probs of its own greedy completions equal ``model``'s."""
    completions = engine.generate(ITEMS, Sampling(max_tokens=MAX_TOKENS, logprobs=0))
    for item, (completion,) in zip(ITEMS, completions, strict=True):
        expected = hf_completion_logprobs(
            model, processor, engine.request(item), completion.token_ids
        )
        np.testing.assert_allclose(completion.logprobs, expected, atol=1e-3)


def same_as_greedy(engine, greedy) -> None:
    restored = engine.generate(ITEMS, Sampling(max_tokens=MAX_TOKENS, logprobs=5))
    assert [g[0].token_ids for g in restored] == [g[0].token_ids for g in greedy]
    np.testing.assert_allclose(restored[0][0].logprobs, greedy[0][0].logprobs, atol=1e-5)


@pytest.mark.integration
def test_weights_over_the_channel(engine, greedy, tiny_dir, processor):
    """Full weights (one layer perturbed) broadcast over a gloo channel in 256 KiB
    buckets; then the original weights again over the same channel, no rejoin."""
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("model.language_model.layers.0."):
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    channel = ChannelSender(f"full-{engine.child_process}")
    try:
        channel.send(engine, model, engine.version + 1)
        engine_matches(engine, model, processor)
        changed = engine.generate(ITEMS, Sampling(max_tokens=MAX_TOKENS, logprobs=5))
        assert [g[0].logprobs for g in changed] != [g[0].logprobs for g in greedy]
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(original[name])
        channel.send(engine, model, engine.version + 1)
    finally:
        channel.close(engine)
    same_as_greedy(engine, greedy)


@pytest.mark.integration
def test_lora_merged_over_the_channel(engine, greedy, tiny_dir, processor, adapter_dir):
    """A peft policy goes over the channel with its adapter merged: the engine then
    samples as the peft model does, without loading any adapter."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    channel = ChannelSender(f"lora-{engine.child_process}")
    try:
        channel.send(engine, model, engine.version + 1)
        engine_matches(engine, model, processor)
    finally:
        channel.close(engine)
        weights = load_file(tiny_dir / "model.safetensors")
        engine.update_weights(weights.items(), engine.version + 1)
    same_as_greedy(engine, greedy)


@pytest.mark.integration
def test_close_restores_environment(engine):
    """Last: closes the module's engine."""
    set_by_vllm = dict(engine._environ_set)
    if not engine.child_process:  # a child process sets its own
        assert "LOCAL_WORLD_SIZE" in set_by_vllm
    engine.close()
    for key, (old, _) in set_by_vllm.items():
        assert os.environ.get(key) == old
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate(ITEMS, Sampling(max_tokens=1))
    engine.close()  # twice is fine


def test_request_carries_the_hint_after_the_prompt(processor):
    plain = build_request(processor, ITEMS[0], PromptVariant(), PIXELS)
    hinted = build_request(
        processor, dataclasses.replace(ITEMS[0], hint="HINT-TEXT"), PromptVariant(), PIXELS
    )
    before, _, after = hinted["prompt"].partition(" HINT-TEXT")
    assert before + after == plain["prompt"]
    assert len(hinted["multi_modal_data"]["image"]) == 2


def test_the_startup_heap_is_frozen_and_later_garbage_is_still_collected():
    """What an engine's start freezes is out of the collector's reach (its full
    collections no longer walk it); cycles made afterwards are still collected. In a
    process of its own: freezing this one would outlive the test."""
    code = (
        "import gc, weakref\n"
        "from mmrad.engine.settings import freeze_startup_heap\n"
        "class Node: pass\n"
        "startup = Node(); startup.me = startup\n"
        "tracked = len(gc.get_objects())\n"
        "freeze_startup_heap()\n"
        "assert gc.get_freeze_count() >= tracked, (gc.get_freeze_count(), tracked)\n"
        "assert not any(o is startup for o in gc.get_objects())\n"
        "later = Node(); later.me = later; gone = weakref.ref(later); del later\n"
        "gc.collect()\n"
        "assert gone() is None\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.integration
def test_seeded_samples_beyond_one_steps_token_budget(tiny_dir):
    """24 seeded samples of 12 different ~400-token prompts (GRPO's rollouts, one seed
    each) are more prompt than one engine step takes on a CPU (4096 tokens): vLLM
    prefills them over several steps, and with chunked prefill it rewound the generator
    of a partly prefilled request, which a CPU generator cannot do ("CPU Generator does
    not use offset"; a GRPO step of 64 rollouts failed). Whole prompts only: every sample
    comes back, as reproducible as in a small batch."""
    items = [InspectionInput(noise(224, 224, 10 + i), noise(224, 224, 40 + i), "metal_nut",
                             ("scratch", "good")) for i in range(12)]  # fmt: skip
    samplings = [Sampling(n=2, temperature=1.0, max_tokens=4, logprobs=0, seed=i)
                 for i in range(12)]  # fmt: skip
    engine = Engine(str(tiny_dir), small_engine_config(max_num_seqs=32), PIXELS)
    try:
        groups = engine.generate(items, samplings)
        assert [len(group) for group in groups] == [2] * 12
        alone = engine.generate(items[3:4], samplings[3:4])[0]
        assert [c.token_ids for c in alone] == [c.token_ids for c in groups[3]]
    finally:
        engine.close()
