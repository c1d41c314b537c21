"""benchmarks/learner_memory.py: its measuring tools and formulas, and that the cluster
configs' learners fit the 70 GB budget by its table."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import learner_memory as lm  # noqa: E402


def small_config():
    """Qwen2.5-VL's architecture at toy width (hidden 256, 4 heads / 2 KV heads)."""
    from transformers import Qwen2_5_VLConfig

    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 256,
            "intermediate_size": 704,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 1024,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [8, 12, 12],
            },
        },
        vision_config={
            "depth": 2,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_heads": 4,
            "out_hidden_size": 256,
            "fullatt_block_indexes": [1],
        },
    )
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    return config


@pytest.fixture(scope="module")
def counts():
    return lm.parameter_counts(lm.qwen25vl_7b_config(), r=64)


def test_saved_bytes_counts_a_storage_once_and_leaves_out_shared_ones():
    x = torch.randn(1000, requires_grad=True)  # 4000 bytes
    weight = torch.randn(1000, requires_grad=True)
    assert lm.saved_bytes(lambda: x * x, set()) == 4000  # saved twice, one storage
    assert lm.saved_bytes(lambda: x * weight, {lm.storage_key(weight)}) == 4000
    assert lm.saved_bytes(lambda: (x * 2).detach(), set()) == 0


def test_live_storages_peak_sees_what_is_alive_at_once():
    with lm.LiveStorages() as tracker:
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2
        del a
        c = b + 1
        d = c[:10]  # a view allocates nothing
        del b, c
        e = d + 1  # 40 bytes beside c (kept alive by its view d)
    assert tracker.peak() == 8000
    assert tracker.peak([e]) == 8000
    assert e.shape == (10,)


def test_checkpointing_keeps_only_the_layer_input_and_recompute_costs_about_a_layer():
    config = small_config()
    text = config.text_config
    layer = lm.add_lora(lm.build_decoder_layer(text), r=8, alpha=16, dropout=0.0)
    tokens = 64
    b = lm.measure_decoder_layer(layer, text, tokens, "lora", "small")
    assert b.checkpointed == text.hidden_size * 2  # the bf16 input, nothing else
    assert b.plain / b.checkpointed > 10
    assert b.recompute_peak >= b.plain  # the recomputed layer's tensors, plus gradients
    assert b.per_padded_token == pytest.approx(2.0, abs=0.5)  # the bf16 T x T mask


def test_lora_dropout_adds_saved_tensors():
    config = small_config()
    text = config.text_config
    layer = lm.add_lora(lm.build_decoder_layer(text), r=8, alpha=16, dropout=0.0)
    without = lm.measure_decoder_layer(layer, text, 32, "lora", "no dropout")
    lm.set_lora_dropout(layer, 0.1)
    with_dropout = lm.measure_decoder_layer(layer, text, 32, "lora", "dropout")
    assert with_dropout.plain > without.plain
    assert with_dropout.checkpointed == without.checkpointed


def test_vision_block_checkpointing_keeps_only_its_input():
    vision = small_config().vision_config
    b = lm.measure_vision_block(vision, 128, full_attention=False)
    assert b.checkpointed == vision.hidden_size * 2
    assert b.plain / b.checkpointed > 10


def test_parameter_counts_are_qwen25vl_7b(counts):
    assert counts.total == pytest.approx(8.29e9, rel=0.01)
    assert counts.vision == pytest.approx(0.68e9, rel=0.01)
    assert counts.layers == 28 and counts.vision_blocks == 32
    assert counts.full_attention_blocks == 4
    assert counts.lora == 28 * counts.lora_block == pytest.approx(161e6, rel=0.01)


def test_lora_parameter_formula_matches_peft():
    text = small_config().text_config
    layer = lm.add_lora(lm.build_decoder_layer(text), r=8, alpha=16, dropout=0.0)
    adapters = sum(p.numel() for name, p in layer.named_parameters() if "lora_" in name)
    assert adapters == lm.lora_parameters(256, 704, 4, 2, r=8)


@pytest.mark.parametrize("lora", [True, False])
def test_sharded_state_halves_when_learners_double(counts, lora):
    for formula in (
        lambda world: lm.parameter_bytes(counts, lora, world, reference=True),
        lambda world: lm.gradient_bytes(counts, lora, world),
        lambda world: lm.optimizer_bytes(counts, lora, world),
    ):
        assert formula(2) == pytest.approx(2 * formula(4))


def test_states_per_parameter(counts):
    assert lm.parameter_bytes(counts, False, 1, reference=False) == 4 * counts.total
    assert lm.parameter_bytes(counts, False, 1, reference=True) == 6 * counts.total
    assert lm.parameter_bytes(counts, True, 1, reference=True) == 2 * counts.total + 4 * (
        counts.lora
    )
    trained = lm.gradient_bytes(counts, False, 1) + lm.optimizer_bytes(counts, False, 1)
    assert trained == 12 * counts.total


def test_micro_batch_is_charged_at_the_token_budget():
    sample = lm.SampleShape(
        images=2, patches_per_image=1336, prompt_tokens=874, max_label_tokens=512
    )
    unbounded = lm.micro_batch(8, None, sample)
    assert unbounded.tokens == 8 * 1386 and unbounded.samples == 8
    budget = lm.micro_batch(8, 4096, sample)
    assert budget.tokens == 4096 and budget.samples == 4  # 4096 // 874 prompt-only samples
    assert budget.patches == 4 * 2 * 1336
    too_long = lm.micro_batch(8, 1000, sample)
    assert too_long.tokens == 1386 and too_long.samples == 1  # a long sample runs alone


def fake_measurements(plain: float, checkpointed: float, recompute: float) -> lm.Measurements:
    decoder = lm.BlockBytes("decoder", plain, checkpointed, plain / 2, recompute, 0.0, 512)
    vision = lm.BlockBytes("vision", 66e3, 2.6e3, 31e3, 80e3, 0.0, 1024)
    return lm.Measurements(
        decoder={"full": decoder, "lora-0": decoder},
        vision_window=vision,
        vision_full=vision,
        vision_ends=18e3,
        final_norm=21e3,
        logprob_chunk=1.8e6,
        tokens=512,
    )


def test_activations_grow_with_tokens_and_checkpointing_cuts_them(counts):
    m = fake_measurements(plain=225e3, checkpointed=7.2e3, recompute=300e3)
    sample = lm.SampleShape(2, 1336, 874, 512)
    small, large = lm.micro_batch(8, 4096, sample), lm.micro_batch(8, 8192, sample)
    decoder = m.decoder["lora-0"]
    plain = lm.activation_bytes(m, counts, large, decoder, False, False)
    ckpt = lm.activation_bytes(m, counts, large, decoder, True, False)
    assert plain / ckpt > 10
    assert lm.activation_bytes(m, counts, small, decoder, True, False) < ckpt
    # The vision tower, where autograd records it, adds its activations.
    assert lm.activation_bytes(m, counts, large, decoder, True, True) > ckpt
    assert lm.vision_in_graph(lora=False, checkpointing=False)
    assert not lm.vision_in_graph(lora=True, checkpointing=False)


def test_logits_are_bounded_by_the_chunk():
    m = fake_measurements(225e3, 7.2e3, 300e3)
    batch = lm.micro_batch(8, None, lm.SampleShape(2, 1336, 874, 512))
    assert lm.logit_bytes(m, batch, 1024, 3584) < lm.logit_bytes(m, batch, 4096, 3584)
    assert lm.logit_bytes(m, batch, 4096, 3584) == lm.logit_bytes(m, batch, 100_000, 3584)


def test_a_row_that_does_not_fit_says_what_to_change(counts):
    m = fake_measurements(225e3, 7.2e3, 300e3)
    learner = lm.Learner(
        name="trial",
        lora=False,
        world=2,
        micro_batch_size=8,
        micro_batch_tokens=12288,
        checkpointing=True,
        chunk_tokens=1024,
        lora_r=64,
        lora_alpha=128,
        lora_dropout=0.0,
        reference=True,
        sample=lm.SampleShape(2, 1336, 874, 512),
        config="test",
    )
    row = lm.memory_row(learner, m, counts, 3584)
    assert not row.fits and "learners.num_workers=4" in row.advice
    assert lm.memory_row(replace(learner, world=4), m, counts, 3584).fits
    lora = lm.memory_row(replace(learner, lora=True, reference=False), m, counts, 3584)
    assert lora.fits and lora.advice == ""


@pytest.mark.integration
def test_cluster_lora_learners_fit_by_measurements_at_7b_width(counts):
    """The configs' own learners, measured at Qwen2.5-VL-7B width (64 tokens: ~20 s)."""
    config = lm.qwen25vl_7b_config()
    learners = lm.cluster_learners()
    dropouts = [learner.lora_dropout for learner in learners if learner.lora]
    m = lm.measure_all(config, 64, 64, 128, dropouts)
    rows = [lm.memory_row(learner, m, counts, 3584) for learner in learners]
    names = [(row.learner.name, row.learner.lora) for row in rows]
    assert names == [
        (name, lora)
        for name in ("SFT", "GRPO learner", "sweep-trial learner")
        for lora in (True, False)
    ]
    for row in rows:
        if row.learner.lora:
            assert row.fits, (row.learner.name, row.total / lm.GB)
            assert row.learner.checkpointing
        assert row.fits or row.advice  # what does not fit says what to change
    sweep_full = rows[-1]
    assert not sweep_full.fits and "learners.num_workers=4" in sweep_full.advice


def test_vision_in_graph_matches_how_mmrad_builds_the_model(tiny_model):
    """The table's assumption about the vision tower under LoRA, against mmrad's own
    preparation of the model: does the patch embedding's output need grad?"""
    from types import SimpleNamespace

    from mmrad.config import LoraConfig
    from mmrad.model.hf import load_model
    from mmrad.train.building import prepare_for_training

    for checkpointing in (False, True):
        job = SimpleNamespace(
            lora=LoraConfig(r=4), schedule=SimpleNamespace(seed=0),
            learners=SimpleNamespace(activation_checkpointing=checkpointing),
        )  # fmt: skip
        model = prepare_for_training(load_model(tiny_model, "float32"), job)
        patches = torch.randn(16, 3 * 2 * 14 * 14)
        embed = model.base_model.model.model.visual.patch_embed
        assert embed(patches).requires_grad == lm.vision_in_graph(True, checkpointing)
